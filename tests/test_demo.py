"""demo.py's page: the functions behind it on the CPU (the answer to a picture, the messages instead of one, the
attention panel, a sequential model's reading), and the page itself in a real browser (headless Chromium driven by
Selenium; skipped where Gradio, Selenium or the browser is not installed)."""

import dataclasses
import shutil
import socket
import subprocess
import sys
import time

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import demo
import explain
from baselines import CNN, CNNConfig
from checkpoint import CHECKPOINT_FORMAT, SHIPPED, save_checkpoint
from cli import UsageError
from helpers import PROC_ENV, REPO
from vision_mamba2 import SequentialMamba2, SequentialMamba2Config, VisionMamba2, VisionMamba2Config

DIGITS = {  # strokes on a 280x280 canvas, as drawn with the page's brush
    "7": [(75, 50), (200, 50), (125, 240)],
    "1": [(140, 40), (140, 240)],
    "4": [(165, 240), (165, 40), (75, 170), (210, 170)],
}


def canvas(digit=None):
    """The canvas as the Sketchpad hands it over: black ink on white, RGB."""
    im = Image.new("RGB", (280, 280), "white")
    if digit:
        ImageDraw.Draw(im).line(DIGITS[digit], fill="black", width=18, joint="curve")
    return im


@pytest.fixture(scope="module")
def shipped():
    return demo.open_reader(SHIPPED)


@pytest.mark.parametrize("digit", DIGITS)
def test_a_drawn_digit_is_read_as_itself(digit, shipped):
    shown = demo.answer(shipped, canvas(digit), "the canvas")
    assert shown.message == "" and shown.digit.shape == (28, 28)
    np.testing.assert_array_equal(shown.digit, explain.mnist_like(explain.picture_of(canvas(digit))[1]))
    top3 = demo.label(shown.probs, shipped.classes)
    assert list(top3)[0] == digit and top3[digit] > 0.8 and len(top3) == 3, top3  # label smoothing: about 0.9
    assert list(top3.values()) == sorted(top3.values(), reverse=True)
    assert shown.maps.shape == (4, 49, 49) and shown.curves is None  # the shipped model: 4 blocks, 7x7 tokens
    message, seen, top3_shown, panel = demo.views(shipped, shown, 24, 1)
    assert message == "" and top3_shown == top3 and seen.shape == (280, 280, 3) and panel.ndim == 3


def test_an_upload_is_read_from_its_file(shipped, tmp_path):
    canvas("7").resize((900, 900)).save(tmp_path / "seven.jpg")
    shown = demo.answer(shipped, str(tmp_path / "seven.jpg"), "seven.jpg")
    assert list(demo.label(shown.probs, shipped.classes))[0] == "7"


def truncated_png(path):
    canvas("7").save(path)
    path.write_bytes(path.read_bytes()[:300])


def bomb(path):
    """A PNG that says it is 20,000 x 20,000 pixels (PIL refuses over 179 million before decoding): a few KB."""
    Image.new("1", (20000, 20000)).save(path)


@pytest.mark.parametrize("make,reason", [
    (lambda path: canvas().save(path), "no ink: the picture is one flat shade"),
    (lambda path: path.write_text("not a picture\n"), "not an image"),
    (truncated_png, "cannot be read"),
    (bomb, "too large: over 178,956,970 pixels"),
])
def test_no_digit_is_a_message_and_no_answer(make, reason, shipped, tmp_path):
    make(tmp_path / "upload.png")
    for picture, source in [(str(tmp_path / "upload.png"), "upload.png")] + [(canvas(), "the canvas")] * (
            reason.startswith("no ink")):
        shown = demo.answer(shipped, picture, source)
        assert shown.message.startswith(f"Nothing to read on {source}: {reason}") and "Draw a digit" in shown.message
        message, seen, top3, panel = demo.views(shipped, shown, 24, 1)
        assert message == shown.message and top3 is None and panel is None  # no guess, not even a weak one
        assert seen.shape == (280, 280, 3) and seen.max() == 0  # nothing seen


def test_a_weak_best_guess_is_said_to_be_one():
    classes = [str(k) for k in range(10)]
    spread = np.array([0.05, 0.04, 0.38, 0.2, 0.03, 0.1, 0.05, 0.05, 0.05, 0.05])
    assert demo.doubt(spread, classes) == ("The model is unsure: its best guess, 2, has only 38%. This may be no "
                                           "digit, or one written unlike MNIST's.")
    sure = np.full(10, 0.01)
    sure[7] = 0.91
    assert demo.doubt(sure, classes) == ""


@pytest.mark.parametrize("x,y,token", [(0, 0, 0), (279, 279, 48), (280, 0, 6), (45, 41, 8), (140, 140, 24),
                                       (39.9, 40.0, 7)])
def test_a_click_picks_the_token_under_it(x, y, token):
    assert demo.token_at(x, y, 280, 7) == token  # 7x7 tokens of 40 screen pixels on the 280-pixel picture


def test_the_seen_picture_boxes_the_picked_token():
    digit = np.zeros((28, 28))
    digit[4:24, 10:14] = 1
    seen = demo.seen_picture(digit, 7 * 2 + 5, 7)  # row 3, column 6 (from 1)
    assert seen.shape == (280, 280, 3) and (seen[100, 120] == 255).all()  # the ink, 10x larger
    lime = np.all(seen == demo.QUERY, axis=-1)
    rows, cols = np.nonzero(lime)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (80, 119, 200, 239)
    assert not np.all(demo.seen_picture(digit) == demo.QUERY, axis=-1).any()  # no tokens: no box


def test_the_attention_panel_shows_the_picked_tokens_row_and_the_pooled_output():
    """Per block, the token the query takes most from is the brightest tile of the first row, and the token that
    feeds the pooled output most the brightest of the second (no ink over them)."""
    blocks, L, query = 3, 49, 10
    maps = np.full((blocks, L, L), 0.01)
    for b in range(blocks):
        maps[b, query, 30 + b] = 1  # the query token takes from token 30 + b
        maps[b, :, 40 + b] += 0.5  # every token takes from 40 + b: it feeds the pooled output most
    panel = demo.attention_panel(np.zeros((28, 28)), maps, query)
    side, title = 28 * demo.TILE, 20
    assert panel.shape == (2 * (side + title), blocks * side, 3)
    patch = side // 7
    for r, token in enumerate([30, 40]):
        top = r * (side + title) + title
        for b in range(blocks):
            tile = panel[top:top + side, b * side:(b + 1) * side].astype(float).sum(axis=-1)  # (side, side)
            cells = np.median(tile.reshape(7, patch, 7, patch), axis=(1, 3)).ravel()  # not the title, nor the box
            assert cells.argmax() == token + b, (r, b)
    brightest = np.uint8(255 * np.array(matplotlib.colormaps["magma"](1.0)[:3]))
    r, c = divmod(31, 7)  # block 2's token 31, where the query takes from: magma's brightest
    assert (panel[title + r * patch + patch // 2, side + c * patch + patch // 2] == brightest).all()

    digit = np.zeros((28, 28))
    digit[4:24, 10:16] = 1  # a bar: its outline in cyan, the maps inside it
    panel = demo.attention_panel(digit, maps, query)[title:title + side, :side]  # block 1, the query's row
    cyan = np.uint8(255 * demo.INK)
    bottom, left = 24 * demo.TILE - 1, 10 * demo.TILE  # the bar's last row and first column, on the tile
    assert (panel[bottom, 80] == cyan).all() and (panel[100, left] == cyan).all()
    assert (panel[100, left + 3] != cyan).any()  # inside the bar, past its outline


# ----------------------------------------------------------------------------------------------------
# The checkpoints the page takes

def write_checkpoint(path, model, task, arch="mamba2", dataset="mnist", mean=0.1307, std=0.3081):
    """A checkpoint as train.py writes it, of a model with the weights it has."""
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                     "config": dataclasses.asdict(model.config), "args": {"task": task, "arch": arch},
                     "dataset": dataset, "normalization": {"mean": mean, "std": std}, "epoch": 1, "metrics": {}},
                    str(path))
    return str(path)


def tiny_sequential(readout, seq_len=784):
    torch.manual_seed(0)
    return SequentialMamba2(SequentialMamba2Config(seq_len=seq_len, d_model=16, num_blocks=2, d_state=8, headdim=8,
                                                   readout=readout, backend="portable")).eval()


@pytest.mark.parametrize("readout", ["mean", "last"])
def test_a_sequential_model_shows_its_reading(readout, tmp_path):
    reader = demo.open_reader(write_checkpoint(tmp_path / "s.pth", tiny_sequential(readout), "smnist"))
    assert reader.sequential and not reader.has_attention
    shown = demo.answer(reader, canvas("7"), "the canvas")
    assert shown.curves.shape == (784, 10) and shown.maps is None
    # the curves in one parallel pass are the recurrent form's, step by step
    x = (torch.as_tensor(shown.digit)[None, None] - 0.1307) / 0.3081
    np.testing.assert_allclose(shown.curves, explain.probabilities_while_reading(reader.model, x)[0], atol=1e-5)
    np.testing.assert_array_equal(shown.probs, shown.curves[-1])
    with torch.no_grad():
        np.testing.assert_allclose(shown.probs, reader.model(x).softmax(dim=1)[0].numpy(), atol=1e-5)
    _, seen, top3, panel = demo.views(reader, shown, None, 300)
    assert len(top3) == 3 and panel.ndim == 3 and panel.shape[2] == 3
    np.testing.assert_array_equal(seen, demo.seen_picture(shown.digit))


def test_a_non_causal_model_shows_its_maps_and_says_which_matrix_they_are(shipped, tmp_path):
    """--scan nc: the maps of its one order-free pass (their values: tests/test_explain.py), and a note that names
    that matrix (no mask, no directions), where the default model's names the causal form over its scan directions."""
    torch.manual_seed(0)
    model = VisionMamba2(VisionMamba2Config(d_model=16, num_blocks=2, d_state=8, headdim=8, scan="nc",
                                            backend="portable")).eval()
    reader = demo.open_reader(write_checkpoint(tmp_path / "nc.pth", model, "image"))
    shown = demo.answer(reader, canvas("7"), "the canvas")
    assert shown.maps.shape == (2, 49, 49) and (shown.maps > 0).all()  # one map per block, over every token pair
    note, default_note = demo.attention_note(model), demo.attention_note(shipped.model)
    assert "C Bᵀ diag(dt A)" in note and "directions" not in note and "L ∘" not in note
    assert "L ∘ C Bᵀ" in default_note and "the 2 scan directions" in default_note


def test_a_baseline_is_answered_without_maps(tmp_path):
    torch.manual_seed(0)
    cnn = CNN(CNNConfig(width=8)).eval()
    reader = demo.open_reader(write_checkpoint(tmp_path / "c.pth", cnn, "image", "cnn", "fashion-mnist", 0.2860,
                                               0.3530))
    assert not (reader.sequential or reader.has_attention) and reader.classes[0] == "T-shirt/top"
    shown = demo.answer(reader, canvas("1"), "the canvas")
    with torch.no_grad():
        x = (torch.as_tensor(shown.digit)[None, None] - 0.2860) / 0.3530
        np.testing.assert_allclose(shown.probs, cnn(x).softmax(dim=1)[0].numpy(), atol=1e-6)
    _, seen, top3, panel = demo.views(reader, shown, None, 1)
    assert shown.maps is shown.curves is None and panel is None and len(top3) == 3
    np.testing.assert_array_equal(seen, demo.seen_picture(shown.digit))  # no token boxed: a CNN has none


def test_a_checkpoint_of_signals_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "m1d.pth", tiny_sequential("mean", seq_len=40), "smnist", dataset="mnist1d")
    with pytest.raises(UsageError, match="reads mnist1d signals, not pictures"):
        demo.open_reader(path)


def test_without_gradio_one_line_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError, as where it is missing
    with pytest.raises(SystemExit) as exit:
        demo.main(["--checkpoint", SHIPPED])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: demo.py needs Gradio, which the rest of the code does not: "
                                       "pip install gradio\n")



def test_a_busy_port_is_one_line(tmp_path):
    pytest.importorskip("gradio", reason="the page needs Gradio (pip install gradio)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--port", str(port)], cwd=tmp_path,
                              env=PROC_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --port {port}: cannot serve there")
    assert proc.stderr.count("\n") == 1, proc.stderr


# ----------------------------------------------------------------------------------------------------
# The page in a real browser: python demo.py on 127.0.0.1, driven in headless Chromium

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """python demo.py on a free loopback port, run where there is no checkpoint of the user's (so: the shipped
    model): its address, once it says it serves."""
    pytest.importorskip("gradio", reason="the page needs Gradio (pip install gradio)")
    if not (BROWSER and DRIVER):
        pytest.skip("needs a browser: Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    work = tmp_path_factory.mktemp("page")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(work / "demo.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--port", str(port)], cwd=work,
                                env=PROC_ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(240):  # a minute at most; a few seconds on an idle machine
            said = (work / "demo.log").read_text()
            if f"the page is at http://127.0.0.1:{port}" in said or proc.poll() is not None:
                break
            time.sleep(0.25)
        assert proc.poll() is None and "the page is at" in said, said
        assert said.startswith("using the pretrained model"), said
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs Selenium (pip install "
                                                                 "selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER  # the installed one: nothing is downloaded
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200",
                 "--no-proxy-server"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_reads_a_digit_in_a_browser(browser, page, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(what, timeout=60):
        """Waits until what() is true; what() is read again for the failure's message."""
        try:
            WebDriverWait(browser, timeout).until(lambda _: what())
        except TimeoutException:
            pass
        return what()

    def predicted():
        found = browser.find_elements(By.CSS_SELECTOR, "#prediction [data-testid=label-output-value]")
        return found[0].text if found else None

    def token():  # the picked token's row and column, as the sliders show them
        return [browser.find_element(By.CSS_SELECTOR, f"#{name} input[type=number]").get_attribute("value")
                for name in ("row", "col")]

    def message():
        return browser.find_element(By.ID, "message").text

    browser.get(page)
    upload = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    assert predicted() is None  # nothing drawn, nothing guessed

    canvas("7").save(tmp_path / "seven.png")  # an upload
    upload.send_keys(str(tmp_path / "seven.png"))
    assert shown(lambda: predicted() == "7"), predicted()

    browser.find_element(By.CSS_SELECTOR, "#canvas button[aria-label=Brush]").click()  # a stroke: a 1
    board = browser.find_element(By.CSS_SELECTOR, "#canvas canvas")
    h = board.size["height"]
    ActionChains(browser).move_to_element_with_offset(board, 0, int(-0.35 * h)).click_and_hold() \
        .move_to_element_with_offset(board, 0, int(0.35 * h)).release().perform()
    assert shown(lambda: predicted() == "1"), predicted()

    seen = browser.find_element(By.CSS_SELECTOR, "#seen img")  # a click on the top-left token picks it
    ActionChains(browser).move_to_element_with_offset(seen, int(-0.45 * seen.size["width"]),
                                                      int(-0.45 * seen.size["height"])).click().perform()
    assert shown(lambda: token() == ["1", "1"]), token()

    (tmp_path / "notes.png").write_text("not a picture\n")  # no picture: a message, and no guess
    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "notes.png"))
    assert shown(lambda: "not an image" in message()), message()
    assert message().startswith("Nothing to read on notes.png: not an image") and predicted() is None

    (tmp_path / "huge.png").write_bytes(bytes(21 << 20))  # over the page's 20 MB: refused before it is read
    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "huge.png"))

    def toasts():
        return " ".join(toast.text for toast in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"))
    assert shown(lambda: 'exceed the maximum allowed size of 20.0 Mb: "huge.png"' in toasts()), toasts()

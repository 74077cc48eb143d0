"""explain.py through test_model.py: your own pictures prepared as MNIST was made (--image), the default checkpoint
(yours, else the pretrained one), and the figures of what the model does. Pictures are made here with PIL."""

import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torchvision.datasets import MNIST

import checkpoint as checkpoint_module  # `checkpoint` is test_evaluate's fixture here
import explain
import mamba2_torch
import test_model
import vision_mamba2
from checkpoint import rebuild_model
from helpers import REPO, load, run_script, train_in_process
from vision_mamba2 import SCANS, VisionMamba2, VisionMamba2Config
from test_evaluate import checkpoint, run  # noqa: F401 (checkpoint: the tiny trained model, a fixture)
from test_sequential import TINY_FLAGS as SEQUENTIAL_FLAGS


SEVEN = [(66, 42), (160, 42), (92, 182)]  # a polyline on a 224x224 canvas
PEN = dict(fill=255, width=20)  # MNIST's pen, 8x larger
DRAWN = {  # digits drawn on a 224x224 canvas, ink bright on black
    "7": lambda draw: draw.line(SEVEN, **PEN, joint="curve"),  # 20 pixels tall once shrunk
    "1": lambda draw: draw.line([(112, 30), (112, 194)], **PEN),
    "0": lambda draw: draw.ellipse([(62, 30), (162, 194)], outline=255, width=20),
    "4": lambda draw: draw.line([(130, 194), (130, 30), (60, 140), (170, 140)], **PEN, joint="curve"),
    "2": lambda draw: draw.line([(70, 70), (90, 40), (140, 40), (155, 75), (70, 190), (165, 190)], **PEN,
                                joint="curve"),
}


def drawn(digit):
    """An MNIST-like digit (28, 28) in [0, 1]: drawn 8x larger with a pen of MNIST's width, shrunk with
    antialiasing."""
    im = Image.new("L", (224, 224))
    DRAWN[digit](ImageDraw.Draw(im))
    return np.asarray(im.resize((28, 28), Image.Resampling.BOX)) / 255


def drawn_seven():
    return drawn("7")


def on_a_noisy_canvas(digit):
    """digit (28, 28) in [0, 1] with a scanner's noise on it, as conftest.py's synthetic images have."""
    return np.clip(digit + np.random.default_rng(1).normal(0, 20 / 255, digit.shape), 0, 1)


def as_photo(digit, style, rng):
    """digit (28, 28), ink bright on black, as someone might hand it over: 9x larger, off-centre on a big canvas."""
    big = np.asarray(Image.fromarray((255 * digit).astype(np.uint8)).resize((252, 252), Image.Resampling.BICUBIC))
    ink = np.zeros((480, 640))
    ink[200:452, 30:282] = big / 255
    if style == "light on dark":  # chalk on a blackboard: no inversion
        return Image.fromarray((40 + 200 * ink).astype(np.uint8)).convert("RGB")
    if style == "transparent":  # black ink on a transparent layer (whose hidden colour is black too)
        return Image.fromarray(np.stack([np.zeros_like(ink)] * 3 + [255 * ink], -1).astype(np.uint8), "RGBA")
    if style == "16-bit scan":
        return Image.fromarray((60000 - 50000 * ink).astype(np.uint16))  # PIL's mode I;16
    paper = np.full_like(ink, 235.0)
    if style == "lit from one side":  # a phone photo: the paper darker towards one edge, and grainy
        paper = 140 + 110 * np.linspace(0, 1, 640)[None] + rng.normal(0, 4, ink.shape)
    picture = paper * (1 - 0.85 * ink)
    if style == "specks":  # crumbs on the paper
        for r, c in rng.integers(20, 460, (6, 2)):
            picture[r:r + 3, c + 300:c + 303] = 30
    rgb = np.stack([picture, 0.95 * picture, 0.9 * picture], -1)  # yellowish paper, bluish ink
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def centred(x):
    """x moved (subpixel) so that its centre of mass is at (14, 14): the prepared digits, compared alike."""
    return ndimage.shift(x, np.array([14, 14]) - ndimage.center_of_mass(x), order=1)


@pytest.mark.parametrize("style", ["dark on white", "light on dark", "transparent", "lit from one side", "specks",
                                   "16-bit scan"])
@pytest.mark.parametrize("source", ["drawn seven", "drawn two, noisy"])
def test_a_picture_prepares_to_its_mnist_digit(source, style, tmp_path):
    digit = drawn_seven() if source == "drawn seven" else on_a_noisy_canvas(drawn("2"))
    path = tmp_path / "photo.png"
    as_photo(digit, style, np.random.default_rng(0)).save(path)
    given, gray = explain.load_picture(path)
    assert given.shape == (480, 640, 3) and gray.shape == (480, 640)
    prepared, reference = explain.mnist_like(gray), explain.mnist_like(digit)
    assert prepared.shape == (28, 28) and prepared.min() >= 0 and prepared.max() <= 1
    assert np.allclose(ndimage.center_of_mass(prepared), 14, atol=0.5)  # centred by its centre of mass
    rows, cols = np.nonzero(prepared > 0.05)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 in (20, 21)  # in the 20x20 box (antialiasing may bleed a pixel)
    prepared, reference = centred(prepared), centred(reference)
    assert np.abs(prepared - reference).mean() < 0.05
    assert np.corrcoef(prepared.ravel(), reference.ravel())[0, 1] > 0.98


def test_an_mnist_digit_stays_itself():
    # a digit as mnist_like makes it (as MNIST's are) is already cropped, 20 pixels tall and centred: it stays itself
    digit = explain.mnist_like(drawn_seven())
    assert np.abs(explain.mnist_like(digit) - digit).mean() < 0.005


def test_a_thin_pen_on_a_big_photo_is_thickened():
    im = Image.new("L", (1200, 1200), 230)
    ImageDraw.Draw(im).line([(5 * x, 5 * y) for x, y in SEVEN], fill=20, width=6)  # drawn_seven's pen: 100
    prepared = explain.mnist_like(np.asarray(im) / 255)
    reference = explain.mnist_like(drawn_seven())
    # strokes as bright and nearly as many as the 7's in MNIST's pen (unthickened: a hairline of under 0.5)
    assert 0.5 < (prepared > 0.5).sum() / (reference > 0.5).sum() < 1.5
    blurred = [ndimage.gaussian_filter(centred(x), 1).ravel() for x in (prepared, reference)]
    assert np.corrcoef(*blurred)[0, 1] > 0.7  # and the same 7, but for a pixel here and there


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("not a picture\n"), "not an image"),
    (lambda p: Image.new("RGB", (80, 60), "white").save(p), "no ink"),
    (lambda p: Image.fromarray(np.random.default_rng(0).normal(200, 3, (60, 80)).astype(np.uint8)).save(p),
     "no ink"),  # grainy paper
    (lambda p: Image.fromarray((np.linspace(80, 230, 80)[None] + np.random.default_rng(0).normal(0, 3, (60, 80)))
                               .astype(np.uint8)).save(p), "no ink"),  # a blank sheet lit from one side
    (lambda p: None, "cannot be read: No such file or directory"),
    (lambda p: p.mkdir(), "cannot be read: Is a directory"),
    (lambda p: p.write_bytes(png_bytes(drawn_seven())[:300]), r"cannot be read: a damaged image file \(image file is "
                                                                r"truncated\)"),  # an interrupted download
    (lambda p: p.write_bytes(png_bytes(drawn_seven())[:2000]), r"a damaged image file \(image file is truncated\)"),
    # the model names a class for anything; these it was never shown
    (lambda p: draw_on_paper(lambda d: d.ellipse([90, 90, 110, 110], fill=0)).save(p), "looks unlike any digit: "
                                                                                      "its ink is one solid blob"),
    (lambda p: draw_on_paper(lambda d: d.rectangle([50, 50, 150, 150], fill=0)).save(p), "looks unlike any digit"),
    (lambda p: Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80), np.uint8)).save(p),
     "looks unlike any digit"),  # noise
    (lambda p: Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640), np.uint8)).save(p),
     "looks unlike any digit"),
    (lambda p: Image.fromarray(np.where(np.random.default_rng(0).random((200, 200)) < 0.05, 0, 255).astype(np.uint8))
     .save(p), "looks unlike any digit"),  # sparse dark specks
])
def test_no_digit_is_a_bad_picture(make, message, tmp_path):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(explain.BadPicture, match=message):
        explain.mnist_like(explain.load_picture(path)[1])


def png_bytes(digit):
    """The PNG file of a digit (28, 28) in [0, 1], drawn dark on white, 10x larger."""
    buffer = io.BytesIO()
    Image.fromarray((255 * (1 - digit)).astype(np.uint8)).resize((280, 280)).save(buffer, "PNG")
    return buffer.getvalue()


def draw_on_paper(draw):
    """A 200x200 white picture with draw(ImageDraw) done on it."""
    im = Image.new("L", (200, 200), 255)
    draw(ImageDraw.Draw(im))
    return im


@pytest.mark.parametrize("bold", [20, 36])
def test_bold_strokes_are_still_a_digit(bold):
    """A 0 drawn with a marker (its ring a fifth of the picture's width, or more) is strokes, not a blob."""
    zero = draw_on_paper(lambda d: d.ellipse([50, 20, 150, 180], outline=0, width=bold))
    assert explain.mnist_like(np.asarray(zero) / 255).max() > 0.5


def test_image_answers_each_picture_and_draws_them(checkpoint, tmp_path, capsys):  # noqa: F811
    Image.fromarray((255 * (1 - drawn_seven())).astype(np.uint8)).resize((280, 280)).save(tmp_path / "seven.png")
    (tmp_path / "notes.txt").write_text("not a picture\n")
    Image.new("RGB", (80, 60), "white").save(tmp_path / "blank.png")
    paths = [tmp_path / "notes.txt", tmp_path / "seven.png", tmp_path / "blank.png"]
    status, out, err = run(["--checkpoint", checkpoint, "--image", *paths, "--out-dir", tmp_path / "out",
                            "--device", "cpu"], capsys)
    assert status == 2
    assert err.splitlines() == [f"error: {paths[0]}: not an image (PIL cannot read it)",
                                f"error: {paths[2]}: no ink: the picture is one flat shade"]
    answer, wrote = out.splitlines()
    digits = r"(\d) \((\d+\.\d)%\)"
    match = re.fullmatch(rf"{paths[1]}: {digits}, then {digits}, {digits}", answer)
    assert match, answer
    assert len({match[1], match[3], match[5]}) == 3 and float(match[2]) >= float(match[4]) >= float(match[6])
    with Image.open(tmp_path / "out" / "my_digits.png") as png:
        assert png.format == "PNG" and 600 < png.size[0] < 1400 and 250 < png.size[1] < 600  # one row
    assert wrote == f"wrote {tmp_path / 'out' / 'my_digits.png'}"


def test_image_answers_no_digit_with_one_line_each_and_no_guess(checkpoint, tmp_path):  # noqa: F811
    """python test_model.py --image with a digit among pictures that are none: each of those is one line on stderr
    naming the file and what is wrong, and gets no guess; the digit is answered; exit status 2."""
    seven, blank, dot, noise, cut = (tmp_path / f"{name}.png" for name in ("seven", "blank", "dot", "noise", "cut"))
    seven.write_bytes(png_bytes(drawn_seven()))
    Image.new("RGB", (80, 60), "white").save(blank)
    draw_on_paper(lambda d: d.ellipse([90, 90, 110, 110], fill=0)).save(dot)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80), np.uint8)).save(noise)
    cut.write_bytes(png_bytes(drawn_seven())[:2000])
    proc = run_script("test_model.py", "--checkpoint", checkpoint, "--image", seven, blank, dot, noise, cut,
                      "--out-dir", tmp_path, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert [line.split(": ")[:3] for line in errors] == [["error", str(blank), "no ink"],
                                                           ["error", str(dot), "looks unlike any digit"],
                                                           ["error", str(noise), "looks unlike any digit"],
                                                           ["error", str(cut), "cannot be read"]], errors
    assert errors[-1].endswith("a damaged image file (image file is truncated)")
    answer, wrote = proc.stdout.splitlines()
    assert answer.startswith(f"{seven}: ") and wrote == f"wrote {tmp_path / 'my_digits.png'}"


def test_image_with_only_bad_pictures_draws_nothing(checkpoint, tmp_path, capsys):  # noqa: F811
    (tmp_path / "notes.txt").write_text("not a picture\n")
    status, out, err = run(["--checkpoint", checkpoint, "--image", tmp_path / "notes.txt", "--out-dir", tmp_path,
                            "--device", "cpu"], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert not (tmp_path / "my_digits.png").exists()


# ----------------------------------------------------------------------------------------------------
# The default checkpoint: yours, else the pretrained one that comes with the code

def test_a_fresh_clone_evaluates_the_pretrained_model(data_dir, tmp_path):
    # a real process in a directory without a vision_mamba2_mnist.pth of the user's: the file in pretrained/
    shipped = REPO / "pretrained" / "vision_mamba2_mnist.pth"
    assert checkpoint_module.SHIPPED == str(shipped)
    proc = run_script("test_model.py", "--data-dir", data_dir, "--out-dir", tmp_path / "eval", "--num-samples", "1",
                      "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(f"using the pretrained model that comes with the code, {shipped}")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"]["path"] == str(shipped) and metrics["num_images"] == 100
    # and it is the trained model (random weights of the right shapes would pass the above): it reads hand-drawn
    # digits as themselves, confidently (label smoothing 0.1 keeps its confidence near 90%)
    pictures = []
    for digit in DRAWN:
        pictures.append(tmp_path / f"drawn_{digit}.png")
        Image.fromarray((255 * (1 - drawn(digit))).astype(np.uint8)).resize((280, 280)).save(pictures[-1])
    proc = run_script("test_model.py", "--image", *pictures, "--out-dir", tmp_path / "eval", "--device", "cpu",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = proc.stdout.splitlines()[1:-1]  # between "using the pretrained model ..." and "wrote ..."
    for digit, picture, answer in zip(DRAWN, pictures, answers, strict=True):
        match = re.match(rf"{re.escape(str(picture))}: (\d) \((\d+\.\d)%\)", answer)
        assert match and match[1] == digit and float(match[2]) >= 80, answer


def real_mnist_dir():
    """A directory holding torchvision's MNIST (MNIST/raw): $MNIST_DATA_DIR, else the repository's ./data, where
    python train.py downloads it."""
    root = os.environ.get("MNIST_DATA_DIR", str(REPO / "data"))
    if not os.path.exists(os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte")):
        pytest.skip(f"needs the real MNIST test set: none in {root} (set MNIST_DATA_DIR to the --data-dir of "
                    f"python train.py)")
    return root


def test_the_pretrained_model_reads_real_mnist():
    """The shipped model on the first 1,000 real MNIST test digits: at least 99% right (it tests at 99.65% on all
    10,000; the whole set takes minutes on a CPU)."""
    ckpt = load(REPO / "pretrained" / "vision_mamba2_mnist.pth")
    model = rebuild_model(ckpt, "pretrained", torch.device("cpu"))
    test = MNIST(real_mnist_dir(), train=False)
    norm = ckpt["normalization"]
    x, y = (test.data[:1000, None].float() / 255 - norm["mean"]) / norm["std"], test.targets[:1000]
    with torch.no_grad():
        correct = sum((model(xb).argmax(dim=1) == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500)))
    assert correct / len(y) >= 0.99, correct


def test_no_real_mnist_digit_is_turned_away():
    """The check that a picture looks like a digit refuses none of the first 1,000 real MNIST test digits."""
    test = MNIST(real_mnist_dir(), train=False)
    for i, digit in enumerate(test.data[:1000].numpy() / 255):
        explain.mnist_like(digit)  # raises BadPicture


def test_without_checkpoint_yours_else_the_shipped_one(checkpoint, data_dir, tmp_path, capsys,  # noqa: F811
                                                       monkeypatch):
    work, shipped = tmp_path / "clone", tmp_path / "pretrained" / "vision_mamba2_mnist.pth"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(checkpoint_module, "SHIPPED", str(shipped))
    evaluation = ["--data-dir", data_dir, "--out-dir", tmp_path / "eval", "--device", "cpu", "--num-samples", "1"]
    Image.fromarray((255 * (1 - drawn_seven())).astype(np.uint8)).save(tmp_path / "seven.png")
    picture = ["--image", tmp_path / "seven.png", "--out-dir", tmp_path / "eval", "--device", "cpu"]

    status, _, err = run(evaluation, capsys)  # neither yours nor a shipped one
    assert status == 2 and err.count("\n") == 1 and "no checkpoint" in err and "python train.py" in err

    shipped.parent.mkdir()
    shipped.write_bytes(checkpoint.read_bytes())
    status, out, err = run(evaluation, capsys)
    assert status == 0, err
    assert out.splitlines()[0].startswith(f"using the pretrained model that comes with the code, {shipped}")
    assert f"checkpoint {shipped}:" in out and "mnist test set: accuracy" in out
    status, out, err = run(picture, capsys)  # whatever it does
    assert status == 0 and out.splitlines()[0].startswith("using the pretrained model"), err

    (work / "vision_mamba2_mnist.pth").write_bytes(checkpoint.read_bytes())  # as python train.py would write it
    status, out, err = run(picture, capsys)
    assert status == 0, err
    assert out.splitlines()[0].startswith("using your vision_mamba2_mnist.pth")

    status, out, err = run([*picture, "--checkpoint", checkpoint], capsys)  # an explicit --checkpoint wins
    assert status == 0, err
    assert out.splitlines()[0].startswith(f"{tmp_path / 'seven.png'}: ")  # no word on which checkpoint


# ----------------------------------------------------------------------------------------------------
# The hidden attention: each block's SSD matrix, mapped back to the token grid

def tiny_vision_mamba2(scan):
    torch.manual_seed(0)
    return VisionMamba2(VisionMamba2Config(d_model=16, num_blocks=2, d_state=8, headdim=8, scan=scan,
                                           backend="portable")).eval()


@pytest.mark.parametrize("scan", ["uni", "bi", "cross", "nc"])
def test_the_grid_matrices_give_each_directions_scan_in_grid_order(scan, monkeypatch):
    """M_grid[d] applied to the scan's input x laid out on the grid is the scan's output laid out on the grid, the
    way the block puts each step's output back onto the token it read (block.order): P_d^T M_d P_d is right. For
    the non-causal SSD (nc) too: its matrix has no mask."""
    model, x = tiny_vision_mamba2(scan), torch.randn(2, 1, 28, 28)
    scans = []
    module, name = (vision_mamba2, "non_causal_scan") if scan == "nc" else (mamba2_torch, "mamba_chunk_scan_combined")
    scan_fn = getattr(module, name)

    def recorded(*args, **kwargs):
        y = scan_fn(*args, **kwargs)
        scans.append((args[0], y, kwargs["D"]))
        return y
    monkeypatch.setattr(module, name, recorded)
    inputs = explain.mixer_inputs(model, x)
    assert [u.shape for u in inputs] == [(2 * SCANS[scan], 49, 16)] * 2 and len(scans) == len(model.blocks)
    for block, u, (xs, ys, D) in zip(model.blocks, inputs, scans):
        # xs, ys : (B*k, L, h, p) in reading order
        M = explain.grid_order(block.mixer.ssd_matrix(u), block.order)  # (B, k, h, L, L)
        k = len(block.order)
        for d, order in enumerate(block.order):
            on_grid = [torch.zeros_like(t[d::k]).index_copy(1, order, t[d::k]) for t in (xs, ys)]  # (B, L, h, p)
            mixed = torch.einsum("bhij,bjhp->bihp", M[:, d], on_grid[0]) + D[:, None] * on_grid[0]
            torch.testing.assert_close(mixed, on_grid[1], rtol=1e-4, atol=1e-5)


def test_attention_maps_average_heads_and_directions():
    model, x = tiny_vision_mamba2("bi"), torch.randn(3, 1, 28, 28)
    maps = explain.attention_maps(model, x)
    assert maps.shape == (3, 2, 49, 49) and (maps >= 0).all()
    for b, (block, u) in enumerate(zip(model.blocks, explain.mixer_inputs(model, x))):
        M = block.mixer.ssd_matrix(u).abs().mean(dim=1)  # (B*2, L, L), heads averaged, in reading order
        forward, backward = M[0::2], M[1::2].flip(-1).flip(-2)  # the second direction reads the grid backwards
        torch.testing.assert_close(maps[:, b], (forward + backward) / 2)
        # each direction is causal its own way: the first reads the grid forwards, the second backwards; and tokens
        # do mix (not a diagonal)
        assert torch.equal(forward, forward.tril()) and torch.equal(backward, backward.triu())
        assert (forward.tril(-1) > 0).any() and (backward.triu(1) > 0).any()


def test_the_non_causal_models_attention_figure_says_which_matrix_it_draws():
    """--scan nc: the maps are its unmasked matrices, and the caption says so (not the causal form's L o C B^T)."""
    model, x = tiny_vision_mamba2("nc"), torch.randn(2, 1, 28, 28)
    maps = explain.attention_maps(model, x)
    assert maps.shape == (2, 2, 49, 49) and (maps.triu(1) > 0).any()  # tokens read later tokens too
    fig = explain.plot_attention(x[:, 0].numpy(), ["a", "b"], maps.numpy(), name="nc.pth",
                                 matrix=explain.attention_matrix(model))
    fig.savefig(io.BytesIO(), format="png")  # renders the caption
    caption = fig._suptitle.get_text()
    assert "non-causal SSD" in caption and "scan directions" not in caption and "L ∘" not in caption


def test_attention_draws_the_figure(checkpoint, data_dir, tmp_path, capsys):  # noqa: F811
    status, out, err = run(["--checkpoint", checkpoint, "--data-dir", data_dir, "--out-dir", tmp_path,
                            "--attention", "--device", "cpu"], capsys)
    assert status == 0, err
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'attention.png'}" and "accuracy" not in out
    with Image.open(tmp_path / "attention.png") as png:  # 4 digits x 3 rows (pooled, 2 query tokens)
        assert png.format == "PNG" and 1000 < png.size[0] < 1600 and 2000 < png.size[1] < 4000, png.size
    assert not (tmp_path / "metrics.json").exists()  # instead of the evaluation


# ----------------------------------------------------------------------------------------------------
# Reading pixel by pixel: a sequential checkpoint's accuracy after t pixels, and its recurrent form

@pytest.fixture(scope="module")
def sequential_checkpoint(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    assert train_in_process(["--task", "smnist", *SEQUENTIAL_FLAGS, "--epochs", "1", "--max-train-samples", "64",
                             "--data-dir", data_dir, "--out", out / "s.pth"]) == 0
    return out / "s.pth"


def test_a_sequential_checkpoint_is_measured_while_reading(sequential_checkpoint, data_dir, tmp_path, capsys):
    status, out, err = run(["--checkpoint", sequential_checkpoint, "--data-dir", data_dir, "--out-dir", tmp_path,
                            "--device", "cpu", "--batch-size", "16", "--num-samples", "1"], capsys)
    assert status == 0, err
    reading = json.loads((tmp_path / "metrics.json").read_text())["reading"]
    assert reading["pixels_read"] == [196, 392, 588, 784] and reading["fractions"] == [0.25, 0.5, 0.75, 1.0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert reading["accuracy"][-1] == metrics["accuracy"]  # after every pixel: the model's own forward
    assert reading["recurrent_images"] == 4 and reading["max_probability_difference"] < 1e-4
    for t, accuracy in zip(reading["pixels_read"], reading["accuracy"]):
        assert f"({t:,} pixels): accuracy {accuracy:.2%}" in out

    # the accuracy after t pixels, from the recurrent form instead: Mamba2.step, one pixel at a time
    model = rebuild_model(load(sequential_checkpoint), str(sequential_checkpoint), torch.device("cpu"))
    test = MNIST(data_dir, train=False)
    norm = load(sequential_checkpoint)["normalization"]
    x = (test.data[:, None].float() / 255 - norm["mean"]) / norm["std"]
    with torch.no_grad():
        recurrent = dict(model.step_logits(x, at=reading["pixels_read"]))
    for t, accuracy in zip(reading["pixels_read"], reading["accuracy"]):
        assert (recurrent[t].argmax(dim=1) == test.targets).float().mean().item() == pytest.approx(accuracy)

    assert str(tmp_path / "reading.png") in out.splitlines()[-1]  # "wrote ..."
    with Image.open(tmp_path / "reading.png") as png:  # 4 rows: snapshots and curves
        assert png.format == "PNG" and 900 < png.size[0] < 1800 and 700 < png.size[1] < 1500, png.size


def test_the_picture_as_read_so_far():
    image, order = np.arange(6.0).reshape(2, 3), np.array([4, 0, 5, 1, 3, 2])
    seen = explain.partly_read(image, order, 3)
    assert np.array_equal(np.isnan(seen), [[False, True, True], [True, False, False]])
    assert np.array_equal(seen[~np.isnan(seen)], [0, 4, 5])


@pytest.mark.parametrize("flag,message", [
    (["--image", "digit.png"], "--image needs an image classifier"),
    (["--attention"], "--attention draws Vision Mamba 2's blocks"),
])
def test_a_sequential_checkpoint_has_no_pictures_nor_attention(flag, message, sequential_checkpoint, data_dir,
                                                                tmp_path, capsys):
    status, _, err = run(["--checkpoint", sequential_checkpoint, "--data-dir", data_dir, "--out-dir", tmp_path,
                          *flag], capsys)
    assert status == 2 and err.count("\n") == 1 and message in err and "smnist" in err, err

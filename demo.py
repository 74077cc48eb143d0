"""
Watch Mamba-2 read your handwriting, live: a page where you draw a digit (or upload a picture of one) and see,
as you draw, what the model sees, its three likeliest classes and how each block's Mamba-2 mixes the tokens.

    pip install gradio                  # once: the page's one extra dependency
    python demo.py                      # then open http://127.0.0.1:7860
    python demo.py --checkpoint vision_mamba2_smnist.pth    # a sequential model: its reading, pixel by pixel

Without --checkpoint it shows ./vision_mamba2_mnist.pth, what `python train.py` writes, and where there is none
the pretrained model that comes with the code, as test_model.py does. It runs on the CPU.

The page, for the picture on the canvas (or the one uploaded last):
    what the model sees     the picture prepared as MNIST was made (explain.mnist_like), 28x28
    the likeliest classes   the three, with the model's probabilities, and a word of doubt when its best is weak
    hidden attention        Vision Mamba 2: per block, what the token you pick (a click on the 28x28 picture, or
                            the sliders) takes from each token, and what feeds the pooled output (explain's maps)
    reading                 a sequential model: the class probabilities after each pixel read, the picture as
                            read so far
A canvas without ink, a file that is no picture, one too large: a message on the page instead of an answer.

What the page shows is computed by plain functions of arrays (answer, label, seen_picture, attention_panel,
reading_panel), tested without Gradio in tests/test_demo.py; build_page only wires them to Gradio's components.
"""

import dataclasses
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")  # the panels are drawn into arrays, never shown in a window
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

import explain
from checkpoint import DEFAULT_HELP, default_checkpoint, load_checkpoint, model_kind, rebuild_model
from cli import HelpFormatter, Parser, UsageError, exit_status, int_at_least
from data import DATASETS

UNSURE = 0.5  # a best guess below this probability is said to be weak: a scribble spreads the probabilities
SCALE = 10  # screen pixels per pixel of the 28x28 picture the model sees
TILE = 6  # and per pixel in the attention panel's tiles
INK = np.array([0.0, 0.9, 1.0])  # the digit's outline over the attention maps: cyan, as in attention.png
QUERY = (80, 255, 80)  # the token picked: lime
START = "Draw a digit on the canvas, or upload a picture of one."


@dataclasses.dataclass(frozen=True)
class Reader:
    """A checkpoint's model on the CPU and what the page needs to show its answers."""
    model: torch.nn.Module
    classes: list
    mean: float
    std: float
    kind: tuple  # (task, arch)
    name: str

    @property
    def sequential(self):
        return self.kind[0] != "image"

    @property
    def has_attention(self):
        return self.kind == ("image", "mamba2")

    @property
    def grid(self):
        """Tokens per side (Vision Mamba 2)."""
        return self.model.grid_size


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the page shows for one picture: nothing but the message when there is no digit to read."""
    message: str
    digit: np.ndarray | None = None  # (28, 28) in [0, 1], as the model sees it
    probs: np.ndarray | None = None  # (classes,)
    maps: np.ndarray | None = None  # (blocks, L, L): explain.attention_maps, Vision Mamba 2 only
    curves: np.ndarray | None = None  # (seq_len, classes): after each pixel read, sequential models only


def open_reader(path):
    """The checkpoint at path as a Reader; a UsageError for one whose items are no pictures."""
    ckpt = load_checkpoint(path)
    if DATASETS[ckpt["dataset"]].signals:
        raise UsageError(f"{path} reads {ckpt['dataset']} signals, not pictures: there is nothing to draw for it")
    norm = ckpt["normalization"]
    classes = DATASETS[ckpt["dataset"]].class_names
    return Reader(rebuild_model(ckpt, path, torch.device("cpu")), classes, norm["mean"], norm["std"],
                  model_kind(ckpt), os.path.basename(path))


def answer(reader, picture, source):
    """The Answer for a picture: a PIL image (the canvas) or a file's path (an upload), named `source` in
    messages."""
    try:
        _, gray = explain.load_picture(picture) if isinstance(picture, str) else explain.picture_of(picture)
        digit = explain.mnist_like(gray)
    except explain.BadPicture as e:
        return Answer(f"Nothing to read on {source}: {e}. Draw a digit, or upload a picture of one.")
    x = (torch.as_tensor(digit)[None, None] - reader.mean) / reader.std  # (1, 1, 28, 28)
    if reader.sequential:
        curves = explain.probabilities_at_every_step(reader.model, x)[0]
        return Answer(doubt(curves[-1], reader.classes), digit, curves[-1], curves=curves)
    probs = explain.classify(reader.model, [digit], reader.mean, reader.std, "cpu")[0]
    maps = explain.attention_maps(reader.model, x)[0].numpy() if reader.has_attention else None
    return Answer(doubt(probs, reader.classes), digit, probs, maps)


def doubt(probs, classes):
    """A word of doubt where the model's best guess is weak, else "". (A check of the picture itself, that it looks
    like a digit at all, belongs to explain.mnist_like: its BadPicture reaches the page through answer.)"""
    best = int(probs.argmax())
    if probs[best] >= UNSURE:
        return ""
    return (f"The model is unsure: its best guess, {classes[best]}, has only {probs[best]:.0%}. This may be no "
            f"digit, or one written unlike MNIST's.")


def label(probs, classes):
    """The three likeliest classes and their probabilities, as gr.Label shows them; None: nothing shown."""
    if probs is None:
        return None
    return {classes[k]: float(probs[k]) for k in np.argsort(-probs, kind="stable")[:3]}


def token_at(x, y, side, grid):
    """The token (an index into the grid x grid tokens, row-major) under a click at (x, y) on a picture `side`
    pixels wide."""
    row, col = (min(int(v * grid / side), grid - 1) for v in (y, x))
    return row * grid + col


def seen_picture(digit, query=None, grid=None):
    """What the model sees, SCALE times larger (H, W, 3) uint8, the token `query` of the grid x grid boxed if one
    is given; a black square when there is no digit."""
    gray = np.zeros((28, 28)) if digit is None else digit
    big = np.repeat(np.repeat(np.uint8(255 * gray), SCALE, 0), SCALE, 1)
    image = Image.fromarray(big).convert("RGB")
    if digit is not None and query is not None:
        box(ImageDraw.Draw(image), query, grid, big.shape[0] / grid)
    return np.asarray(image)


def box(draw, query, grid, patch, left=0, top=0):
    """The token `query` of a grid x grid of square patches (pixels) boxed, the grid's corner at (left, top)."""
    r, c = divmod(query, grid)
    draw.rectangle([left + c * patch, top + r * patch, left + (c + 1) * patch - 1, top + (r + 1) * patch - 1],
                   outline=QUERY, width=2)


def attention_panel(digit, maps, query):
    """maps (blocks, L, L) from explain.attention_maps over the digit (28, 28) as one picture (H, W, 3) uint8: a
    column per block, in the first row what the token `query` takes from each token (its row of M), in the
    second how much each token feeds the pooled output (the mean of M's rows); each map scaled to sum to 1, one
    colour scale per row, the digit's outline over it in cyan."""
    blocks, L, _ = maps.shape
    grid, side, title = int(np.sqrt(L)), 28 * TILE, 20
    rows = [maps[:, query], maps.mean(axis=1)]  # each (blocks, L)
    names = ["what token (row {}, col {}) takes from each token, per block".format(*np.add(divmod(query, grid), 1)),
             "how much each token feeds the pooled output (the mean over tokens), per block"]
    panel = Image.new("RGB", (blocks * side, 2 * (side + title)), "white")
    draw, font = ImageDraw.Draw(panel), ImageFont.load_default(size=14)
    ink = np.kron(digit > 0.5, np.ones((TILE, TILE), bool))
    outline = (ink & ~ndimage.binary_erosion(ink, iterations=2))[..., None]  # (side, side, 1), 2 pixels wide
    for r, (share, name) in enumerate(zip(rows, names)):
        share = share / share.sum(axis=-1, keepdims=True)
        top = r * (side + title) + title
        draw.text((4, top - title + 3), name, fill="black", font=font)
        for b in range(blocks):
            heat = matplotlib.colormaps["magma"](share[b] / share.max())[:, :3].reshape(grid, grid, 3)
            tile = np.where(outline, INK, np.kron(heat, np.ones((side // grid, side // grid, 1))))
            panel.paste(Image.fromarray(np.uint8(255 * tile)), (b * side, top))
            draw.text((b * side + 4, top + 2), f"block {b + 1}", fill="white", font=font)
            if r == 0:
                box(draw, query, grid, side / grid, b * side, top)
    return np.asarray(panel)


def reading_panel(reader, answer, t):
    """A sequential model's reading of answer's digit as a picture (H, W, 3) uint8: the digit as read after t
    pixels (unread: blue), and the class probabilities after each pixel, the best class's thick (explain's
    reading.png, for one picture)."""
    curves, best, now = answer.curves, int(answer.probs.argmax()), answer.curves[t - 1]
    title = f"after {t:,} pixels: {reader.classes[int(now.argmax())]} ({now.max():.0%})"
    fig = explain.plot_reading(255 * answer.digit[None], [best], [title], curves[None],
                               reader.model.permutation.numpy(), [t], reader.classes, reader.name)
    fig.suptitle(f"{reader.name} reads your digit one pixel per step (blue: not read yet)", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def views(reader, shown, query, t):
    """What the page's outputs show for an Answer: the message, what the model sees, the likeliest classes, and the
    attention panel (Vision Mamba 2) or the reading after t pixels (sequential models); None where there is none."""
    seen, top3, panel = seen_picture(shown.digit), label(shown.probs, reader.classes), None
    if shown.digit is not None and reader.has_attention:
        seen, panel = seen_picture(shown.digit, query, reader.grid), attention_panel(shown.digit, shown.maps, query)
    if shown.digit is not None and reader.sequential:
        panel = reading_panel(reader, shown, t)
    return shown.message, seen, top3, panel


def attention_note(model):
    """What the attention panel draws, for this model's blocks."""
    form, over = explain.attention_matrix(model)
    return f"**Hidden attention**: each block's Mamba-2 SSD is y = M x, one matrix {form}; shown: |M| averaged " \
           f"over {over}."


def model_controls(gr, reader):
    """(token row, token column, pixels read, the panel they steer): sliders for what this model shows, and
    Gradio States for what it has not, so that every handler takes all three."""
    row = col = pixels = gr.State(1)
    if reader.has_attention:
        grid = reader.grid
        gr.Markdown(attention_note(reader.model))
        with gr.Row():
            row = gr.Slider(1, grid, value=grid // 2 + 1, step=1, label="token row", elem_id="row")
            col = gr.Slider(1, grid, value=grid // 2 + 1, step=1, label="token column", elem_id="col")
    if reader.sequential:
        pixels = gr.Slider(1, reader.model.config.seq_len, value=reader.model.config.seq_len, step=1,
                           label="pixels read")
    panel = gr.Image(label="hidden attention" if reader.has_attention else "reading", interactive=False,
                     visible=reader.has_attention or reader.sequential, elem_id="panel")
    return row, col, pixels, panel


def build_page(reader):
    """The page: Gradio's components, each event wired to the functions above."""
    import gradio as gr  # optional: only the page needs it

    with gr.Blocks(title="Vision Mamba 2 reads your handwriting") as page:
        gr.Markdown(f"## Vision Mamba 2 reads your handwriting ({reader.name})\nPick the brush (the pen at the "
                    f"canvas's left) and draw a digit, or upload a picture of one: the answer changes as you draw.")
        shown = gr.State(Answer(START))
        with gr.Row():
            canvas = gr.Sketchpad(type="pil", image_mode="RGB", canvas_size=(280, 280), layers=False, transforms=(),
                                  brush=gr.Brush(default_size=16, colors=["#000000"], color_mode="fixed"),
                                  label="draw a digit", elem_id="canvas")
            with gr.Column():
                seen = gr.Image(label="what the model sees (28x28)" + (": click a token" if reader.has_attention
                                                                        else ""),
                                interactive=False, elem_id="seen")
                upload = gr.File(file_types=["image"], label="or upload a picture", elem_id="upload", height=120)
            with gr.Column():
                top3 = gr.Label(num_top_classes=3, label="the likeliest classes", elem_id="prediction")
                message = gr.Markdown(START, elem_id="message")
        row, col, pixels, panel = model_controls(gr, reader)
        outputs = [message, seen, top3, panel]

        def show(answered, r, c, t):
            query = (int(r) - 1) * reader.grid + int(c) - 1 if reader.has_attention else None
            return answered, *views(reader, answered, query, int(t))

        def drawn(value, r, c, t):
            picture = value and value["composite"]
            return show(Answer(START) if picture is None else answer(reader, picture, "the canvas"), r, c, t)

        def uploaded(path, r, c, t):
            return show(answer(reader, path, os.path.basename(path)), r, c, t)

        def clicked(event: gr.SelectData):
            token = token_at(*event.index, 28 * SCALE, reader.grid)
            return np.add(divmod(token, reader.grid), 1).tolist()

        controls = [row, col, pixels]
        canvas.change(drawn, [canvas, *controls], [shown, *outputs], trigger_mode="always_last",
                      show_progress="hidden")
        upload.upload(uploaded, [upload, *controls], [shown, *outputs], show_progress="hidden")
        for control in controls:
            if isinstance(control, gr.Slider):
                control.change(show, [shown, *controls], [shown, *outputs], trigger_mode="always_last",
                               show_progress="hidden")
        if reader.has_attention:
            seen.select(clicked, None, [row, col])
    return page


def build_parser():
    p = Parser(prog="demo.py", formatter_class=HelpFormatter, description="A local page where you draw a digit "
               "and watch the model read it, live (needs: pip install gradio).")
    p.add_argument("--checkpoint", default=None, help=DEFAULT_HELP)
    p.add_argument("--port", type=int_at_least(1), default=7860, help="the page is at http://127.0.0.1:PORT")
    return p


def serve(args):
    try:
        import gradio  # noqa: F401 (build_page imports it again: here only whether it is installed)
    except ImportError:
        raise UsageError("demo.py needs Gradio, which the rest of the code does not: pip install gradio") from None
    if args.checkpoint is None:
        args.checkpoint, which = default_checkpoint()
        print(which)
    # one thread: for one picture at a time it is the fastest, and it stays fast when other work shares the CPU
    # (on 2 busy cores a stroke took 0.19 s on one thread, 2.7 s on two)
    torch.set_num_threads(1)
    page = build_page(open_reader(args.checkpoint))
    # Gradio checks that the page answers with an HTTP client that would ask a proxy set in the environment
    for name in ("no_proxy", "NO_PROXY"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    try:  # loopback only: the page is for the person at this machine
        page.launch(server_name="127.0.0.1", server_port=args.port, max_file_size="20mb", quiet=True,
                    prevent_thread_lock=True)
    except OSError as e:
        raise UsageError(f"--port {args.port}: cannot serve there ({e})") from None
    print(f"the page is at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    page.block_thread()
    return 0


def main(argv=None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page calls no one
    args = build_parser().parse_args(argv)
    sys.exit(exit_status(lambda: serve(args)))


if __name__ == "__main__":
    main()

"""
What a trained model does, in figures: test_model.py's --image, --attention and, for a sequential checkpoint, the
reading curves (and, live, demo.py's page). Each takes a model rebuilt by checkpoint.rebuild_model.

    your own pictures   prepared as MNIST was made (grayscale, ink bright on black, cropped, scaled into a 20x20
                        box, centred by its centre of mass in 28x28), classified, drawn beside what the model saw
    hidden attention    each Vision Mamba 2 block's SSD written as one matrix over the 7x7 tokens (y = M x,
                        M = L o C B^T: Mamba-2's state space duality), mapped back from the scan directions to
                        the grid, drawn over test digits
    reading             a sequential model's recurrent form (Mamba2.step): the class probabilities after each
                        pixel read; and the test accuracy after a quarter, half, ... of the pixels
"""

import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import rearrange
from matplotlib.patches import Rectangle
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage
from tqdm import tqdm

BOX, SIZE = 20, 28  # MNIST: each digit scaled into a 20x20 box, its centre of mass put at the centre of 28x28
# A digit is strokes. The deepest ink of MNIST's 70,000 train and test digits lies 6.7 pixels from the paper (the
# largest distance from a pixel above 0.5 to one below, in 28x28; 6.0 for all but 7 of them). A dot, a filled shape
# or noise, scaled into the 20x20 box as the digits were, is one solid blob 7.3 to 10 deep: deeper than this, it is no
# digit. (A smear three times longer than wide is shallower, and passes.)
DEEPEST_INK = 7
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L"
MAX_SIDE = 1024  # pictures are shrunk to this first: a phone photo's 4000 pixels add nothing but time


class BadPicture(Exception):
    """A file that is not an image, or an image without a digit on it."""


# ----------------------------------------------------------------------------------------------------
# Your own pictures

def load_picture(path):
    """The picture in the file at path, as picture_of gives it."""
    try:
        with Image.open(path) as im:
            return picture_of(im)  # PIL decodes lazily: a truncated file fails in there
    except Image.DecompressionBombError:
        raise BadPicture(f"too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise BadPicture("not an image (PIL cannot read it)") from None
    except OSError as e:
        # the system's errors (no such file, a folder, no permission) carry a strerror; PIL's, about what it found in
        # the file, only their message ("image file is truncated", "broken data stream when reading image file")
        what = e.strerror or (f"a damaged image file ({e})" if str(e) else "a damaged image file")
        raise BadPicture(f"cannot be read: {what}") from None


def picture_of(im):
    """A PIL image as given (H, W, 3), for the figure, and its gray levels (H, W), both in [0, 1]. Transparent
    pixels are paper: white under dark ink, black under light ink."""
    im = ImageOps.exif_transpose(im)  # a phone photo's rotation lives in its EXIF tag
    im.thumbnail((MAX_SIDE, MAX_SIDE))
    rgba = np.asarray(eight_bit(im).convert("RGBA"), dtype=np.float64) / 255
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    paper = 1.0 if np.average(rgb @ LUMA, weights=alpha[..., 0] + 1e-9) < 0.5 else 0.0
    rgb = alpha * rgb + (1 - alpha) * paper
    return rgb, rgb @ LUMA


def eight_bit(im):
    """16-bit and float gray images (a scanner's) stretched to 8 bits: PIL's conversion would clip them at 255."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    x = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.uint8(np.round(255 * (x - x.min()) / max(np.ptp(x), 1e-12))))


def otsu_threshold(x):
    """The gray level that best splits x's histogram in two (Otsu 1979: maximal between-class variance)."""
    counts, edges = np.histogram(x, bins=256)
    p = counts / counts.sum()
    w0, mu = np.cumsum(p), np.cumsum(p * edges[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return edges[1:][np.nanargmax(between)]


def ink_of(gray):
    """Ink bright on black, as MNIST: (H, W) in [0, 1], 0 on the paper, and the mask of the ink (Otsu's threshold).
    The border's median is the paper: further from the darkest pixel than from the lightest, the ink is dark and is
    inverted."""
    if gray.max() - gray.min() < 0.1:
        raise BadPicture("no ink: the picture is one flat shade")
    border = np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    x = flattened(1 - gray if border - gray.min() > gray.max() - border else gray)
    t = otsu_threshold(x)
    background, ink = x[x < t], np.percentile(x[x >= t], 90)
    deviation = 1.4826 * np.median(np.abs(background - np.median(background)))  # the paper's grain, robustly
    paper = np.median(background) + 3 * deviation  # the grain goes dark too
    if ink - paper < 0.1:
        raise BadPicture("no ink: nothing stands out from the paper")
    return np.clip((x - paper) / (ink - paper), 0, 1), x >= t


def flattened(x):
    """Bright ink x less the light on its paper (a photo's gradient from a lamp to one side, its vignetting): a
    quadratic surface fitted by least squares to the paper, the pixels under Otsu's threshold, refitted once to
    those under the threshold of what is left."""
    h, w = x.shape
    v, u = np.mgrid[0:1:h * 1j, 0:1:w * 1j]
    terms = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1).reshape(-1, 6)
    rest = x.ravel()
    for _ in range(2):
        paper = rest < otsu_threshold(rest)
        rest = rest - terms @ np.linalg.lstsq(terms[paper], rest[paper], rcond=None)[0]
    return np.clip(rest, 0, 1).reshape(h, w)


def digit_crop(x, mask):
    """x cut to the bounding box of the ink, specks dropped: blobs of under 5% of the largest one's pixels."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(mask, labels, index=range(1, n + 1))
    digit = np.isin(labels, np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1)
    rows, cols = ndimage.find_objects(digit.astype(int))[0]
    x = np.where(mask & ~digit, 0, x)  # the specks go dark
    return x[rows, cols], digit[rows, cols]


def thickened(x, mask):
    """Strokes at least a tenth of the digit's size thick, as a pen's are in MNIST: a thin pen on a big photo would
    shrink to a faint hairline in the 20x20 box. Width ~ 2 * area / outline (a long stroke: area l*w, outline 2l)."""
    outline = mask & ~ndimage.binary_erosion(mask, border_value=0)
    width, wanted = 2 * mask.sum() / max(outline.sum(), 1), max(x.shape) / 10
    if width >= wanted:
        return x
    return ndimage.grey_dilation(np.where(mask, x, 0), size=int(round(wanted - width)) + 1)  # not the grain


def mnist_like(gray):
    """Gray levels (H, W) in [0, 1] -> (28, 28) in [0, 1] as the MNIST digits were made (LeCun et al.): ink bright
    on black, cropped to the ink, scaled to fit a 20x20 box with its aspect ratio kept (antialiased), pasted into
    28x28 with its centre of mass at the centre. Before that, for photos: the light evened out and the specks
    dropped (ink_of, digit_crop), thin pens thickened."""
    x, mask = digit_crop(*ink_of(gray))
    x = thickened(x, mask)
    h, w = x.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.clip(np.asarray(Image.fromarray(x.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)), 0, 1)
    r, c = ndimage.center_of_mass(small)
    top = int(np.clip(round(SIZE / 2 - r), 0, SIZE - small.shape[0]))  # MNIST's centre of mass: (14.0, 14.0)
    left = int(np.clip(round(SIZE / 2 - c), 0, SIZE - small.shape[1]))
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    looks_like_a_digit(out)
    return out


def looks_like_a_digit(x):
    """Raise BadPicture if x (28, 28), prepared as MNIST's digits were, is one solid blob rather than strokes: the
    model would still name a class, often confidently (a dot: "0 (84%)"), for a shape it was never shown."""
    depth = ndimage.distance_transform_edt(x > 0.5).max()
    if depth > DEEPEST_INK:
        raise BadPicture(f"looks unlike any digit: its ink is one solid blob, not strokes (a dot, a filled shape or "
                         f"noise?): {depth:.1f} pixels deep once scaled to 28x28, where no MNIST digit's ink is deeper "
                         f"than 6.7")


@torch.no_grad()
def classify(model, digits, mean, std, device):
    """Probabilities (n, classes) of MNIST-like digits (n, 28, 28) in [0, 1], normalized as in training."""
    x = (torch.as_tensor(np.stack(digits))[:, None] - mean) / std  # (n, 1, 28, 28)
    return model(x.to(device)).float().softmax(dim=1).cpu().numpy()


def top3_line(path, probs, classes):
    first, *rest = np.argsort(-probs, kind="stable")[:3]
    others = ", ".join(f"{classes[k]} ({probs[k]:.1%})" for k in rest)
    return f"{path}: {classes[first]} ({probs[first]:.1%}), then {others}"


def plot_pictures(shown, classes):
    """One row per picture (path, as given (H, W, 3), what the model saw (28, 28), probabilities): the three side
    by side."""
    fig, axes = plt.subplots(len(shown), 3, figsize=(10, 2.7 * len(shown) + 0.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 2.2]})
    for (given, seen, bars), (path, picture, digit, probs) in zip(axes, shown):
        given.imshow(picture)
        given.set_title(short_name(path), fontsize=10)
        seen.imshow(digit, cmap="gray", vmin=0, vmax=1)
        seen.set_title("what the model saw (28x28)", fontsize=10)
        for ax in (given, seen):
            ax.set_xticks([])
            ax.set_yticks([])
        best = int(probs.argmax())
        bars.bar(range(len(probs)), 100 * probs, color=["tab:blue" if k == best else "0.7" for k in range(len(probs))])
        bars.bar_label(bars.containers[0], fmt=lambda v: f"{v:.0f}" if v >= 0.5 else "", fontsize=8)
        bars.set_xticks(range(len(probs)), classes)
        bars.set_ylim(0, 112)
        bars.set_ylabel("probability (%)")
        bars.set_title(f"prediction: {classes[best]} ({probs[best]:.1%})", fontsize=11)
    fig.suptitle("your pictures, prepared as MNIST was made: grayscale, ink bright on black (the paper's light "
                 "evened out, specks dropped,\nthin pens thickened), cropped, scaled into 20x20, centred by its centre "
                 "of mass in 28x28; probabilities: the model's softmax", fontsize=11)
    fig.tight_layout()
    return fig


def short_name(path, width=32):
    name = os.path.basename(path)
    return name if len(name) <= width else name[:width - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# The hidden attention of Vision Mamba 2: each block's SSD as a matrix over the 7x7 tokens

@torch.no_grad()
def mixer_inputs(model, x):
    """What each block's Mamba-2 mixer reads on images x (B, 1, H, W): a list of (B*k, L, C), "(b k) l c", the k
    scan directions' token sequences (a forward pre-hook on block.mixer)."""
    inputs = []
    hooks = [block.mixer.register_forward_pre_hook(lambda mixer, args: inputs.append(args[0]))
             for block in model.blocks]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def grid_order(M, order):
    """Step-order matrices M (B*k, ..., L, L), "(b k)", of a block whose k directions read the grid tokens `order`
    (k, L) -> (B, k, ..., L, L) in grid order: [..., g, g'] is what token g takes from token g' (P_d^T M_d P_d)."""
    M = rearrange(M, "(b k) ... i j -> b k ... i j", k=len(order))
    step = order.argsort(dim=1)  # (k, L): the step at which each direction reads grid token g
    return torch.stack([M[:, d][..., step[d], :][..., step[d]] for d in range(len(order))], dim=1)


@torch.no_grad()
def attention_maps(model, x):
    """Each block's token mixing on images x: (B, num_blocks, L, L) in grid order, |M| averaged over the heads and
    over the scan directions (the block averages its directions' outputs). Row g: how much token g takes from each
    token; the mean over rows: how much each token feeds the mean over tokens, which the model pools."""
    maps = [grid_order(block.mixer.ssd_matrix(u).abs().mean(dim=1), block.order).mean(dim=1)
            for block, u in zip(model.blocks, mixer_inputs(model, x))]
    return torch.stack(maps, dim=1).cpu()


QUERIES = 2  # query tokens shown per digit


def query_tokens(image, grid):
    """The first and the last token on the ink, in reading order: two ends of the digit."""
    patch = image.shape[-1] // grid
    ink = rearrange(image, "(g p) (h q) -> (g h) (p q)", p=patch, q=patch).mean(axis=1)  # (L,) mean pixel
    on_ink = np.flatnonzero(ink >= 0.5 * ink.max())
    return sorted({int(on_ink[0]), int(on_ink[-1])})[:QUERIES]


def attention_matrix(model):
    """(what each block's matrix M is, what the maps average it over), in the words of the attention figure and of
    demo.py's page: a causal block's SSD is masked attention in each scan direction; the non-causal SSD of --scan nc
    has no mask, no decay and no direction."""
    block = model.blocks[0]
    if not block.mixer.causal:
        return "M = C Bᵀ diag(dt A) per head (the non-causal SSD: no mask, no decay)", "the heads"
    k = len(block.order)
    return "M = L ∘ C Bᵀ per head (the SSD as masked attention)", "the heads" + (
        f" and the {k} scan directions, each mapped back to the grid" if k > 1 else "")


def plot_attention(images, titles, maps, *, name, matrix):
    """images (n, 28, 28) in [0, 1], a title each, maps (n, blocks, L, L) from attention_maps of the model in the
    checkpoint `name`, and its attention_matrix: per digit a panel of rows, the pooled output's shares and one per
    query token, with a column per block."""
    n, blocks, L, _ = maps.shape
    width = max(2.0 * (blocks + 1) + 1.2, 13)  # the caption's width at least
    fig = plt.figure(figsize=(width, (1 + QUERIES) * 2.0 * n + 1.4), layout="constrained")
    for sub, image, title, M in zip(fig.subfigures(n, 1), images, titles, maps):
        sub.suptitle(title, fontsize=11, fontweight="bold")
        queries = query_tokens(image, math.isqrt(L))
        axes = sub.subplots(1 + len(queries), blocks + 2, squeeze=False,
                            gridspec_kw={"width_ratios": [1] * (blocks + 1) + [0.07]})
        for r, q in enumerate([None, *queries]):
            share = M.mean(axis=1) if q is None else M[:, q]  # (blocks, L): the mean over rows, or row q
            attention_row(axes[r], image, share / share.sum(axis=-1, keepdims=True), q)
        for b in range(blocks):
            axes[0, b + 1].set_title(f"block {b + 1}", fontsize=10)
    grid, (form, over) = math.isqrt(L), matrix
    fig.suptitle(f"{name}: how each block's Mamba-2 mixes the {grid}x{grid} tokens. Its scan is y = Mx, one matrix "
                 f"{form};\nthe short conv before it, the gate and the skip Dx are not in M. Shown: |M| averaged over "
                 f"{over}.\n"
                 "Rows 'pooled output': how much each token feeds the mean over tokens (the mean of M's rows); "
                 "'query token': what that token (green) takes from each token (its row of M).\n"
                 f"Each map is scaled to sum to 1 over the tokens (uniform: 1/{L} = {1 / L:.3f}); one colour scale "
                 "per row; cyan: the digit's outline.", fontsize=11)
    return fig


def attention_row(axes, image, share, query):
    """One row of plot_attention: the digit, then each block's share (L,) over the token grid, the query token
    (an index into it, or None for the pooled output) boxed, and a colour bar."""
    grid, side = math.isqrt(share.shape[-1]), image.shape[-1]
    patch = side / grid
    extent = (-0.5, side - 0.5, side - 0.5, -0.5)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_ylabel("pooled output" if query is None else "query token\n(row {}, col {})".format(
        *(np.array(divmod(query, grid)) + 1)), fontsize=10)
    for ax, block_share in zip(axes[1:-1], share):
        im = ax.imshow(block_share.reshape(grid, grid), cmap="magma", vmin=0, vmax=share.max(), extent=extent,
                       interpolation="nearest")
        ax.contour(image, levels=[0.5], colors="cyan", linewidths=0.8)
    for ax in axes[:-1]:
        ax.set_xticks([])
        ax.set_yticks([])
        if query is not None:
            r, c = divmod(query, grid)
            ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, edgecolor="lime",
                                   linewidth=2))
    bar = axes[-1].figure.colorbar(im, cax=axes[-1])
    bar.set_label("share", fontsize=9)
    bar.ax.tick_params(labelsize=8)


# ----------------------------------------------------------------------------------------------------
# Reading pixel by pixel: a sequential model's recurrent form

UNREAD = "#3d7cc9"  # the pixels a sequential model has not read yet: blue, apart from ink and paper


@torch.no_grad()
def accuracy_while_reading(model, split, steps):
    """A SequentialMamba2's test accuracy after each of `steps` pixels read (the last = seq_len). The model is
    causal, so one parallel pass per batch tells what it knows after every step (readout_after_steps): the same
    numbers as seq_len recurrent steps, a hundred times faster on a CPU."""
    correct = dict.fromkeys(steps, 0)
    for x, y in tqdm(split.batches(), total=split.num_batches, desc="reading", unit="batch", leave=False,
                     dynamic_ncols=True):
        logits = readout_after_steps(model, x, at=steps)  # (B, len(steps), classes)
        for i, t in enumerate(steps):
            correct[t] += int((logits[:, i].argmax(dim=1) == y).sum())
    return {t: n / split.num_samples for t, n in correct.items()}


@torch.no_grad()
def probabilities_while_reading(model, x):
    """(n, seq_len, classes): the class probabilities of items x after each step, from step_logits."""
    return torch.stack([logits.float().softmax(dim=1) for _, logits in model.step_logits(x)], dim=1).cpu().numpy()


def readout_after_steps(model, x, at=None):
    """(n, seq_len, classes): the logits after each step from one parallel pass: the model is causal, so step t's
    features saw only the pixels read by then, and the readout after t steps is the head on the mean of their first
    t (or on the t-th), as step_logits computes it step by step. at: only after these step counts (n, len(at), ...)."""
    f = model.norm(model.features(x))  # (n, L, D)
    if model.config.readout == "mean":
        f = f.cumsum(dim=1) / torch.arange(1, f.shape[1] + 1, device=f.device)[:, None]
    return model.head(f if at is None else f[:, torch.tensor(at, device=f.device) - 1])


@torch.no_grad()
def probabilities_at_every_step(model, x):
    """probabilities_while_reading's numbers (n, seq_len, classes) from one parallel pass instead of seq_len
    recurrent steps."""
    return readout_after_steps(model, x).float().softmax(dim=-1).cpu().numpy()


def partly_read(image, order, t):
    """image (H, W) with only the pixels of the first t steps of the reading order (H*W,): the others NaN."""
    seen = np.full(image.size, np.nan)
    seen[order[:t]] = image.ravel()[order[:t]]
    return seen.reshape(image.shape)


def plot_reading(images, labels, titles, probs, order, steps, classes, name):
    """Per item a row: the image as read after each of `steps` (snapshots), then the class probabilities (n, L,
    classes) after every step, the true class's (labels (n,)) thick. images (n, H, W), with H = 1 for 1-D
    signals."""
    n, L, _ = probs.shape
    fig, axes = plt.subplots(n, len(steps) + 1, squeeze=False, figsize=(1.7 * len(steps) + 7.5, 2.3 * n + 1.2),
                             gridspec_kw={"width_ratios": [1] * len(steps) + [4.5]}, layout="constrained")
    unread = plt.get_cmap("gray").with_extremes(bad=UNREAD)
    for row, image, label, title, p in zip(axes, images, labels, titles, probs):
        for ax, t in zip(row, steps):
            seen = partly_read(image, order, t)
            if image.shape[0] == 1:  # a 1-D signal: the values read, over the whole in the unread colour
                ax.plot(image[0], color=UNREAD, alpha=0.6)
                ax.plot(seen[0], color="black", marker="o", markersize=2.5)
            else:
                ax.imshow(seen, cmap=unread, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{t / L:.0%} read ({t:,})", fontsize=9)
        curves = row[-1]
        for k, name_k in enumerate(classes):
            curves.plot(np.arange(1, L + 1), p[:, k], color=plt.get_cmap("tab10")(k % 10), label=name_k,
                        linewidth=2.6 if k == label else 1)
        for t in steps:
            curves.axvline(t, color="0.6", linestyle=":", linewidth=1)
        curves.set(xlim=(1, L), ylim=(-0.02, 1.02), ylabel="probability")
        curves.set_title(title, fontsize=10)
    axes[-1, -1].set_xlabel("pixels read")
    axes[0, -1].legend(title="class", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{name} reads each test image one pixel per step (Mamba-2's recurrent form, a fixed-size state): "
                 "the class probabilities\nafter every step (the true class's curve thick) and the image as read "
                 "so far (blue: not yet read)", fontsize=11)
    return fig

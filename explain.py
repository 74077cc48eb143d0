"""
What a trained model does, in figures: test_model.py's --image, --attention and, for a sequential checkpoint, the
reading curves. Each takes a model rebuilt by test_model.build_model and writes one PNG.

    your own pictures   prepared as MNIST was made (grayscale, ink bright on black, cropped, scaled into a 20x20
                        box, centred by its centre of mass in 28x28), classified, drawn beside what the model saw
"""

import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

BOX, SIZE = 20, 28  # MNIST: each digit scaled into a 20x20 box, its centre of mass put at the centre of 28x28
MAX_SIDE = 1024  # pictures are shrunk to this first: a phone photo's 4000 pixels add nothing but time


class BadPicture(Exception):
    """A file that is not an image, or an image without a digit on it."""


# ----------------------------------------------------------------------------------------------------
# Your own pictures

def load_picture(path):
    """The picture as given (for the figure, RGB) and its gray levels (H, W) in [0, 1]. Transparent pixels count as
    background: the paper is white under dark ink, black under light ink."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # a phone photo's rotation lives in its EXIF tag
            im.thumbnail((MAX_SIDE, MAX_SIDE))
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise BadPicture("not an image (PIL cannot read it)") from None
    except OSError as e:
        raise BadPicture(f"cannot be read ({e.strerror or type(e).__name__})") from None
    gray, alpha = rgba[..., :3] @ [0.299, 0.587, 0.114], rgba[..., 3]  # ITU-R 601 luma, as PIL's "L"
    if alpha.min() < 1:
        paper = 1.0 if np.average(gray, weights=alpha + 1e-9) < 0.5 else 0.0
        gray = alpha * gray + (1 - alpha) * paper
    return rgba[..., :3] * alpha[..., None] + (1 - alpha[..., None]), gray


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
    paper = np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    x = flattened(1 - gray if paper - gray.min() > gray.max() - paper else gray)
    t = otsu_threshold(x)
    paper, ink = x[x < t], np.percentile(x[x >= t], 90)
    paper = np.median(paper) + 3 * 1.4826 * np.median(np.abs(paper - np.median(paper)))  # its grain goes dark too
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
    28x28 with its centre of mass at the centre."""
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
    return out


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
    fig.suptitle("your pictures, prepared as MNIST was made: grayscale, ink bright on black, cropped, scaled into "
                 "20x20,\ncentred by its centre of mass in 28x28; probabilities: the model's softmax", fontsize=11)
    fig.tight_layout()
    return fig


def short_name(path, width=32):
    name = os.path.basename(path)
    return name if len(name) <= width else name[:width - 3] + "..."

"""
Evaluate a checkpoint of train.py on its test set: how good the model is, and where it fails.

    python test_model.py                                     # vision_mamba2_mnist.pth on the MNIST test set
    python test_model.py --checkpoint fashion.pth --out-dir eval/
    python test_model.py --image my_digit.png photo.jpg      # classify your own pictures of digits
    python test_model.py --attention                         # how each block's Mamba-2 mixes the 7x7 tokens

Without --checkpoint it evaluates ./vision_mamba2_mnist.pth, what `python train.py` writes, and where there is none
the pretrained model that comes with the code, pretrained/vision_mamba2_mnist.pth; its first line says which.

The model is rebuilt from the config stored in the checkpoint, which is read with weights_only=True: a
checkpoint may hold tensors and plain values, never code to run. The whole test set goes through the
model once, in batches, and every output comes from those predictions:

    stdout                          accuracy, per-class accuracy, the most frequent confusions, sklearn's report
    confusion_matrix.png            annotated heatmap: rows are the true class, columns the predicted one
    predictions_visualization.png   random test images with prediction, confidence and truth; mistakes in red
    confident_mistakes.png          the mistakes the model was surest of
    metrics.json                    the numbers, for scripts
    reading.png                     sequential checkpoints (smnist, psmnist): a second pass, in Mamba-2's recurrent
                                    form, one pixel per step: the class probabilities after each pixel read; stdout
                                    and metrics.json add the accuracy after 25, 50, 75 and 100 % of the pixels

With --image, only your pictures: one line each (the three likeliest classes) and my_digits.png; with --attention,
only attention.png (explain.py makes both figures).
"""

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: plots are written to files, never shown
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
from matplotlib.colors import LogNorm
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support
from torch.utils.data import DataLoader
from tqdm import tqdm

import explain
from checkpoint import (DEFAULT_HELP, atomic_write, default_checkpoint, load_checkpoint, model_kind,
                        rebuild_model)
from cli import HelpFormatter, Parser, UsageError, device_name, exit_status, int_at_least, resolve_device
from data import DATASETS, DeviceSplit, load_datasets
from steps import keep_freed_memory_in_process
from vision_mamba2 import count_params, describe_backend

ATTENTION_DIGITS = 4  # test digits in --attention's figure
READING_DIGITS = 4  # and in reading.png, a sequential model's
READ_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the pixels, after which a sequential model's accuracy is measured


def build_parser():
    p = Parser(prog="test_model.py", formatter_class=HelpFormatter,
                     description="Evaluate a train.py checkpoint on the whole test set: accuracy, per-class accuracy, "
                                 "classification report, confusion matrix, sample predictions and the most confident "
                                 "mistakes (PNG files), and metrics.json.")
    p.add_argument("--checkpoint", default=None, help=DEFAULT_HELP)
    p.add_argument("--data-dir", default="./data",
                   help="torchvision root: <data-dir>/MNIST/raw/ or <data-dir>/FashionMNIST/raw/")
    p.add_argument("--dataset", choices=list(DATASETS), default=None,
                   help="test set to evaluate on; the images are normalized as in training whatever it is "
                        "(default: the one the checkpoint was trained on)")
    p.add_argument("--out-dir", default=".", help="where the PNG files and metrics.json go")
    p.add_argument("--device", type=device_name, default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--batch-size", type=int_at_least(1), default=64,
                   help="test images per forward pass; on a CPU larger batches only fall out of the cache "
                        "(bench.py eval)")
    p.add_argument("--num-samples", type=int_at_least(1), default=25,
                   help="images in each grid: random test images, and the most confident mistakes")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="picks the random test images shown")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--image", nargs="+", metavar="PATH",
                      help="classify your own pictures of digits instead (any size, colour or gray, a photo): the "
                           "three likeliest classes of each, and <out-dir>/my_digits.png (default: none, evaluate "
                           "the test set)")
    mode.add_argument("--attention", action="store_true",
                      help="instead of evaluating, draw <out-dir>/attention.png: how each block's Mamba-2 mixes the "
                           "7x7 tokens of a few test digits (Vision Mamba 2 checkpoints)")
    return p


# ----------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict(model, split):
    """Softmax probabilities (N, classes) and labels (N,) of a whole split, as numpy arrays: one batched pass."""
    probs, labels = [], []
    for x, y in tqdm(split.batches(), total=split.num_batches, desc="test", unit="batch", leave=False,
                     dynamic_ncols=True):
        # x : (B, 1, H, W) normalized, y : (B,)
        probs.append(model(x).float().softmax(dim=1).cpu())
        labels.append(y.cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def compute_metrics(preds, labels, classes):
    ids = list(range(len(classes)))
    cm = confusion_matrix(labels, preds, labels=ids)  # (C, C): rows true class, columns predicted
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    per_class = {name: {"accuracy": float(recall[k]) if support[k] else None, "correct": int(cm[k, k]),
                        "support": int(support[k]), "precision": float(precision[k]), "f1": float(f1[k])}
                 for k, name in enumerate(classes)}
    return {"accuracy": accuracy_score(labels, preds), "correct": int(cm.trace()), "num_images": len(labels),
            "classes": list(classes), "per_class": per_class, "confusion_matrix": cm.tolist()}


def top_confusions(cm, k=5):
    """The k most frequent (true, predicted, count) mistakes."""
    off = np.array(cm)
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    return [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.unravel_index(flat, off.shape)) if off[t, p]]


# ----------------------------------------------------------------------------------------------------
# Plots

def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_confusion_matrix(cm, classes, title, path):
    cm = np.array(cm)
    correct = np.eye(len(cm), dtype=bool)
    fig, ax = plt.subplots(figsize=(7.5, 7))
    common = dict(annot=True, fmt="d", annot_kws={"fontsize": 9}, square=True, linewidths=0.5, linecolor="0.85",
                  cbar=False, xticklabels=classes, yticklabels=classes, ax=ax)
    # the diagonal (correct) in blue; the mistakes in red, on a log scale so that a single one still shows
    sns.heatmap(cm, mask=~correct, cmap="Blues", vmin=0, vmax=cm.max(), **common)
    sns.heatmap(cm, mask=correct | (cm == 0), cmap="Reds", norm=LogNorm(vmin=0.5, vmax=max(cm[~correct].max(), 2)),
                **common)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, pad=12)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    plt.setp(ax.get_yticklabels(), rotation=0)
    save_figure(fig, path)


def plot_grid(images, titles, wrong, suptitle, path):
    """Images (n, H, W) uint8, or 1-D signals (n, 1, L), in a near-square grid, one title each; the wrong ones
    in red."""
    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(1.8 * cols, 4), 2.1 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title, bad in zip(axes.flat, images, titles, wrong):
        ax.axis("on")
        if image.shape[0] == 1:  # a signal (MNIST-1D): its curve
            ax.plot(image[0], color="black", linewidth=1)
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        color = "red" if bad else "black"
        ax.set_title(title, fontsize=9, color=color)
        for spine in ax.spines.values():
            spine.set(color=color, linewidth=2 if bad else 0.5)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(suptitle)
    fig.tight_layout()
    save_figure(fig, path)


def tile_titles(idx, preds, confidence, labels, classes):
    return [f"pred {classes[preds[i]]} ({confidence[i]:.1%})\ntrue {classes[labels[i]]}" for i in idx]


# ----------------------------------------------------------------------------------------------------
# Main

def classify_pictures(args, ckpt, model, device):
    """--image: each picture prepared as MNIST was made, one line of its three likeliest classes, and one figure;
    a file that is no picture of a digit is one line on stderr and exit status 2, after the others are answered."""
    if model_kind(ckpt)[0] != "image" or DATASETS[ckpt["dataset"]].signals:
        raise UsageError(f"--image needs an image classifier (train.py --task image); {args.checkpoint} reads "
                         f"{ckpt['dataset']} {model_kind(ckpt)[0]} sequences")
    norm, classes = ckpt["normalization"], DATASETS[ckpt["dataset"]].class_names
    shown, failed = [], 0
    for path in args.image:
        try:
            given, gray = explain.load_picture(path)
            digit = explain.mnist_like(gray)
        except explain.BadPicture as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = explain.classify(model, [digit], norm["mean"], norm["std"], device)[0]
        print(explain.top3_line(path, probs, classes))
        shown.append((path, given, digit, probs))
    if shown:
        out = os.path.join(args.out_dir, "my_digits.png")
        save_figure(explain.plot_pictures(shown, classes), out)
        print(f"wrote {out}")
    return 2 if failed else 0


def of_distinct_classes(labels, seed, n):
    """n test items of as many classes: in a random order drawn with seed, the first of each class."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return order[np.sort(np.unique(labels[order], return_index=True)[1])][:n]


def draw_attention(args, model, split, classes, norm):
    """--attention: attention.png, for ATTENTION_DIGITS test digits of as many classes, drawn with --seed."""
    labels = split.labels.cpu().numpy()
    idx = of_distinct_classes(labels, args.seed, ATTENTION_DIGITS)
    images = split.images[idx].float() / 255  # (n, 1, H, W)
    x = (images - norm["mean"]) / norm["std"]
    with torch.no_grad():
        probs = model(x).float().softmax(dim=1).cpu().numpy()
    titles = [f"test image {i}: a {classes[labels[i]]}, predicted {classes[p.argmax()]} ({p.max():.1%})"
              for i, p in zip(idx, probs)]
    out = os.path.join(args.out_dir, "attention.png")
    maps = explain.attention_maps(model, x).numpy()
    save_figure(explain.plot_attention(images[:, 0].cpu().numpy(), titles, maps, name=os.path.basename(args.checkpoint),
                                       matrix=explain.attention_matrix(model)), out)
    print(f"wrote {out}")
    return 0


def read_pixel_by_pixel(args, model, test, split, labels, classes, path):
    """A sequential model while it reads: the test accuracy after READ_FRACTIONS of the pixels (the causal model's
    parallel pass), and reading.png, drawn from the recurrent form (Mamba2.step: one pixel per step, a fixed-size
    state) and checked against the parallel pass at every step. Returns the numbers for metrics.json."""
    L = model.config.seq_len
    steps = [round(f * L) for f in READ_FRACTIONS]
    accuracy = explain.accuracy_while_reading(model, split, steps)
    idx = of_distinct_classes(labels, args.seed, READING_DIGITS)
    x, _ = next(DeviceSplit(DataLoader(torch.utils.data.Subset(test, idx), batch_size=len(idx)),
                            split.device, split.mean, split.std).batches())
    curves = explain.probabilities_while_reading(model, x)
    gap = float(np.abs(curves - explain.probabilities_at_every_step(model, x)).max())
    print("\nreading pixel by pixel:")
    for f, t in zip(READ_FRACTIONS, steps):
        print(f"  after {f:4.0%} ({t:,} pixels): accuracy {accuracy[t]:.2%}")
    print(f"  the recurrent form on {len(idx)} test images, {L:,} steps: probabilities within {gap:.1e} of the "
          f"parallel pass's at every step")
    titles = [f"test image {i}: a {classes[labels[i]]}, read as {classes[p[-1].argmax()]} ({p[-1].max():.1%})"
              for i, p in zip(idx, curves)]
    save_figure(explain.plot_reading(split.images[idx, 0].cpu().numpy(), labels[idx], titles, curves,
                                     model.permutation.cpu().numpy(), steps, classes,
                                     os.path.basename(args.checkpoint)), path)
    return {"pixels_read": steps, "fractions": list(READ_FRACTIONS), "accuracy": [accuracy[t] for t in steps],
            "recurrent_images": len(idx), "max_probability_difference": gap}


def load_test_split(args, ckpt, model, device):
    """(dataset name, torchvision test set, the test set as one tensor on the device, normalized as the model saw
    its training data), after saying what is evaluated where."""
    trained_on = ckpt["dataset"]
    dataset = args.dataset or trained_on
    if dataset not in DATASETS:
        raise UsageError(f"{args.checkpoint} was trained on {dataset!r}, a dataset this code does not know: "
                         f"pass --dataset ({', '.join(DATASETS)})")
    _, test = load_datasets(dataset, args.data_dir)
    norm = ckpt["normalization"]
    split = DeviceSplit(DataLoader(test, batch_size=args.batch_size), device, norm["mean"], norm["std"])
    task, arch = model_kind(ckpt)
    backend = f"backend {describe_backend(model.config.backend, device)}, " if arch == "mamba2" else ""
    print(f"checkpoint {args.checkpoint}: task {task}, arch {arch}, epoch {ckpt['epoch']}, trained on "
          f"{trained_on}, {count_params(model):,} parameters, {backend}device {device}")
    shape = tuple(split.images.shape[1:])  # (C, H, W) of one item
    try:
        model.config.check_input((1, *shape))
    except ValueError:
        raise UsageError(f"the {dataset} test set holds items of shape {shape}, which this model, trained on "
                         f"{trained_on}, does not read: pass the --dataset it was trained on") from None
    return dataset, test, split


def draw_figures(args, dataset, split, probs, labels, metrics):
    """confusion_matrix.png, predictions_visualization.png, confident_mistakes.png; returns their paths."""
    preds, confidence, classes = probs.argmax(axis=1), probs.max(axis=1), metrics["classes"]
    paths = {name: os.path.join(args.out_dir, name) for name in
             ("confusion_matrix.png", "predictions_visualization.png", "confident_mistakes.png")}
    title = (f"{os.path.basename(args.checkpoint)} on the {dataset} test set: accuracy {metrics['accuracy']:.2%} "
             f"({metrics['num_images']:,} images)\nblue: correct; red: mistakes (log colour scale)")
    plot_confusion_matrix(metrics["confusion_matrix"], classes, title, paths["confusion_matrix.png"])

    rng = np.random.default_rng(args.seed)
    shown = rng.choice(len(labels), size=min(args.num_samples, len(labels)), replace=False)
    images = split.images[:, 0].cpu().numpy()  # (N, H, W) as stored: uint8 pixels, or (N, 1, L) signals
    shown_wrong = preds[shown] != labels[shown]
    plot_grid(images[shown], tile_titles(shown, preds, confidence, labels, classes), shown_wrong,
              f"{len(shown)} random {dataset} test images ({shown_wrong.sum()} wrong, in red)",
              paths["predictions_visualization.png"])

    wrong = np.flatnonzero(preds != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:args.num_samples]
    plot_grid(images[worst], tile_titles(worst, preds, confidence, labels, classes), [True] * len(worst),
              f"the {len(worst)} most confident of {len(wrong):,} mistakes" if len(wrong) else
              f"no mistakes on the {len(labels):,} test images",
              paths["confident_mistakes.png"])
    return paths


def print_report(dataset, metrics, labels, preds):
    """Accuracy, per-class accuracy, the most frequent confusions and sklearn's classification report."""
    classes = metrics["classes"]
    print(f"\n{dataset} test set: accuracy {metrics['accuracy']:.2%} ({metrics['correct']:,} / "
          f"{metrics['num_images']:,})")
    print("\nper-class accuracy:")
    width = max(map(len, classes))
    for name, m in metrics["per_class"].items():
        class_acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.2%}"
        print(f"  {name:<{width}}  {class_acc:>7}  ({m['correct']:,} / {m['support']:,})")
    confusions = top_confusions(metrics["confusion_matrix"])
    if confusions:
        print("\nmost frequent mistakes (true -> predicted):")
        for t, p, count in confusions:
            print(f"  {classes[t]} -> {classes[p]}: {count:,}")
    print("\nclassification report:")
    print(classification_report(labels, preds, labels=list(range(len(classes))), target_names=classes, digits=4,
                                zero_division=0))


def evaluate(args):
    """The whole test set once through the model; every figure, metrics.json and the printed report come from those
    predictions. The files are written before the report is printed, so that `| head` loses nothing."""
    if args.checkpoint is None:
        args.checkpoint, which = default_checkpoint()
        print(which)
    ckpt = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = rebuild_model(ckpt, args.checkpoint, device)
    if args.image:
        return classify_pictures(args, ckpt, model, device)
    if args.attention and model_kind(ckpt) != ("image", "mamba2"):
        raise UsageError(f"--attention draws Vision Mamba 2's blocks (train.py --task image --arch mamba2); "
                         f"{args.checkpoint} holds a {'/'.join(model_kind(ckpt))} model")
    dataset, test, split = load_test_split(args, ckpt, model, device)
    if args.attention:
        return draw_attention(args, model, split, DATASETS[dataset].class_names, ckpt["normalization"])
    try:
        probs, labels = predict(model, split)
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory on {device}: lower --batch-size (now {args.batch_size})") from None
    preds = probs.argmax(axis=1)
    metrics = compute_metrics(preds, labels, test.classes)
    os.makedirs(args.out_dir, exist_ok=True)
    paths = draw_figures(args, dataset, split, probs, labels, metrics)
    task, arch = model_kind(ckpt)
    report = {"checkpoint": {"path": args.checkpoint, "task": task, "arch": arch, "epoch": ckpt["epoch"],
                             "trained_on": ckpt["dataset"]}, "dataset": dataset, **metrics}
    if task in ("smnist", "psmnist"):
        paths["reading.png"] = os.path.join(args.out_dir, "reading.png")
        report["reading"] = read_pixel_by_pixel(args, model, test, split, labels, DATASETS[dataset].class_names,
                                                paths["reading.png"])
    paths["metrics.json"] = os.path.join(args.out_dir, "metrics.json")
    atomic_write(paths["metrics.json"], lambda f: f.write(json.dumps(report, indent=2).encode()))
    print_report(dataset, metrics, labels, preds)
    print(f"wrote {', '.join(paths.values())}")
    return 0


def main(argv=None):
    # glibc hands large freed blocks back to the OS, so each batch page-faults its activations in again:
    # without this, the default model's batches of 64 ran 1.4x slower on a CPU, of 256 3x (steps.py)
    keep_freed_memory_in_process()
    args = build_parser().parse_args(argv)

    sys.exit(exit_status(lambda: evaluate(args)))


if __name__ == "__main__":
    main()

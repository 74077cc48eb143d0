"""What the tests share: the repository, a subprocess environment, MNIST-layout synthetic data, checkpoint reading.
(The fixtures built on them live in conftest.py.)"""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import MNIST

import train

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 300, 100  # images in conftest.py's synthetic dataset
# One thread: for a model this small it is the fastest, and it keeps its speed when other jobs share the
# CPU (two threads on two busy cores were 20x slower here). And no test may download anything, even on a
# machine that could: an unreachable proxy makes torchvision's download fail at once.
PROC_ENV = {**{k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}, "OMP_NUM_THREADS": "1",
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def write_idx(path, array):
    """The IDX format of the MNIST files: big-endian magic (2051 images, 2049 labels), dims, uint8 data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 2051 if array.ndim == 3 else 2049))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def synthetic_digits(n, rng):
    """Class k is a bright square of side 4 + 2k somewhere on a noisy 28x28 canvas: learnable in a few steps."""
    labels = rng.integers(0, 10, n)
    images = rng.normal(0, 20, (n, 28, 28))
    for image, k in zip(images, labels):
        side = 4 + 2 * k
        r, c = rng.integers(0, 28 - side + 1, 2)
        image[r:r + side, c:c + side] += 255
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def metrics_on_the_test_set(model, ckpt, data_dir):
    """(loss, accuracy) of `model` on the MNIST test set in data_dir, computed here, apart from train.py: the images
    normalized as the checkpoint says, the loss with the run's label smoothing (as train.py reports it)."""
    test = MNIST(data_dir, train=False)
    norm = ckpt["normalization"]
    x = (test.data[:, None].float() / 255 - norm["mean"]) / norm["std"]
    logits = model.eval()(x)
    loss = F.cross_entropy(logits, test.targets, label_smoothing=train.LABEL_SMOOTHING).item()
    return loss, (logits.argmax(dim=1) == test.targets).sum().item() / len(test.targets)


def run_script(script, *argv, **kwargs):
    """python <script> <argv> from the repository, as a user would run it: the CompletedProcess, text output."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], capture_output=True, text=True,
                          env=PROC_ENV, timeout=300, **kwargs)


def train_in_process(argv):
    """train.main(argv) in this process, on one thread (a module fixture runs before conftest's one_thread): its exit
    status."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            train.main([str(a) for a in argv])
        except SystemExit as e:
            return e.code
    finally:
        torch.set_num_threads(threads)

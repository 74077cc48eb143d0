# Must stay the first statement of this file, before anything imports triton (directly or via
# mamba_ssm, e.g. a test importing mamba_ssm.modules.ssd_minimal): Triton decides at `@triton.jit`
# decoration time whether a kernel is compiled or interpreted, so TRITON_INTERPRET=1 has to be in the
# environment before mamba_ssm's Triton kernels are imported. tests/test_official_equivalence.py needs
# the interpreter to run the official Mamba-2 kernels on CPU tensors (see tests/official_cpu.py).
# Harmless for our product, which never runs Triton on CPU. setdefault: an explicit value wins.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402 (after the environment is set)
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import N_TEST, N_TRAIN, synthetic_digits, write_idx  # noqa: E402


# One thread in-process too: see PROC_ENV in helpers.py
@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny synthetic dataset (N_TRAIN train, N_TEST test images) in torchvision's raw layout, as MNIST and, the same
    images, as Fashion-MNIST: train.py and test_model.py read it like the real thing, nothing is downloaded."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in [("train", N_TRAIN), ("t10k", N_TEST)]:
        images, labels = synthetic_digits(n, rng)
        for folder in ("MNIST", "FashionMNIST"):
            raw = root / folder / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            write_idx(raw / f"{split}-images-idx3-ubyte", images)
            write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root

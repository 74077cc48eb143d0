# Triton's interpreter runs the official Mamba-2 kernels on CPU tensors for the equivalence tests (tests/official_cpu.py).
# Triton decides it when a kernel is decorated, i.e. when mamba_ssm is first imported, and reads it process-wide: so it
# is set here, before anything imports triton, and only on a machine without CUDA, where nothing else runs Triton. With
# a GPU the CUDA tests run the compiled kernels, and the equivalence tests skip (they run in a process of their own:
# TRITON_INTERPRET=1 python -m pytest tests/test_official_equivalence.py). setdefault: an explicit value wins.
import os
import sys

import numpy as np
import pytest
import torch  # (imports no triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import N_TEST, N_TRAIN, synthetic_digits, write_idx  # noqa: E402 (after the environment is set)


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


def pytest_terminal_summary(terminalreporter):
    """After a run of the equivalence tests: the largest relative error between the twin and the official kernels."""
    module = sys.modules.get("test_official_equivalence")
    if module is not None and module.WORST["what"]:
        terminalreporter.write_line(f"the twin against the official Mamba-2 kernels, largest relative error: "
                                    f"{module.WORST['error']:.1e} ({module.WORST['what']}; the bound: {module.RTOL:.0e})")

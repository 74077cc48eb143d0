"""
What only a CUDA GPU can check (every test here skips without one): the official kernels against the portable
twin on the GPU, and train.py's --cuda-graphs against eager training. When a GPU is at hand, run these first:

    TRITON_INTERPRET=0 TRITON_F32_DEFAULT=ieee python -m pytest tests/test_cuda.py -q -rs

(conftest.py turns Triton's CPU interpreter on for the CPU suite; the official kernels must run compiled here.
TRITON_F32_DEFAULT=ieee makes their fp32 matmuls full fp32 instead of TF32, so they are compared tightly.)
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import steps
from baselines import CNN, CNNConfig
from helpers import PROC_ENV, REPO
from vision_mamba2 import create_vision_mamba2_model, load_official_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# fp32 tl.dot rounds its inputs to TF32 (10-bit mantissa) unless told otherwise
OFFICIAL_TOLERANCE = 1e-4 if os.environ.get("TRITON_F32_DEFAULT") == "ieee" else 2e-2


def official_or_skip():
    if INTERPRETED:
        pytest.skip("Triton's interpreter is on: run with TRITON_INTERPRET=0 to test the compiled official kernels")
    if load_official_kernels() is None:
        pytest.skip("mamba-ssm is not installed (README: GPU install)")


@pytest.fixture
def exact_fp32():
    """Full fp32 matmuls in PyTorch (no TF32) for the comparisons; restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_official_kernels_match_the_portable_twin(exact_fp32):
    """The default model, same weights and batch, fp32: logits and every gradient (the CPU suite compares the same
    kernels, interpreted, to 1e-5)."""
    official_or_skip()
    torch.manual_seed(0)
    portable = create_vision_mamba2_model(backend="portable", dropout=0.0).cuda()  # the same function, no masks
    official = copy.deepcopy(portable)
    for block in official.blocks:
        block.mixer.backend = "official"
    x = torch.randn(8, 1, 28, 28, device="cuda")
    outputs = {}
    for name, model in (("portable", portable), ("official", official)):
        logits = model(x)
        logits.logsumexp(-1).mean().backward()
        outputs[name] = logits, {n: p.grad for n, p in model.named_parameters()}
    assert relative_error(outputs["official"][0], outputs["portable"][0]) < OFFICIAL_TOLERANCE
    for n, grad in outputs["portable"][1].items():
        assert relative_error(outputs["official"][1][n], grad) < OFFICIAL_TOLERANCE, n


def train_steps(model, batches, graphed):
    """Losses of AdamW steps over `batches`; through steps.GraphedTraining if `graphed` (captured for the first
    batch's shape: the others run eagerly)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_model = steps.GraphedTraining(model, torch.zeros_like(batches[0][0])) if graphed else model
    step_model.train()
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(step_model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["portable", "official", "cnn"])
def test_graphed_training_matches_eager(arch, exact_fp32):
    """Five full batches replayed from the graphs, then a smaller one run eagerly: the same losses, weights and
    BatchNorm statistics as eager training (no dropout: its random draws differ between the two)."""
    if arch == "official":
        official_or_skip()
    torch.manual_seed(0)
    model = (CNN(CNNConfig(dropout=0.0)) if arch == "cnn" else
             create_vision_mamba2_model(backend=arch, dropout=0.0, num_blocks=2)).cuda()
    twin = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(n, 1, 28, 28, device="cuda", generator=gen),
                torch.randint(0, 10, (n,), device="cuda", generator=gen)) for n in (32,) * 5 + (12,)]
    eager, graphed = train_steps(model, batches, graphed=False), train_steps(twin, batches, graphed=True)
    assert graphed == pytest.approx(eager, rel=1e-3)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert relative_error(b, a) < 1e-3 if a.is_floating_point() else torch.equal(a, b), name


def test_train_py_with_cuda_graphs(data_dir, tmp_path):
    """End to end: 300 training images in batches of 32, so each epoch ends on a smaller batch (run eagerly)."""
    # trained as users train, TF32 allowed: without TRITON_F32_DEFAULT=ieee (compared tightly above) the kernels are
    # the ones train.py compiles, already in Triton's cache after a training run (.ci/gpu), not compiled again
    env = {**{k: v for k, v in PROC_ENV.items() if k != "TRITON_F32_DEFAULT"}, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, str(REPO / "train.py"), "--cuda-graphs", "--device", "cuda", "--d-model", "32",
           "--num-blocks", "1", "--batch-size", "32", "--val-size", "50", "--epochs", "2", "--data-dir", str(data_dir),
           "--out", str(tmp_path / "m.pth"), "--log-dir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA graphs" in proc.stdout and "test: loss" in proc.stdout
    history = torch.load(tmp_path / "m_last.pth", weights_only=True)["history"]
    assert len(history["train_loss"]) == 2 and history["train_loss"][1] < history["train_loss"][0]

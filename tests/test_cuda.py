"""
What only a CUDA GPU can check (every test here skips without one): the official kernels against the portable twin
on the GPU, in fp32 and under bf16 autocast (what `python train.py` runs there), and train.py's --cuda-graphs against
eager training. When a GPU is at hand, run these first:

    python -m pytest tests/test_cuda.py -q -rs

(conftest.py turns Triton's CPU interpreter on only where there is no GPU: here the official kernels run compiled.)
"""

import copy
import functools
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from baselines import CNN, CNNConfig
from helpers import PROC_ENV, REPO
from steps import GraphedTraining, WeightAverage, training_step
from vision_mamba2 import create_vision_mamba2_model, load_official_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bf16 keeps 8 bits of mantissa: each rounding is off by up to 2^-8 = 0.4 %, and a step's update by as much
BF16 = 2**-8


def official_or_skip():
    if load_official_kernels() is None:
        pytest.skip("the official kernels are not available here (README: GPU install; describe_backend says why)")


@pytest.fixture
def exact_fp32(monkeypatch):
    """Full fp32 matmuls (no TF32) in PyTorch and in the Triton kernels compiled during the test (Triton reads
    TRITON_F32_DEFAULT when it compiles: a separate entry in its cache); restored after."""
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pass_of(backend, model, x, amp):
    """Logits and every gradient of one training pass of `model` (a copy) on `backend`, under bf16 autocast if amp."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.mixer.backend = backend
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    return {"logits": logits.detach(), **{n: p.grad for n, p in model.named_parameters()}}


def test_official_kernels_match_the_portable_twin(exact_fp32):
    """The default model, same weights and batch, fp32: logits and every gradient (the CPU suite compares the same
    kernels, interpreted, to 1e-5)."""
    official_or_skip()
    torch.manual_seed(0)
    model = create_vision_mamba2_model(backend="portable", dropout=0.0).cuda()  # the same function, no masks
    x = torch.randn(8, 1, 28, 28, device="cuda")
    portable, official = pass_of("portable", model, x, amp=False), pass_of("official", model, x, amp=False)
    for name, value in portable.items():
        assert relative_error(official[name], value) < 1e-4, name


def test_official_kernels_under_bf16_autocast():
    """As `python train.py` trains on a GPU: the official kernels under bf16 autocast (whose backward mamba-ssm 2.3.1
    could not compile, state-spaces/mamba #854) are no further from the fp32 pass than the portable twin under the
    same autocast is, give or take bf16 rounding: the tolerance is what bf16 does to the portable path itself."""
    official_or_skip()
    torch.manual_seed(0)
    model = create_vision_mamba2_model(backend="portable", dropout=0.0).cuda()
    x = torch.randn(64, 1, 28, 28, device="cuda")
    reference = pass_of("portable", model, x, amp=False)
    portable, official = pass_of("portable", model, x, amp=True), pass_of("official", model, x, amp=True)
    for name, value in reference.items():
        own = relative_error(portable[name], value)
        assert relative_error(official[name], value) <= 2 * own + 4 * BF16, (name, own)


def train_steps(model, batches, *, graphed, amp):
    """Losses of train.py's training steps over `batches` (AdamW, gradient clipping, bf16 autocast if amp, the weight
    average after each step), through steps.GraphedTraining if `graphed` (captured for the first batch's shape: the
    others run eagerly), from the same CUDA random state: CUDA graphs replay the random offsets eager steps draw."""
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=not graphed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    average = WeightAverage(model, 0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling
    torch.cuda.manual_seed(1)
    with autocast():  # as train.py captures them (GraphedTraining restores the random state its warm-up drew)
        step_model = GraphedTraining(model, torch.zeros_like(batches[0][0])) if graphed else model
    step_model.train()
    losses = []
    for x, y in batches:
        _, loss = training_step(step_model, x, y, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                                scaler=scaler, autocast=autocast, grad_clip=1.0)
        average.update()
        losses.append(loss.item())
    return losses, average.module, step_model


@pytest.mark.parametrize("arch", ["portable", "official", "cnn"])
@pytest.mark.parametrize("amp,dropout", [(False, 0.0), (True, 0.1)], ids=["fp32", "as-train.py"])
def test_graphed_training_matches_eager(arch, amp, dropout):
    """Five full batches replayed from the graphs, then a smaller one run eagerly: the same losses, weights, weight
    average and BatchNorm statistics as eager training (the same kernels run in both: equal but for the order of
    a few sums); in fp32 without dropout, and as train.py --cuda-graphs runs (bf16 autocast, dropout 0.1: the same
    masks, drawn from the same random offsets). The kernels are train.py's, TF32 allowed: in Triton's cache after a
    training run (.ci/gpu)."""
    if arch == "official":
        official_or_skip()
    torch.manual_seed(0)
    model = (CNN(CNNConfig(dropout=dropout)) if arch == "cnn" else
             create_vision_mamba2_model(backend=arch, dropout=dropout, num_blocks=2)).cuda()
    twin = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(n, 1, 28, 28, device="cuda", generator=gen),
                torch.randint(0, 10, (n,), device="cuda", generator=gen)) for n in (32,) * 5 + (12,)]
    eager, eager_average, _ = train_steps(model, batches, graphed=False, amp=amp)
    graphed, graphed_average, step_model = train_steps(twin, batches, graphed=True, amp=amp)
    assert (step_model.replayed, step_model.eager_steps) == (5, 1)
    assert graphed == pytest.approx(eager, rel=1e-3)
    # the official backward kernels sum with atomic adds, in no fixed order: where a gradient is about 0 that noise can
    # turn an AdamW update (about lr in size whatever the gradient) around, so their weights get a looser bound
    bound = 1e-2 if arch == "official" else 1e-3
    for ours, theirs in [(twin, model), (graphed_average, eager_average)]:
        for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
            assert relative_error(b, a) < bound if a.is_floating_point() else torch.equal(a, b), name


def test_train_py_with_cuda_graphs(data_dir, tmp_path):
    """End to end, the default model: 275 training images in batches of 32, so each epoch replays 8 steps from the
    graphs and runs its last, smaller batch eagerly; train.py says how many of each."""
    env = {k: v for k, v in PROC_ENV.items() if k not in ("TRITON_INTERPRET", "TRITON_F32_DEFAULT")}
    cmd = [sys.executable, str(REPO / "train.py"), "--cuda-graphs", "--device", "cuda", "--batch-size", "32",
           "--epochs", "2", "--data-dir", str(data_dir), "--out", str(tmp_path / "m.pth")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = re.search(r"CUDA graphs: (\d+) training steps replayed, (\d+) run eagerly", proc.stdout)
    assert counts and counts.groups() == ("16", "2"), proc.stdout[-2000:]
    history = torch.load(tmp_path / "m_last.pth", weights_only=True)["history"]
    assert len(history["train_loss"]) == 2 and history["train_loss"][1] < history["train_loss"][0]

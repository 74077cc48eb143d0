"""Mixed precision: every model trains under bf16 autocast (train.py's default on a GPU), here on the CPU with
torch.autocast("cpu"): forward and backward run, outputs and gradients are finite, every parameter gets a gradient,
and the logits and gradients stay within bf16 rounding of the fp32 ones. And torch.compile traces a training step
under autocast as one graph, backward included: fullgraph=True fails on any graph break. And fp16 with loss scaling
(train.py's choice on a GPU without bf16), the part a CPU can check: steps.training_step with a GradScaler."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from baselines import CNN, CNNConfig, ViT, ViTConfig
from steps import training_step
from vision_mamba2 import SCANS, SequentialMamba2, SequentialMamba2Config, create_vision_mamba2_model

SMALL = dict(d_model=32, num_blocks=2, d_state=8, headdim=8, dropout=0.0)
TINY = dict(SMALL, d_model=16, num_blocks=1)  # torch.compile's tracing time grows with the blocks
MODELS = {
    **{f"vision-mamba2-{scan}{'-local-conv' if local_conv else ''}":
       lambda scan=scan, local_conv=local_conv: create_vision_mamba2_model(**SMALL, scan=scan, local_conv=local_conv)
       for scan in SCANS for local_conv in (False, True)},
    "sequential-mamba2": lambda: SequentialMamba2(SequentialMamba2Config(**SMALL)),  # 784 steps: 13 chunks
    "cnn": lambda: CNN(CNNConfig(width=8, dropout=0.0)),
    "vit": lambda: ViT(ViTConfig(d_model=32, num_blocks=2, dropout=0.0)),
}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def training_pass(model, x, y, amp):
    """Logits and every parameter's gradient of one training forward + backward, under bf16 autocast or not."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_trains_under_bf16_autocast_within_rounding_of_fp32(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    ref_logits, ref_grads = training_pass(model, x, y, amp=False)
    logits, grads = training_pass(model, x, y, amp=True)

    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()  # autocast really ran in bf16
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    # bf16 keeps 8 bits of mantissa (eps 2^-8 = 0.4 %); a few layers of rounding stay within a few percent
    assert rel_err(logits, ref_logits) < 0.03, rel_err(logits, ref_logits)
    # gradients: noisier (the CNN's BatchNorm over 4 images amplifies the rounding), but pointing the same way
    flat, ref_flat = (torch.cat([g.flatten() for g in gs.values()]) for gs in (grads, ref_grads))
    assert F.cosine_similarity(flat, ref_flat, dim=0) > 0.99


@pytest.mark.parametrize("name,build,hw", [
    ("vision-mamba2", lambda: create_vision_mamba2_model(**TINY), 28),
    ("sequential-mamba2", lambda: SequentialMamba2(SequentialMamba2Config(seq_len=100, **TINY)), 10),  # 100 steps: two chunks of 50, the inter-chunk recurrence traced too
])
def test_compiled_training_step_under_autocast_is_one_graph(name, build, hw):
    """The default architecture and backend (auto: portable on a CPU), small: aot_eager traces the forward and the
    backward graph as train.py --compile would, without inductor's code generation."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build().train()
    x, y = torch.randn(4, 1, hw, hw), torch.randint(0, 10, (4,))
    eager_logits, eager_grads = training_pass(model, x, y, amp=True)
    logits, grads = training_pass(torch.compile(model, backend="aot_eager", fullgraph=True), x, y, amp=True)
    assert rel_err(logits, eager_logits) < 1e-2  # the same function (up to bf16 rounding in another op order)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


# ----------------------------------------------------------------------------------------------------
# fp16 with loss scaling: what train.py runs on a GPU without bf16 (torch.amp.GradScaler; steps.training_step)

def stepped(model, x, y, *, scaler, dtype=None, grad_clip=0.0):
    """A copy of model after one steps.training_step (plain SGD: its update is the gradient itself, so a gradient
    left scaled or clipped at the wrong scale shows; AdamW's normalisation would hide most of it), and the loss."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    autocast = functools.partial(torch.autocast, "cpu", dtype=dtype, enabled=dtype is not None)
    _, loss = training_step(model, x, y, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), scaler=scaler,
                            autocast=autocast, grad_clip=grad_clip)
    return model, loss


def update(before, after):
    return torch.cat([(a - b).flatten() for a, b in zip(after.parameters(), before.parameters())]).detach()


@pytest.fixture
def tiny_batch():
    torch.manual_seed(0)
    return create_vision_mamba2_model(**TINY).train(), torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_a_loss_scaled_step_is_the_unscaled_step(tiny_batch, grad_clip):
    """In fp32 a scale of 2^16 is exact: the scaled step, gradients unscaled before they are clipped, is the plain
    step to float rounding (clipped at the wrong scale it would be 2^16 times smaller)."""
    model, x, y = tiny_batch
    plain, _ = stepped(model, x, y, scaler=torch.amp.GradScaler("cpu", enabled=False), grad_clip=grad_clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaled, _ = stepped(model, x, y, scaler=scaler, grad_clip=grad_clip)
    reference = update(model, plain)
    assert reference.norm() > 0
    assert rel_err(update(model, scaled), reference) < 1e-5, rel_err(update(model, scaled), reference)
    assert scaler.get_scale() == 2.0 ** 16  # finite gradients: the scale stays (it grows only after 2000 such steps)


def test_fp16_training_step_with_loss_scaling_is_the_fp32_step_to_rounding(tiny_batch):
    model, x, y = tiny_batch
    reference, ref_loss = stepped(model, x, y, scaler=torch.amp.GradScaler("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cpu")  # train.py's: 2^16 to start
    fp16, loss = stepped(model, x, y, scaler=scaler, dtype=torch.float16)
    assert scaler.get_scale() == 2.0 ** 16
    # fp16 keeps 11 bits of mantissa (eps 2^-11 = 0.05 %): the loss within a fraction of a percent, the update
    # within a few percent
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * ref_loss.item()
    assert rel_err(update(model, fp16), update(model, reference)) < 0.05


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_lowered(tiny_batch):
    """Gradients that overflow fp16 (a scale far too large) are not applied: the weights stay, the scale halves."""
    model, x, y = tiny_batch
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # fp16 ends at 65504 (2^16)
    after, _ = stepped(model, x, y, scaler=scaler, dtype=torch.float16)
    assert not update(model, after).any()
    assert scaler.get_scale() == 2.0 ** 39
    nudged, _ = stepped(after, x, y, scaler=torch.amp.GradScaler("cpu"), dtype=torch.float16)  # and the next step runs
    assert torch.isfinite(update(after, nudged)).all() and update(after, nudged).any()

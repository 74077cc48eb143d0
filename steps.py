"""
One training step, and what makes steps faster on each machine: torch.compile, CUDA graphs, and keeping freed
memory in the process on a CPU. train.py's loop and bench.py's timings run the same step.
"""

import copy
import ctypes
import itertools
import sys

import torch
import torch.nn as nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cli import TrainingError


def training_step(model, x, y, *, optimizer, criterion, scaler, autocast, grad_clip):
    """Forward under autocast, loss in fp32, backward (scaled for fp16), clip, AdamW step. Returns (logits, loss)."""
    # x : (B, C, H, W), y : (B,)
    with autocast():
        logits = model(x)  # (B, classes)
    loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)  # never accumulate: CUDA graphs may share the .grad buffers
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


class WeightAverage:
    """An exponential moving average of a model's weights, kept in a copy of it (.module): the first update() copies
    the weights, each later one moves the average by (1 - decay) towards them, in one foreach lerp (torch's
    get_ema_multi_avg_fn). Floating-point buffers (BatchNorm's running statistics) are averaged too; integer ones
    (scan orders, BatchNorm's step count) are copied, which float arithmetic would round. torch's AveragedModel
    does the same, but copies its step counter (a CPU tensor) to the GPU at every update, a copy that waits for the
    device; here the count is a Python int, so training never stops to wait (bit for bit the same average)."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.lerp, self.updates = decay, get_ema_multi_avg_fn(decay), 0
        # (average, weight) tensor pairs, paired once: training and loading a checkpoint change them in place
        self.pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                              itertools.chain(model.parameters(), model.buffers()), strict=True))
        floats = [(a, c) for a, c in self.pairs if a.is_floating_point()]
        self.floats = [a for a, _ in floats], [c for _, c in floats]
        self.integers = [(a, c) for a, c in self.pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self):
        """Average in the model's current weights."""
        if self.updates:
            self.lerp(*self.floats, None)
        for a, c in self.integers if self.updates else self.pairs:  # the first update copies everything
            a.copy_(c)
        self.updates += 1


def compile_model(model):
    """torch.compile(model), with PyTorch's fused Transformer inference shortcut turned off for the process: under
    compile its fake kernel mispredicts the output strides and the compiled ViT fails in eval mode without
    autocast (pytorch/pytorch#196251); the compiler fuses the attention itself."""
    torch.backends.mha.set_fastpath_enabled(False)
    return torch.compile(model)


class GraphedTraining(nn.Module):
    """The model's training forward and backward pass, captured once as CUDA graphs and replayed every step
    (torch.cuda.make_graphed_callables): on a GPU this model's steps are bound by launching hundreds of small
    kernels one by one from Python, and a replay launches each pass at once. Batches of another size (an epoch's
    last) run the model eagerly, and so does evaluation (make_graphed_callables keeps the eager forward for the
    mode it did not capture). The weights' .grad may then share the graph's gradient buffers: train with
    zero_grad(set_to_none=True) before each backward, as train.py does, never by accumulating gradients."""

    def __init__(self, model, sample):
        super().__init__()
        # sample : (B, C, H, W), the training batch shape the graphs are captured for
        self.model, self.eager, self.shape = model, model.forward, sample.shape
        self.replayed = self.eager_steps = 0  # training steps each way: a fallback is counted, never silent
        # the three warm-up passes before the capture move BatchNorm's running statistics and draw dropout masks:
        # undone, so that the run (and a resumed one) goes on as if they had not happened
        buffers = [b.clone() for b in model.buffers()]
        rng = torch.cuda.get_rng_state(sample.device)
        model.train()
        with torch.cuda.device(sample.device):  # its side stream and capture live on the current device
            torch.cuda.make_graphed_callables(model, (sample,))  # replaces model.forward in training mode
        torch.cuda.set_rng_state(rng, sample.device)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)

    def forward(self, x):
        # the graphs hold the training pass of one batch shape (in eval mode the model's forward is the eager one)
        if x.shape == self.shape and self.model.training:
            self.replayed += 1
            return self.model(x)
        self.eager_steps += self.model.training
        return self.eager(x)

    def counts(self):
        return (f"CUDA graphs: {self.replayed} training steps replayed, {self.eager_steps} run eagerly (batches of "
                f"another size than {self.shape[0]})")


def graph_training(model, sample):
    """GraphedTraining(model, sample), or a TrainingError that says why the capture failed."""
    try:
        return GraphedTraining(model, sample)
    except Exception as e:
        what = "ran out of GPU memory (lower --batch-size)" if isinstance(e, torch.OutOfMemoryError) else \
            f"failed ({type(e).__name__}: {e})"
        raise TrainingError(f"capturing the CUDA graphs {what}: train without --cuda-graphs") from None


def keep_freed_memory_in_process():
    """glibc returns every freed block over 32 MB to the OS, so each large activation of the next step is
    page-faulted in again (measured: 4.4 million faults, over half the time of a CPU step at batch 128).
    Raising the mmap and trim thresholds keeps freed memory for reuse: 2x faster CPU training."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc (e.g. musl): nothing to tune
            return
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
            libc.mallopt(option, 2**31 - 1)


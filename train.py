"""
Train Vision Mamba 2 on MNIST (or Fashion-MNIST).

    python train.py                                   # the default recipe: Vision Mamba 2 on MNIST
    python train.py --dataset fashion-mnist           # -> vision_mamba2_fashion_mnist.pth
    python train.py --resume vision_mamba2_mnist_last.pth   # after Ctrl-C or a crash: carries on exactly
    torchrun --nproc_per_node=4 train.py              # 4 GPUs (DistributedDataParallel; on CPU: 4 processes)
    python train.py --task psmnist                    # sequential MNIST: one pixel per step, in a fixed random order

The whole dataset split lives on the device as one uint8 tensor; shuffling, batching and augmentation
(a random affine warp via affine_grid + grid_sample) happen there, so the hot loop never touches PIL or
a DataLoader. --no-data-on-device trains from the standard DataLoaders of get_mnist_dataloaders instead,
for datasets that don't fit. Model selection and early stopping look at a validation split carved from
the training set; the test set is evaluated once, at the end.

Under torchrun each process (rank) trains on its share of every epoch's shuffle with --batch-size images per
step, DistributedDataParallel averages the gradients, and the metrics are summed over the ranks; only rank 0
prints and writes files.

Outputs: the best-on-validation checkpoint (--out), a resumable last checkpoint next to it (*_last.pth),
training_history.png next to it, and TensorBoard logs in <--log-dir>/<run-name>/.
"""

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import signal
import sys
import time
import types

import matplotlib

matplotlib.use("Agg")  # headless: we only ever write PNG files
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from matplotlib.ticker import MaxNLocator
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from torchvision import transforms
from tqdm import tqdm

from baselines import CNNConfig, ViTConfig
from checkpoint import CHECKPOINT_FORMAT, MODELS, atomic_write, load_checkpoint, save_checkpoint
from cli import (HelpFormatter, Parser, TrainingError, UsageError, device_name, exit_status, float_in, given_flags,
                 int_at_least, resolve_device)
from data import DATASETS, SEQUENCE_DATASETS, DeviceSplit, load_datasets, random_affine
from steps import COMPILE_MODES, GraphedTraining, WeightAverage, compile_model, keep_freed_memory_in_process, training_step
from vision_mamba2 import BACKENDS, READOUTS, SCANS, SequentialMamba2Config, VisionMamba2Config, count_params, \
    describe_backend


# ----------------------------------------------------------------------------------------------------
# Command line

# The sequential tasks' own defaults, taken when the flag is not on the command line. No augmentation: a warp would
# move pixels to other steps of the sequence. No weight average: measured on the image task only.
SEQUENCE_DEFAULTS = {"d_model": SequentialMamba2Config.d_model, "num_blocks": SequentialMamba2Config.num_blocks,
                     "d_state": SequentialMamba2Config.d_state, "headdim": SequentialMamba2Config.headdim,
                     "lr": 2e-3, "epochs": 30, "aug_translate": 0.0, "aug_rotate": 0.0, "aug_scale": 0.0, "ema": 0.0}
TASK_DEFAULTS = {"image": {}, "smnist": SEQUENCE_DEFAULTS, "psmnist": SEQUENCE_DEFAULTS}
# A dataset's own defaults, below the task's (a sequence task's "no augmentation" wins). Fashion-MNIST's garments
# are upright and of one size: under MNIST's warp both Vision Mamba 2 and the CNN underfitted, and shifts alone
# did better (docs/results.md).
# MNIST-1D has 4,000 training sequences: a tenth for validation
DATASET_DEFAULTS = {"fashion-mnist": {"aug_translate": 2.0, "aug_rotate": 0.0, "aug_scale": 0.0},
                    "mnist1d": {"val_size": 500}}
# flags that mean something only for some tasks: giving one to another task is an error
TASK_FLAGS = {"scan": ("image",), "patch_size": ("image",), "local_conv": ("image",),
              "aug_translate": ("image",), "aug_rotate": ("image",), "aug_scale": ("image",),
              "readout": ("smnist", "psmnist"), "permutation_seed": ("psmnist",)}

ARCH_DEFAULTS = {"mamba2": {}, "cnn": {},
                 "vit": {"d_model": ViTConfig.d_model, "num_blocks": ViTConfig.num_blocks}}
# flags that mean something only for some architectures
ARCH_FLAGS = {"d_state": ("mamba2",), "headdim": ("mamba2",), "expand": ("mamba2",), "scan": ("mamba2",),
              "backend": ("mamba2",), "drop_path": ("mamba2",), "local_conv": ("mamba2",),
              "patch_size": ("mamba2", "vit"),
              "d_model": ("mamba2", "vit"),
              "num_blocks": ("mamba2", "vit"), "width": ("cnn",), "heads": ("vit",), "mlp_ratio": ("vit",)}


def default_out(task, arch, dataset):
    """--out's default names what was trained, so that another task, model or dataset never overwrites a checkpoint:
    vision_mamba2_mnist.pth, cnn_fashion_mnist.pth, vision_mamba2_smnist.pth, vision_mamba2_smnist_mnist1d.pth."""
    parts = [{"mamba2": "vision_mamba2"}.get(arch, arch)]
    if task != "image":
        parts.append(task)  # smnist / psmnist name MNIST already
    if task == "image" or dataset != "mnist":
        parts.append(dataset.replace("-", "_"))
    return "_".join(parts) + ".pth"


def build_parser():
    model_defaults = VisionMamba2Config()  # the architecture's defaults live in vision_mamba2.py
    p = Parser(
        prog="train.py", formatter_class=HelpFormatter,
        description="Train Vision Mamba 2 on MNIST / Fashion-MNIST (or the CNN / ViT baselines, or sequential MNIST). "
                    "The defaults are the recipe measured in docs/results.md: a ~475K-parameter model (4 "
                    "bidirectional Mamba-2 blocks of width 128 over a 7x7 token grid), 10 epochs of AdamW with "
                    "warmup + cosine decay, label smoothing, random affine augmentation and a weight average.",
        epilog="--resume takes every flag not given from the checkpoint. Hyperparameters given must agree with "
               "it; only --epochs, --patience and the runtime flags (device, paths, workers, amp, compile and its "
               "mode, CUDA graphs) may differ. Several GPUs or machines: torchrun --nproc_per_node=N train.py ...; "
               "a checkpoint saved at the end of an epoch resumes under any number of processes, one saved mid-epoch "
               "(Ctrl-C) under as many as saved it.")

    g = p.add_argument_group("data")
    seq = SEQUENCE_DEFAULTS
    g.add_argument("--task", choices=list(TASK_DEFAULTS), default="image",
                   help="image: the 2-D classifier; smnist: sequential MNIST, one pixel per step (784 steps, row by "
                        "row); psmnist: the same in a fixed random pixel order. Sequential defaults: --d-model "
                        f"{seq['d_model']} --num-blocks {seq['num_blocks']} --d-state {seq['d_state']} --lr "
                        f"{seq['lr']:g} --epochs {seq['epochs']}, no augmentation, --ema 0 (default: image)")
    g.add_argument("--permutation-seed", type=int_at_least(0), default=0,
                   help="psmnist: seeds the pixel order, which is stored in the checkpoint")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist",
                   help="mnist, fashion-mnist: torchvision's 28x28 grey images; mnist1d: Greydanus' MNIST-1D (40-step "
                        "signals, generated offline; --task smnist or psmnist only)")
    g.add_argument("--data-dir", default="./data",
                   help="torchvision root: files are read from (or downloaded to) <data-dir>/MNIST/raw/ "
                        "or <data-dir>/FashionMNIST/raw/")
    g.add_argument("--val-size", type=int_at_least(1), default=5000,
                   help="training images held out for validation (drawn by --seed): model selection and early "
                        "stopping look only at these (mnist1d: 500)")
    g.add_argument("--max-train-samples", type=int_at_least(1), default=None,
                   help="train on only this many images of the training split, for quick runs (default: all)")
    g.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each split on the device as one tensor (fast); --no-data-on-device streams "
                        "batches from DataLoaders instead, for datasets that don't fit in device memory")
    g.add_argument("--num-workers", type=int_at_least(0), default=0,
                   help="DataLoader worker processes (used with --no-data-on-device)")

    g = p.add_argument_group("augmentation (a random affine warp of each training image; 0 = off; image task only)")
    g.add_argument("--aug-translate", type=float_in(0, 14), default=3.0,
                   help="maximum shift in pixels (fashion-mnist: 2, with no rotation or zoom)")
    g.add_argument("--aug-rotate", type=float_in(0, 180), default=15.0,
                   help="maximum rotation in degrees (keep it small, or 6 and 9 become the same digit)")
    g.add_argument("--aug-scale", type=float_in(0, 1, hi_open=True), default=0.15,
                   help="maximum zoom in or out, as a fraction")

    g = p.add_argument_group("model (see vision_mamba2.py and baselines.py)")
    g.add_argument("--arch", choices=sorted({arch for _, arch in MODELS}), default="mamba2",
                   help="mamba2: Vision Mamba 2; cnn, vit: baselines of about the same size (baselines.py), trained "
                        f"by the same recipe (vit's --d-model defaults to {ViTConfig.d_model}) (default: mamba2)")
    g.add_argument("--patch-size", type=int_at_least(1), default=model_defaults.patch_size,
                   help="stride of the tokenizing conv (kernel 2p-1), mamba2 and vit: 4 gives a 7x7 grid of 49 "
                        "tokens, 2 a 14x14 grid (4x the work)")
    g.add_argument("--d-model", type=int_at_least(1), default=model_defaults.d_model,
                   help="channels of the token grid (mamba2, vit)")
    g.add_argument("--num-blocks", type=int_at_least(1), default=model_defaults.num_blocks,
                   help="Mamba-2 (or Transformer) blocks")
    g.add_argument("--d-state", type=int_at_least(1), default=model_defaults.d_state,
                   help="SSM state size per head: how much each scan remembers of what it has read")
    g.add_argument("--headdim", type=int_at_least(1), default=model_defaults.headdim,
                   help="channels per SSM head; d-model*expand must be divisible by it")
    g.add_argument("--expand", type=int_at_least(1), default=model_defaults.expand,
                   help="inner width of the Mamba-2 mixer as a multiple of d-model (2, as in Mamba)")
    g.add_argument("--scan", choices=list(SCANS), default=model_defaults.scan,
                   help="directions each block reads the token grid in: uni (1), bi (2, forward and "
                        "backward, so every token sees the whole image), cross (4, rows and columns)")
    g.add_argument("--readout", choices=list(READOUTS), default=SequentialMamba2Config.readout,
                   help="smnist/psmnist: what the classifier head sees, the mean of every step's features or the "
                        "last step's")
    g.add_argument("--width", type=int_at_least(1), default=CNNConfig.width,
                   help="cnn: channels of the first of its three stages (then 2x, 4x)")
    g.add_argument("--heads", type=int_at_least(1), default=ViTConfig.heads,
                   help="vit: attention heads per block; --d-model must be divisible by it")
    g.add_argument("--mlp-ratio", type=int_at_least(1), default=ViTConfig.mlp_ratio,
                   help="vit: hidden width of each block's MLP, as a multiple of --d-model")
    g.add_argument("--dropout", type=float_in(0, 1, hi_open=True), default=model_defaults.dropout,
                   help="dropout in the classifier head")
    g.add_argument("--drop-path", type=float_in(0, 1, hi_open=True), default=model_defaults.drop_path,
                   help="stochastic depth: in training skip a block's residual branch for a random fraction of the "
                        "images, rising linearly over the blocks from 0 to this (0 = off)")
    g.add_argument("--local-conv", action=argparse.BooleanOptionalAction, default=model_defaults.local_conv,
                   help="a residual 3x3 depthwise conv on the token grid at the start of each block, so each token "
                        "mixes with its 8 neighbours (which a row-major scan reaches only through the SSM state)")
    g.add_argument("--backend", choices=list(BACKENDS), default=model_defaults.backend,
                   help="Mamba-2 implementation: official (mamba-ssm's kernels, CUDA), portable (pure PyTorch), "
                        "auto (official when on CUDA with mamba-ssm installed); same weights either way")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int_at_least(1), default=10,
                   help="passes over the training split; the cosine schedule spans all of them")
    g.add_argument("--batch-size", type=int_at_least(1), default=128,
                   help="images per step and process (evaluation uses twice as many); under torchrun a step "
                        "takes this many from each process; lower it if you run out of memory")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=2e-3,
                   help="peak AdamW learning rate, reached after the warmup; the same under torchrun (not "
                        "scaled with the number of processes)")
    g.add_argument("--weight-decay", type=float_in(0), default=0.05,
                   help="AdamW weight decay on weight matrices only (not on biases, norms, position "
                        "embeddings or the SSM's A_log/D/dt_bias)")
    g.add_argument("--warmup-epochs", type=float_in(0), default=1.0,
                   help="linear learning-rate warmup from ~0 to --lr, then cosine decay to 0")
    g.add_argument("--label-smoothing", type=float_in(0, 1, hi_open=True), default=0.1,
                   help="cross-entropy label smoothing; reported losses include it")
    g.add_argument("--grad-clip", type=float_in(0), default=1.0,
                   help="clip the global gradient norm to this (0 = off)")
    g.add_argument("--ema", type=float_in(0, 1, hi_open=True), default=0.999,
                   help="decay of a moving average of the weights, updated every step, which validation, the "
                        "checkpoints and the test use (0 = off); capped at 1 - 4/(the run's steps) for short runs")
    g.add_argument("--patience", type=int_at_least(0), default=None,
                   help="stop early after this many epochs without a better validation accuracy (0 = never) "
                        "(default: half of --epochs, at least 5)")
    g.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seeds initialisation, the validation split, shuffling, augmentation and dropout")

    g = p.add_argument_group("runtime and output")
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto picks cuda, then mps, then cpu; under torchrun each process takes cuda:LOCAL_RANK "
                        "(or the CPU)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (bf16 autocast; fp16 with loss scaling on GPUs without bf16) "
                        "(default: on for CUDA, off elsewhere)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: a minute or more of compiling, then faster steps")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode, with --compile (reduce-overhead also replays CUDA graphs)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA only: capture the training forward and backward once as CUDA graphs and replay them "
                        "each step (two launches instead of hundreds of small kernels); not with --compile or torchrun")
    g.add_argument("--out", default=None,
                   help="best-on-validation checkpoint; *_last.pth and training_history.png go next to it "
                        "(default: named after model, task and dataset, e.g. vision_mamba2_mnist.pth, cnn_mnist.pth)")
    g.add_argument("--log-dir", default="runs", help="TensorBoard logs go to <log-dir>/<run-name>/")
    g.add_argument("--run-name", default=None,
                   help="TensorBoard run name (default: <dataset>-<date>-<time>, or the resumed run's)")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="continue the run saved in this checkpoint (usually the *_last.pth one), same epoch "
                        "numbering and learning-rate schedule (default: start a new run)")
    g.add_argument("--log-interval", type=int_at_least(1), default=25,
                   help="steps between progress-bar updates (and NaN checks): each costs one device sync")
    return p


# what a resumed run may change; the other flags must agree with the checkpoint
RESUME_MAY_CHANGE = {"epochs", "patience", "device", "amp", "compile", "compile_mode", "cuda_graphs", "data_dir",
                     "data_on_device", "num_workers", "out", "log_dir", "run_name", "resume", "log_interval"}


def merge_resume_args(args, saved, given):
    """A resumed run is the saved run: every flag not on the command line comes from the checkpoint."""
    for key, value in saved.items():
        if key not in given:
            setattr(args, key, value)
        elif key not in RESUME_MAY_CHANGE and getattr(args, key) != value:
            flags = ", ".join(sorted(RESUME_MAY_CHANGE))
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts the checkpoint's {value}: "
                             f"a resumed run keeps its hyperparameters (only {flags} may change)")


# ----------------------------------------------------------------------------------------------------
# Data

def get_mnist_dataloaders(*, dataset="mnist", data_dir="./data", batch_size=128, val_size=5000,
                          max_train_samples=None, seed=0, num_workers=0, rank=0, world_size=1):
    """Train / validation / test DataLoaders of normalized (B, 1, 28, 28) images and their labels.

    The one place to swap in another dataset (together with DATASETS above): the fast on-device path
    builds its tensors from the torchvision datasets behind these loaders (their .data / .targets).
    The validation split is drawn from the training set by `seed`; the test set is never shuffled.
    With world_size > 1 (torchrun) the loaders of process `rank` give it its part of each split.
    """
    _, mean, std = DATASETS[dataset]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    train_full, test = load_datasets(dataset, data_dir, tf)
    if val_size >= len(train_full):
        raise UsageError(f"--val-size {val_size} leaves no training images: the training set has {len(train_full)}")
    perm = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = perm[:val_size], perm[val_size:][:max_train_samples]

    def loader(ds, bs, shuffle=False, sampler=None):
        return DataLoader(ds, batch_size=bs, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                          generator=torch.Generator() if shuffle else None,  # re-seeded each epoch
                          persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    train_set, val_set = Subset(train_full, train_idx), Subset(train_full, val_idx)
    if world_size == 1:
        return (loader(train_set, batch_size, shuffle=True), loader(val_set, 2 * batch_size),
                loader(test, 2 * batch_size))

    # each rank trains on its share of every epoch's shuffle, all the same size (the remainder is dropped) so
    # that the ranks step together, and evaluates its own slice: every image once, the sums are all-reduced
    def part(n):
        return range(rank * n // world_size, (rank + 1) * n // world_size)
    return (loader(train_set, batch_size, sampler=DistributedSampler(train_set, world_size, rank, seed=seed,
                                                                      drop_last=True)),
            loader(val_set, 2 * batch_size, sampler=part(len(val_set))),
            loader(test, 2 * batch_size, sampler=part(len(test))))


class LoaderSplit:
    """The same interface over a DataLoader, for data that stays on the host."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.num_samples, self.num_batches = len(loader.sampler), len(loader)

    def batches(self, generator=None, start=0):
        if generator is not None:  # the sampler's shuffle follows the epoch's generator too
            seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
            if isinstance(self.loader.sampler, DistributedSampler):
                self.loader.sampler.set_epoch(seed)  # an offset to its seed: every rank drew the same
            else:
                self.loader.generator.manual_seed(seed)
        return ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for x, y in itertools.islice(self.loader, start, None))


def augments(args):
    return args.aug_translate > 0 or args.aug_rotate > 0 or args.aug_scale > 0


# ----------------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_optimizer(model, args, device):
    # as Mamba and most vision transformers: no decay on biases, norms, embeddings or the SSM's A_log/D/dt_bias
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def warmup_cosine(warmup_steps, total_steps):
    """LambdaLR factor: linear warmup to 1, then cosine decay to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read with weights_only=True (so only tensors and plain Python inside)

def get_rng_state():
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][:torch.cuda.device_count()])
    if rng["mps"] is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ----------------------------------------------------------------------------------------------------
# Several processes (torchrun): collectives that every rank calls at the same point; without torchrun they
# hand back what they are given

def rank_and_world_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def sum_over_ranks(values, device):
    """The numbers in `values` summed over all ranks, in one all_reduce on `device` (a list of floats)."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_from_ranks(obj):
    """Every rank's obj, in rank order."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def from_rank0(obj):
    """Rank 0's obj, on every rank."""
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


# ----------------------------------------------------------------------------------------------------
# Training

class GracefulInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (then a checkpoint is saved);
    a second one raises KeyboardInterrupt at once."""

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def train_one_epoch(model, split, *, optimizer, scheduler, scaler, criterion, autocast, args, epoch, stop,
                    update_ema=None, resume=None):
    """One pass over the training split, from step resume["step"] if given.

    Returns (metrics, None) when the epoch completes, or (None, state) when Ctrl-C stopped it: the
    state resumes this epoch at the next step. The epoch's shuffle and augmentation come from one
    generator seeded by (seed, epoch), which is what makes a resumed epoch replay exactly. Under torchrun
    every rank draws the same shuffle (and takes its share of it), then its own augmentation. update_ema, if
    given, runs after every optimizer step.
    """
    device = split.device
    rank, world_size = rank_and_world_size()
    seed = args.seed * 100_003 + epoch
    generator = torch.Generator(device=device).manual_seed(seed)
    start = resume["step"] if resume else 0
    batches = split.batches(generator, start)  # draws this epoch's order from the fresh generator
    if resume:
        generator.set_state(resume["generator"])  # then carry on with the augmentation draws
    elif rank > 0:
        generator.manual_seed(seed * 1_000_003 + rank)

    _, mean, std = DATASETS[args.dataset]
    augment = augments(args)
    # running sums stay on the device: reading them is a host sync, done only every log_interval steps
    loss_sum = torch.tensor(resume["loss_sum"] if resume else 0.0, device=device)
    correct = torch.tensor(resume["correct"] if resume else 0, device=device)
    seen = resume["seen"] if resume else 0
    elapsed = resume["elapsed"] if resume else 0.0
    seen_before, t0 = seen, time.perf_counter()
    stop_agreed = False

    def totals():
        """(mean loss, accuracy, Ctrl-C) of the epoch so far. Under torchrun over all ranks (all take batches of
        the same sizes), in one all_reduce: the logged numbers are global, and every rank sees the same NaN and
        the same Ctrl-C, so they all stop at the same step."""
        loss_total, correct_total, stops = sum_over_ranks([loss_sum.item(), correct.item(), stop.requested], device)
        loss = loss_total / max(seen * world_size, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"the training loss became {loss} in epoch {epoch}: stopping; the checkpoints "
                                f"from before are kept (try a lower --lr)")
        return loss, correct_total / max(seen * world_size, 1), stops > 0

    model.train()
    bar = tqdm(batches, total=split.num_batches, initial=start, desc=f"epoch {epoch}/{args.epochs}",
               unit="batch", leave=False, dynamic_ncols=True, disable=rank > 0)
    for step, (x, y) in enumerate(bar, start):
        # x : (B, 1, 28, 28), y : (B,)
        if augment:
            x = random_affine(x, generator, translate=args.aug_translate, rotate=args.aug_rotate,
                              scale=args.aug_scale, fill=-mean / std)
        logits, loss = training_step(model, x, y, optimizer=optimizer, criterion=criterion, scaler=scaler,
                                     autocast=autocast, grad_clip=args.grad_clip)
        scheduler.step()
        if update_ema:
            update_ema()

        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
        if (step + 1) % args.log_interval == 0:
            loss, acc, stop_agreed = totals()
            rate = world_size * (seen - seen_before) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2%}", img_s=f"{rate:,.0f}")
        # one process stops after the step of its Ctrl-C; several at the log step where they agreed to
        if (stop.requested if world_size == 1 else stop_agreed) and step + 1 < split.num_batches:
            bar.close()
            totals()  # never save a state whose loss went NaN
            return None, {"step": step + 1, "generator": generator.get_state(), "loss_sum": loss_sum.item(),
                          "correct": correct.item(), "seen": seen,
                          "elapsed": elapsed + time.perf_counter() - t0}
    bar.close()
    train_loss, train_acc, _ = totals()  # also waits for the device, so the timing below is honest
    elapsed += time.perf_counter() - t0
    return {"train_loss": train_loss, "train_acc": train_acc,
            "images_per_sec": world_size * seen / elapsed if elapsed > 0 else 0.0}, None


@torch.no_grad()
def evaluate(model, split, criterion, desc):
    """(mean loss, accuracy) over a whole split, in fp32 (as test_model.py, so both give the same accuracy for the
    same weights); under torchrun each rank evaluates its slice of it."""
    model.eval()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    correct = torch.zeros((), dtype=torch.long, device=loss_sum.device)
    for x, y in tqdm(split.batches(), total=split.num_batches, desc=desc, unit="batch", leave=False,
                     dynamic_ncols=True, disable=rank_and_world_size()[0] > 0):
        logits = model(x)
        loss_sum += criterion(logits, y) * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
    loss_total, correct_total, n = sum_over_ranks([loss_sum.item(), correct.item(), split.num_samples],
                                                  loss_sum.device)
    return loss_total / n, correct_total / n


def plot_history(history, path, *, augmented):
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    averaged = "val_acc_raw" in history  # --ema: validation scored the weights' average
    for ax, key, scale, title in [(ax_loss, "loss", 1, "loss (with label smoothing)"),
                                  (ax_acc, "acc", 100, "accuracy (%)")]:
        ax.plot(epochs, [scale * v for v in history[f"train_{key}"]], "o-",
                label="train (augmented)" if augmented else "train")
        ax.plot(epochs, [scale * v for v in history[f"val_{key}"]], "o-",
                label="validation (weight average)" if averaged else "validation")
        if averaged and key == "acc":
            ax.plot(epochs, [scale * v for v in history["val_acc_raw"]], "o--", label="validation (raw weights)")
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def print0(*values, **kwargs):
    """print, from rank 0 only (under torchrun every process runs this script)."""
    if rank_and_world_size()[0] == 0:
        print(*values, **kwargs)


# ----------------------------------------------------------------------------------------------------
# The run, step by step: arguments, processes, data, model, optimisation state, the epoch loop, the final test

def settle_args(args, given):
    """Fill in the flags not on the command line (a resumed run's from its checkpoint, a new run's from its task's,
    architecture's and dataset's defaults) and refuse what means nothing. Returns the resumed checkpoint, or None."""
    resume = load_checkpoint(args.resume, "--resume") if args.resume else None
    if resume:
        merge_resume_args(args, resume["args"], given)
    else:
        defaults = {**DATASET_DEFAULTS.get(args.dataset, {}), **TASK_DEFAULTS[args.task], **ARCH_DEFAULTS[args.arch],
                    "out": default_out(args.task, args.arch, args.dataset)}
        for key, value in defaults.items():
            if key not in given:
                setattr(args, key, value)
    if args.dataset in SEQUENCE_DATASETS and args.task == "image":
        raise UsageError(f"--dataset {args.dataset} holds 1-D sequences, not images: train on it with --task smnist "
                         f"(read in order) or psmnist (in a fixed random order)")
    if (args.task, args.arch) not in MODELS:
        raise UsageError(f"--arch {args.arch} is an image classifier: --task {args.task} takes only --arch mamba2")
    for flags, value, what in ((TASK_FLAGS, args.task, "task"), (ARCH_FLAGS, args.arch, "arch")):
        for key in sorted(given & flags.keys()):
            if value not in flags[key]:
                raise UsageError(f"--{key.replace('_', '-')} applies only to --{what} {' or '.join(flags[key])}, "
                                 f"not to {value}")
    if "compile_mode" in given and not args.compile:
        raise UsageError("--compile-mode applies only with --compile")
    if args.cuda_graphs and args.compile:
        raise UsageError("--cuda-graphs and --compile exclude each other (--compile-mode reduce-overhead is "
                         "torch.compile's own use of CUDA graphs)")
    task = "" if args.task == "image" else f"{args.task}-"
    arch = "" if args.arch == "mamba2" else f"{args.arch}-"
    args.run_name = args.run_name or f"{arch}{task}{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return resume


def start_processes(args):
    """The device, and under torchrun (one process per GPU) this process's place among the others; seeds each."""
    device = resolve_device(args.device)
    ddp = int(os.environ.get("RANK", -1)) != -1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if ddp:
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UsageError(f"torchrun started more processes on this machine than it has GPUs: use "
                                 f"--nproc_per_node={torch.cuda.device_count()}")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise UsageError(f"--device {args.device} ({device}): under torchrun train.py runs on CUDA GPUs, or on "
                             f"the CPU with --device cpu")
        # a rank that exits makes torchrun end the others; the timeout ends a job whose rank hangs
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    if args.cuda_graphs and (device.type != "cuda" or ddp):
        raise UsageError("--cuda-graphs runs only on a CUDA GPU, in one process (not under torchrun)"
                         if device.type == "cuda" else f"--cuda-graphs runs only on a CUDA GPU, not on {device}")
    if args.arch == "mamba2" and args.backend == "official":
        try:
            describe_backend(args.backend, device)
        except RuntimeError as e:
            raise UsageError(f"--backend official: {e}") from None
    rank, world_size = rank_and_world_size()
    torch.manual_seed(args.seed + rank)  # each rank its own dropout (DDP starts them all from rank 0's weights)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # for --no-amp on Ampere+; CPU math stays exact fp32
    return types.SimpleNamespace(device=device, ddp=ddp, local_rank=local_rank, rank=rank, world_size=world_size,
                                 master=rank == 0)


def load_data(args, env):
    """The three splits (on the device, or streamed from get_mnist_dataloaders' loaders) and what they hold."""
    _, mean, std = DATASETS[args.dataset]
    if env.ddp and env.local_rank > 0:  # the first process of each machine downloads while the others wait
        dist.barrier()
    loaders = get_mnist_dataloaders(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                                    val_size=args.val_size, max_train_samples=args.max_train_samples,
                                    seed=args.seed, num_workers=args.num_workers, rank=env.rank,
                                    world_size=env.world_size)
    if env.ddp and env.local_rank == 0:
        dist.barrier()
    if args.data_on_device:
        try:
            splits = [DeviceSplit(dl, env.device, mean, std) for dl in loaders]
        except torch.OutOfMemoryError:
            raise TrainingError(f"the dataset does not fit on {env.device}: use --no-data-on-device") from None
    else:
        splits = [LoaderSplit(dl, env.device) for dl in loaders]
    return types.SimpleNamespace(train=splits[0], val=splits[1], test=splits[2],
                                 sizes=[len(dl.dataset) for dl in loaders], classes=loaders[2].dataset.classes,
                                 shape=tuple(loaders[0].dataset[0][0].shape), mean=mean, std=std)  # shape: (C, H, W)


def build_model(args, data, device):
    """The model the flags describe, its config completed by what the data dictates."""
    config_cls, model_cls = MODELS[args.task, args.arch]
    c, h, w = data.shape
    from_data = dict(in_chans=c, num_classes=len(data.classes), img_size=w, seq_len=h * w,
                     permutation_seed=args.permutation_seed if args.task == "psmnist" else None)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    try:
        return model_cls(config_cls(**{k: v for k, v in {**vars(args), **from_data}.items() if k in fields})).to(device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"invalid model configuration: {e}") from None


class Run:
    """What a training run carries from step to step and saves in its checkpoints: the model (raw_model; with --ema
    also the average of its weights, which validation, the checkpoints' "model" and the test use), AdamW, the
    warmup + cosine schedule, the loss scaler, the history and the best epoch so far."""

    def __init__(self, args, env, data, raw_model, resume):
        self.args, self.env, self.data, self.raw_model = args, env, data, raw_model
        self.model = compile_model(raw_model, args.compile_mode) if args.compile else raw_model
        # training steps go through DDP, which averages the gradients over the ranks; evaluation calls the model
        self.train_model = DDP(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
            if env.ddp else self.model
        self.optimizer = build_optimizer(raw_model, args, env.device)
        self.steps_per_epoch = data.train.num_batches
        total_steps = args.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            min(round(args.warmup_epochs * self.steps_per_epoch), total_steps), total_steps))
        # the average's window (~1/(1-decay) steps) spans at most a quarter of the run, so that a short run averages
        # its last steps, not its random start; a resumed run keeps its decay (even with another --epochs)
        decay = resume["ema_decay"] if resume else min(args.ema, max(0.0, 1 - 4 / total_steps))
        self.ema = WeightAverage(raw_model, decay) if args.ema else None
        average = self.ema.module if self.ema else None
        self.eval_model = (compile_model(average, args.compile_mode) if args.compile else average) if average \
            else self.model
        self.saved_model = average or raw_model
        cuda = env.device.type == "cuda"
        self.use_amp = cuda if args.amp is None else args.amp
        self.amp_dtype = torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16
        # loss scaling only for fp16 (bf16 needs none)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec",
                                        *(["val_acc_raw"] if self.ema else []))}
        self.start_epoch, self.best_val_acc, self.best_epoch, self.metrics, self.epoch_state = 0, -1.0, 0, {}, None
        if resume:
            self.restore(resume)
        if args.cuda_graphs:  # captured now, with the weights it starts from (graphing changes none of them)
            self.capture_graphs()

    def autocast(self):
        """Mixed precision for the training steps (evaluation runs in fp32, as test_model.py does). CUDA graphs need
        autocast's weight cache off (it only saves recasting a weight used twice)."""
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.use_amp,
                              cache_enabled=not self.args.cuda_graphs)

    def capture_graphs(self):
        try:
            with self.autocast():
                sample = torch.zeros(self.args.batch_size, *self.data.shape, device=self.env.device)
                self.train_model = GraphedTraining(self.raw_model, sample)
        except Exception as e:
            what = "ran out of GPU memory (lower --batch-size)" if isinstance(e, torch.OutOfMemoryError) else \
                f"failed ({type(e).__name__}: {e})"
            raise TrainingError(f"capturing the CUDA graphs {what}: train without --cuda-graphs") from None

    def checkpoint(self, epoch, state=None):
        """Called by every rank: each one's random state (and, mid-epoch, where it stands) goes in for an exact
        resume; rank 0 writes the checkpoint."""
        ranks = gather_from_ranks({"rng": get_rng_state(), "epoch_state": state})
        return {"format": CHECKPOINT_FORMAT, "model": self.saved_model.state_dict(),
                "raw_model": self.raw_model.state_dict() if self.ema else None,
                "ema_updates": self.ema.updates if self.ema else 0, "ema_decay": self.ema.decay if self.ema else None,
                "config": dataclasses.asdict(self.raw_model.config), "args": dict(vars(self.args)),
                "dataset": self.args.dataset, "normalization": {"mean": self.data.mean, "std": self.data.std},
                "epoch": epoch, "metrics": dict(self.metrics), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": ranks[0]["rng"],
                "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch, "history": self.history,
                "epoch_state": state, "other_ranks": ranks[1:]}

    def restore(self, resume):
        """Carry on from a checkpoint of checkpoint(): every rank's random state, and where an epoch stood."""
        saved_ranks = [resume, *resume["other_ranks"]]  # rank 0's state at the top
        world_size = self.env.world_size
        if resume["epoch_state"] and len(saved_ranks) != world_size:
            how = (f"under torchrun with {len(saved_ranks)} processes in all" if len(saved_ranks) > 1
                   else "without torchrun")
            raise UsageError(f"{self.args.resume} was saved in the middle of an epoch by {len(saved_ranks)} "
                             f"process(es), so it resumes only {how} (this run has {world_size}); a checkpoint saved "
                             f"at the end of an epoch resumes under any number")
        self.raw_model.load_state_dict(resume["raw_model"] or resume["model"])
        if self.ema:
            self.ema.module.load_state_dict(resume["model"])
            self.ema.updates = resume["ema_updates"]
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        self.scaler.load_state_dict(resume["scaler"])
        self.history, self.metrics = resume["history"], resume["metrics"]
        self.start_epoch, self.best_val_acc, self.best_epoch = resume["epoch"], resume["best_val_acc"], \
            resume["best_epoch"]
        rank = self.env.rank
        if rank < len(saved_ranks):  # (a rank the checkpoint has no state for keeps its fresh one)
            set_rng_state(saved_ranks[rank]["rng"])
            self.epoch_state = saved_ranks[rank]["epoch_state"]
        if len(saved_ranks) != world_size:
            # another number of processes takes another number of steps per epoch: same point of the schedule
            self.scheduler.last_epoch = self.start_epoch * self.steps_per_epoch
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def validate(self, epoch, train_metrics):
        """Score the epoch on the validation split; record it in the history. Returns whether it is the best yet."""
        val_loss, val_acc = evaluate(self.eval_model, self.data.val, self.criterion, "validation")
        if not math.isfinite(val_loss):
            raise TrainingError(f"the validation loss became {val_loss} in epoch {epoch}: stopping; the checkpoints "
                                f"from before are kept (try a lower --lr)")
        self.metrics = {**train_metrics, "val_loss": val_loss, "val_acc": val_acc,
                        "lr": self.optimizer.param_groups[0]["lr"]}
        if self.ema:
            self.metrics["val_acc_raw"] = evaluate(self.model, self.data.val, self.criterion,
                                                   "validation (raw weights)")[1]
        for key in self.history:
            self.history[key].append(self.metrics[key])
        improved = val_acc > self.best_val_acc
        if improved:
            self.best_val_acc, self.best_epoch = val_acc, epoch
        return improved


def describe_run(args, env, data, run, resume):
    """What is about to train, on what, how."""
    n_train, n_val, n_test = data.sizes
    print0(f"{args.dataset}: {n_train:,} train / {n_val:,} validation / {n_test:,} test images, "
           f"{'on ' + str(env.device) if args.data_on_device else 'DataLoaders'}")
    if args.task != "image":
        order = ("row-major order" if args.task == "smnist" else
                 f"the order of --permutation-seed {args.permutation_seed}")
        print0(f"task {args.task}: {run.raw_model.config.seq_len} pixels per image, one per step, in {order}")
    compiled = ", CUDA graphs" if args.cuda_graphs else "" if not args.compile else \
        ", compiled" if args.compile_mode == "default" else f", compiled ({args.compile_mode})"
    amp = str(run.amp_dtype).removeprefix("torch.") if run.use_amp else "off"
    average = f", weight average (decay {run.ema.decay:.4g})" if run.ema else ""
    print0(f"model: {args.arch}, {count_params(run.raw_model):,} parameters, device {env.device}, amp {amp}"
           f"{compiled}{average}")
    if args.arch == "mamba2":
        print0(f"backend: {describe_backend(args.backend, env.device)}")
    if env.ddp:
        print0(f"torchrun: {env.world_size} processes ({dist.get_backend()}), each {data.train.num_samples:,} "
               f"training images per epoch in steps of {args.batch_size}: effective batch size "
               f"{env.world_size * args.batch_size}, {run.steps_per_epoch} steps per epoch, peak lr {args.lr:g}")
    if resume:
        state = run.epoch_state
        at = f"epoch {run.start_epoch}" + (f", step {state['step']} of the next" if state else "")
        print0(f"resuming {args.resume} after {at} (best validation accuracy so far {run.best_val_acc:.2%})")
    print0(f"TensorBoard: tensorboard --logdir {args.log_dir}   (run {args.run_name})")


def output_paths(args):
    """(best checkpoint, last checkpoint, training_history.png)."""
    root, ext = os.path.splitext(args.out)
    return args.out, f"{root}_last{ext or '.pth'}", os.path.join(os.path.dirname(args.out), "training_history.png")


def log_scalars(run, epoch, writer):
    """Rank 0: the epoch's numbers in TensorBoard; "loss/..." and "accuracy/..." put train and validation side by
    side."""
    m = run.metrics
    scalars = {"loss/train": m["train_loss"], "loss/val": m["val_loss"], "accuracy/train": m["train_acc"],
               "accuracy/val": m["val_acc"], "lr": m["lr"], "images_per_sec": m["images_per_sec"]}
    if run.ema:
        scalars["accuracy/val_raw_weights"] = m["val_acc_raw"]
    for name, value in scalars.items():
        writer.add_scalar(name, value, epoch)
    writer.flush()


def fit(run, writer):
    """The epoch loop: train, validate, checkpoint; early stop. Returns 130 after Ctrl-C (saved to resume), else 0."""
    args, env = run.args, run.env
    _, last_path, plot_path = output_paths(args)
    resume_hint = f"continue with: {'torchrun <as before>' if env.ddp else 'python'} train.py --resume {last_path}"
    patience = max(5, args.epochs // 2) if args.patience is None else args.patience  # after a resume: its --epochs
    try:
        with GracefulInterrupt() as stop:
            for epoch in range(run.start_epoch + 1, args.epochs + 1):
                if patience and epoch - 1 - run.best_epoch >= patience:
                    print0(f"early stop: no better validation accuracy for {patience} epochs")
                    break
                train_metrics, run.epoch_state = train_one_epoch(
                    run.train_model, run.data.train, optimizer=run.optimizer, scheduler=run.scheduler,
                    scaler=run.scaler, criterion=run.criterion, autocast=run.autocast, args=args, epoch=epoch,
                    stop=stop, update_ema=run.ema.update if run.ema else None, resume=run.epoch_state)
                if run.epoch_state:
                    ckpt = run.checkpoint(epoch - 1, run.epoch_state)
                    if env.master:
                        save_checkpoint(ckpt, last_path)
                    print0(f"interrupted in epoch {epoch} at step {run.epoch_state['step']}/{run.steps_per_epoch}: "
                           f"saved {last_path}; {resume_hint}", file=sys.stderr)
                    return 130
                if env.ddp:  # DDP syncs buffers at each training forward only: evaluate with rank 0's BatchNorm
                    for buffer in itertools.chain(run.raw_model.buffers(), run.ema.module.buffers() if run.ema else []):
                        dist.broadcast(buffer, 0)  # statistics (--arch cnn), the ones its checkpoint holds
                improved = run.validate(epoch, train_metrics)
                ckpt = run.checkpoint(epoch)
                if env.master:
                    log_scalars(run, epoch, writer)
                    if improved:
                        save_checkpoint(ckpt, args.out)
                    save_checkpoint(ckpt, last_path)
                    plot_history(run.history, plot_path, augmented=augments(args))
                print0(epoch_line(run, epoch, improved))
                # Ctrl-C at the very end of the epoch (on any rank): it is saved whole
                if sum_over_ranks([stop.requested], env.device)[0]:
                    print0(f"interrupted after epoch {epoch}: saved {last_path}; {resume_hint}", file=sys.stderr)
                    return 130
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of memory on {env.device}: lower --batch-size (now {args.batch_size}), or "
                            f"--d-model / --num-blocks, or turn on --amp") from None
    return 0


def epoch_line(run, epoch, improved):
    m = run.metrics
    raw = f" (raw weights {m['val_acc_raw']:.2%})" if run.ema else ""
    return (f"epoch {epoch}/{run.args.epochs} | train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%} | val loss "
            f"{m['val_loss']:.4f} acc {m['val_acc']:.2%}{raw} | lr {m['lr']:.2e} | {m['images_per_sec']:,.0f} img/s"
            f"{' | best' if improved else ''}")


def final_test(run, writer):
    """The test set, once, in fp32, with the weights that were best on validation (rank 0 reads them, all evaluate);
    its numbers go into the best checkpoint and TensorBoard's hparams."""
    args, env = run.args, run.env
    best_path, last_path, plot_path = output_paths(args)
    if env.master and not os.path.exists(best_path):
        raise UsageError(f"no best checkpoint at {best_path}: pass the --out of the run being resumed")
    best = load_checkpoint(best_path, "--out") if env.master else None
    run.raw_model.load_state_dict(from_rank0(best["model"] if env.master else None))
    test_loss, test_acc = evaluate(run.model, run.data.test, run.criterion, "test")
    if env.master:
        best["metrics"].update(test_loss=test_loss, test_acc=test_acc)
        save_checkpoint(best, best_path)
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in vars(args).items()}
        writer.add_hparams({**hparams, "parameters": count_params(run.raw_model)},
                           {"test/accuracy": test_acc, "test/loss": test_loss, "val/best_accuracy": run.best_val_acc},
                           run_name=".", global_step=len(run.history["val_acc"]))  # ".": this run, beside its curves
        write_results(run, test_loss, test_acc)
    weights = "averaged weights" if run.ema else "weights"
    print0(f"test: loss {test_loss:.4f} acc {test_acc:.2%} with the {weights} of epoch {run.best_epoch} (validation "
           f"acc {run.best_val_acc:.2%}) -> {best_path}, {last_path}, {plot_path}, {results_path(run.args)}")


def results_path(args):
    return os.path.splitext(args.out)[0] + ".json"


def write_results(run, test_loss, test_acc):
    """The run's numbers as JSON next to the checkpoint (vision_mamba2_mnist.json), for scripts such as .ci/gpu.py.
    train_wall_s: this process's time from start to the end of the test (a resumed run's counts from its resume)."""
    args, env = run.args, run.env
    results = {"test_acc": test_acc, "test_loss": test_loss, "best_epoch": run.best_epoch,
               "best_val_acc": run.best_val_acc, "epochs_done": len(run.history["val_acc"]),
               "train_wall_s": time.perf_counter() - run.started, "images_per_sec": run.history["images_per_sec"],
               "backend": describe_backend(args.backend, env.device) if args.arch == "mamba2" else None,
               "device": str(env.device), "amp": str(run.amp_dtype).removeprefix("torch.") if run.use_amp else None,
               "args": dict(vars(args))}
    atomic_write(results_path(args), lambda f: f.write(json.dumps(results, indent=2).encode()))


def train(args, given):
    """The whole run; returns the exit status (0, or 130 after Ctrl-C). `given`: the flags on the command line."""
    started = time.perf_counter()
    resume = settle_args(args, given)
    env = start_processes(args)
    data = load_data(args, env)
    run = Run(args, env, data, build_model(args, data, env.device), resume)
    run.started = started
    describe_run(args, env, data, run, resume)
    writer = SummaryWriter(os.path.join(args.log_dir, args.run_name),
                           purge_step=run.start_epoch + 1 if resume else None) if env.master else None
    with writer or contextlib.nullcontext():
        status = fit(run, writer)
        if status == 0:
            final_test(run, writer)
    return status


def main(argv=None):
    keep_freed_memory_in_process()
    parser = build_parser()
    args = parser.parse_args(argv)

    rank = os.environ.get("RANK")  # set by torchrun: say which process failed

    def run():
        status = train(args, given_flags(parser, argv))
        if dist.is_initialized():  # every rank got here (after an error torchrun ends the others)
            dist.destroy_process_group()
        return status
    sys.exit(exit_status(run, f" (rank {rank})" if rank else ""))


if __name__ == "__main__":
    main()

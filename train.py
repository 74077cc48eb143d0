"""
Train Vision Mamba 2 on MNIST (or Fashion-MNIST; or the CNN / ViT baselines; or sequential MNIST).

    python train.py                                   # the default recipe: Vision Mamba 2 on MNIST
    python train.py --dataset fashion-mnist           # -> vision_mamba2_fashion_mnist.pth
    python train.py --resume vision_mamba2_mnist_last.pth   # after Ctrl-C or a crash: redoes the unfinished epoch
    python train.py --task psmnist                    # sequential MNIST: one pixel per step, in a fixed random order
    torchrun --nproc_per_node=4 train.py              # 4 GPUs (DistributedDataParallel; on CPU: 4 processes)

Read top to bottom: flags, processes, data, model, optimizer and schedule, the epoch loop, the final test, main.
Each split lives on the device as one uint8 tensor (data.py): the hot loop never touches PIL or a DataLoader. Model
selection and early stopping look at a validation split of the training set; the test set is used once, at the end.

Outputs: the best-on-validation checkpoint (--out), a resumable last checkpoint next to it (*_last.pth), the run's
numbers as JSON (*.json), training_history.png, and TensorBoard logs in runs/<run-name>/, all beside --out.
"""

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from torchvision import transforms
from tqdm import tqdm

from checkpoint import (MODELS, atomic_write, load_checkpoint, model_kind, restore_run, run_checkpoint,
                        save_checkpoint)
from cli import (HelpFormatter, Parser, TrainingError, UsageError, add_config_flags, device_name, exit_status,
                 float_in, given_flags, int_at_least, resolve_device)
from data import DATASETS, DeviceSplit, load_datasets, random_affine
from steps import WeightAverage, compile_model, graph_training, keep_freed_memory_in_process, training_step
from vision_mamba2 import count_params, describe_backend, resolve_backend

# ----------------------------------------------------------------------------------------------------
# Flags. The model's come from its config dataclass (vision_mamba2.py, baselines.py), one per field that has a help
# line; the recipe's constants below are not flags: they were measured once and nobody needs to turn them.

WARMUP_EPOCHS = 1.0  # linear warmup of the learning rate, then cosine decay to 0 at the last step
WEIGHT_DECAY = 0.05  # AdamW's, on weight matrices only (not on biases, norms, embeddings or the SSM's A_log/D/dt_bias)
LABEL_SMOOTHING = 0.1  # reported losses include it
GRAD_CLIP = 1.0  # on the global gradient norm
LOG_INTERVAL = 25  # steps between progress-bar updates and NaN checks: each costs one device sync

# The recipe's defaults that depend on the task or the dataset (a flag given on the command line still wins). The
# sequential tasks: no augmentation (a warp moves pixels to other steps of the sequence), no weight average (it was
# measured on images only), longer training. Fashion-MNIST's garments are upright and of one size: shifts alone did
# better than MNIST's warp for Vision Mamba 2 and the CNN alike (docs/results.md).
NO_AUGMENTATION = {"aug_translate": 0.0, "aug_rotate": 0.0, "aug_scale": 0.0}
RECIPES = {"smnist": {**NO_AUGMENTATION, "epochs": 30, "ema": 0.0},
           "psmnist": {**NO_AUGMENTATION, "epochs": 30, "ema": 0.0},
           "fashion-mnist": {"aug_translate": 2.0, "aug_rotate": 0.0, "aug_scale": 0.0}}

# what a resumed run may change; the other flags must agree with the checkpoint
RESUME_MAY_CHANGE = {"epochs", "patience", "device", "amp", "compile", "cuda_graphs", "data_dir", "out", "resume"}


def build_parser(task="image", arch="mamba2", dataset="mnist"):
    """train.py's flags; the model group holds those of the (task, arch) model's config, and the defaults are the
    task's and the dataset's recipe (RECIPES), so that --help shows what a run of them uses."""
    p = Parser(prog="train.py", formatter_class=HelpFormatter,
               description="Train Vision Mamba 2 (or the CNN / ViT baselines, or a sequential model) on MNIST-like "
                           "data. The defaults are the recipe measured in docs/results.md.",
               epilog="--resume takes every flag not given from the checkpoint; only --epochs, --patience and the "
                      "runtime flags may differ. `train.py --arch cnn --help` lists the CNN's model flags (and so on).")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=["image", "smnist", "psmnist"], default="image",
                   help="image: the 2-D classifier; smnist: one pixel per step (784 steps); psmnist: in a fixed "
                        "random pixel order")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist",
                   help="mnist1d: Greydanus' 40-step signals, for --task smnist/psmnist")
    g.add_argument("--data-dir", default="./data", metavar="DIR",
                   help="torchvision root: <data-dir>/MNIST/raw/ and the like")
    g.add_argument("--max-train-samples", type=int_at_least(1), default=None, metavar="N",
                   help="train on only this many images, for quick runs (default: all)")
    g = p.add_argument_group("augmentation: a random affine warp of each training image (0 = off)")
    g.add_argument("--aug-translate", type=float_in(0, 14), default=3.0, metavar="PX", help="maximum shift")
    g.add_argument("--aug-rotate", type=float_in(0, 180), default=15.0, metavar="DEG", help="maximum rotation")
    g.add_argument("--aug-scale", type=float_in(0, 1, hi_open=True), default=0.15, metavar="FRAC",
                   help="maximum zoom, a fraction")
    g = p.add_argument_group(f"model: {task}/{arch} (vision_mamba2.py, baselines.py)")
    g.add_argument("--arch", choices=sorted({a for _, a in MODELS}), default="mamba2",
                   help="mamba2: Vision Mamba 2; cnn, vit: baselines of about its size")
    add_config_flags(g, MODELS[task, arch][0])
    g = p.add_argument_group("optimization: AdamW, warmup and cosine decay, label smoothing, gradient clipping")
    g.add_argument("--epochs", type=int_at_least(1), default=10, metavar="N", help="passes over the training split")
    g.add_argument("--batch-size", type=int_at_least(1), default=128, metavar="N", help="images per step and process")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=2e-3, help="peak learning rate")
    g.add_argument("--ema", type=float_in(0, 1, hi_open=True), default=0.999,
                   help="decay of the weights' moving average that is validated, saved and tested (0 = off)")
    g.add_argument("--patience", type=int_at_least(0), default=None, metavar="N",
                   help="stop after this many epochs without a better validation accuracy (default: half of "
                        "--epochs, at least 5; 0 = never)")
    g.add_argument("--seed", type=int_at_least(0), default=0, metavar="N",
                   help="seeds initialisation, the validation split, shuffling, augmentation and dropout")
    g = p.add_argument_group("runtime and output")
    g.add_argument("--device", type=device_name, default="auto", help="auto: cuda, then mps, then cpu")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bf16 (fp16 with loss scaling where the GPU lacks bf16) (default: on CUDA)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: minutes of compiling, then faster GPU steps")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="replay the training step as CUDA graphs (one GPU, not with --compile)")
    g.add_argument("--out", default=None, metavar="PATH",
                   help="best checkpoint; *_last.pth, *.json, training_history.png and TensorBoard's runs/ go beside "
                        "it (default: named after model, task and dataset, e.g. vision_mamba2_mnist.pth)")
    g.add_argument("--resume", metavar="PATH", default=None, help="continue the run saved in this *_last.pth")
    p.set_defaults(**{**RECIPES.get(dataset, {}), **RECIPES.get(task, {})})  # a sequential task is never warped
    return p


def default_out(task, arch, dataset):
    """--out's default names what was trained, so that another task, model or dataset never overwrites a checkpoint:
    vision_mamba2_mnist.pth, cnn_fashion_mnist.pth, vision_mamba2_smnist.pth, vision_mamba2_smnist_mnist1d.pth."""
    parts = [{"mamba2": "vision_mamba2"}.get(arch, arch)]
    if task != "image":
        parts.append(task)  # smnist / psmnist name MNIST already
    if task == "image" or dataset != "mnist":
        parts.append(dataset.replace("-", "_"))
    return "_".join(parts) + ".pth"


def refuse_unknown(unknown, task, arch, parser):
    """One line for flags this model does not have: whose they are, if another model's."""
    name = unknown[0].split("=")[0].lstrip("-").removeprefix("no-").replace("-", "_")
    owners = [f"{t}/{a}" for (t, a), (config_cls, _) in MODELS.items()
              if any(f.name == name and "help" in f.metadata for f in dataclasses.fields(config_cls))]
    if owners and unknown[0].startswith("--"):
        raise UsageError(f"{unknown[0]} belongs to --task/--arch {', '.join(owners)}, not to {task}/{arch} (see "
                         f"train.py --task {task} --arch {arch} --help)")
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")


def merge_resume_args(args, saved, given):
    """A resumed run is the saved run: every flag not on the command line comes from the checkpoint."""
    for key, value in saved.items():
        if key not in given:
            setattr(args, key, value)
        elif key not in RESUME_MAY_CHANGE and getattr(args, key) != value:
            flags = ", ".join(sorted(RESUME_MAY_CHANGE))
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts the checkpoint's {value}: "
                             f"a resumed run keeps its hyperparameters (only {flags} may change)")


def check_args(args, given):
    """Refuse what means nothing, before any data is loaded."""
    warps = {"aug_translate", "aug_rotate", "aug_scale"} & given
    if args.task != "image" and warps:
        raise UsageError(f"--{min(warps).replace('_', '-')} applies only to --task image: a warp would move "
                         f"pixels to other steps of the sequence")
    if DATASETS[args.dataset].signals and args.task == "image":
        raise UsageError(f"--dataset {args.dataset} holds 1-D sequences, not images: train on it with --task smnist "
                         f"(read in order) or psmnist (in a fixed random order)")
    if args.cuda_graphs and args.compile:
        raise UsageError("--cuda-graphs and --compile exclude each other")
    if os.path.isdir(args.out) or args.out.endswith(os.sep):
        example = os.path.join(args.out, default_out(args.task, args.arch, args.dataset))
        raise UsageError(f"--out {args.out} is a folder: name the checkpoint file, e.g. {example}")
    if args.out.endswith(".json"):  # the run's numbers go to --out's name with .json: never over the checkpoint
        raise UsageError(f"--out {args.out}: name the checkpoint .pth (its numbers are written beside it as .json)")


def parse_args(argv):
    """(args, the checkpoint to resume or None). The model flags depend on --task and --arch (a resumed run's: on its
    checkpoint's) and the defaults on --task and --dataset, so those are read first."""
    first = argparse.ArgumentParser(add_help=False)
    for flag in ("--task", "--arch", "--dataset", "--resume"):
        first.add_argument(flag)
    known, _ = first.parse_known_args(argv)
    resume = load_checkpoint(known.resume, "--resume") if known.resume else None
    if resume and "optimizer" not in resume:
        raise UsageError(f"--resume {known.resume} holds a trained model only (no optimizer state), as the shipped "
                         f"pretrained model does: evaluate it with test_model.py; --resume continues a run of train.py "
                         f"from its *_last.pth")
    task, arch = model_kind(resume) if resume else (known.task or "image", known.arch or "mamba2")
    if (task, arch) not in MODELS:
        if task in {t for t, _ in MODELS} and arch in {a for _, a in MODELS}:
            raise UsageError(f"--arch {arch} is an image classifier: --task {task} takes only --arch mamba2")
        build_parser().parse_args(argv)  # an unknown --task or --arch: argparse's one line, with the choices
    parser = build_parser(task, arch, known.dataset or "mnist")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(unknown, task, arch, parser)
    given = given_flags(parser, argv)
    if resume:
        merge_resume_args(args, resume["args"], given)
    else:
        args.out = args.out or default_out(args.task, args.arch, args.dataset)
        # TensorBoard's folder for this run, named after its checkpoint; a resumed run logs on into its own
        args.run_name = f"{os.path.splitext(os.path.basename(args.out))[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_args(args, given)
    return args, resume


# ----------------------------------------------------------------------------------------------------
# Processes: one, or one per GPU under torchrun, whose collectives every rank calls at the same point (without
# torchrun they hand back what they are given). Only rank 0 prints and writes files.

def rank_and_world_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*values, **kwargs):
    if rank_and_world_size()[0] == 0:
        print(*values, **kwargs)


def sum_over_ranks(values, device):
    """The numbers in `values` (a list of floats) summed over all ranks, in one all_reduce."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def from_rank0(obj):
    """Rank 0's obj, on every rank."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def start_processes(args):
    """The device, and under torchrun this process's place among the others; seeds each."""
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
            raise UsageError(f"--device {args.device}: under torchrun train.py runs on CUDA GPUs, or with --device cpu")
        # a rank that exits makes torchrun end the others; the timeout ends a job whose rank hangs
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    if args.cuda_graphs and (device.type != "cuda" or ddp):
        raise UsageError(f"--cuda-graphs runs on one CUDA GPU, in one process (here: {device}"
                         f"{', under torchrun' if ddp else ''})")
    rank, world_size = rank_and_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # for --no-amp on Ampere+; CPU math stays exact fp32
    return types.SimpleNamespace(device=device, ddp=ddp, local_rank=local_rank, rank=rank, world_size=world_size,
                                 master=rank == 0)


# ----------------------------------------------------------------------------------------------------
# Data

def get_mnist_dataloaders(*, dataset="mnist", data_dir="./data", batch_size=128, max_train_samples=None, seed=0,
                          rank=0, world_size=1):
    """Train / validation / test DataLoaders of normalized (B, 1, 28, 28) images and labels (train.py moves them onto
    the device whole: data.DeviceSplit); the validation split, a fixed fraction of the training set, is drawn by
    `seed`. Process `rank` gets its share of every epoch's shuffle (all the same size: the ranks step together) and
    its own slice of validation and test, whose sums are all-reduced."""
    info = DATASETS[dataset]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((info.mean,), (info.std,))])
    train_full, test = load_datasets(dataset, data_dir, tf)
    perm = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(seed)).tolist()
    val_size = round(info.val_fraction * len(train_full))
    train_set = Subset(train_full, perm[val_size:][:max_train_samples])
    val_set = Subset(train_full, perm[:val_size])

    def part(n):
        return range(rank * n // world_size, (rank + 1) * n // world_size)
    sampler = DistributedSampler(train_set, world_size, rank, seed=seed, drop_last=True) if world_size > 1 else None
    return (DataLoader(train_set, batch_size=batch_size, sampler=sampler, shuffle=sampler is None),
            DataLoader(val_set, batch_size=2 * batch_size, sampler=part(len(val_set))),
            DataLoader(test, batch_size=2 * batch_size, sampler=part(len(test))))


def load_data(args, env):
    """The three splits as DeviceSplits, and what they hold."""
    info = DATASETS[args.dataset]
    if env.ddp and env.local_rank > 0:  # the first process of each machine downloads while the others wait
        dist.barrier()
    loaders = get_mnist_dataloaders(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                                    max_train_samples=args.max_train_samples, seed=args.seed, rank=env.rank,
                                    world_size=env.world_size)
    if env.ddp and env.local_rank == 0:
        dist.barrier()
    try:
        splits = [DeviceSplit(dl, env.device, info.mean, info.std) for dl in loaders]
    except torch.OutOfMemoryError:
        raise TrainingError(f"the dataset does not fit on {env.device}") from None
    return types.SimpleNamespace(train=splits[0], val=splits[1], test=splits[2], mean=info.mean, std=info.std,
                                 sizes=[len(dl.dataset) for dl in loaders])


# ----------------------------------------------------------------------------------------------------
# Model

def build_model(args, device):
    """The model the flags describe, completed by what the dataset dictates, built before any data is loaded."""
    config_cls, model_cls = MODELS[args.task, args.arch]
    info = DATASETS[args.dataset]
    c, h, w = info.shape
    seed = getattr(args, "permutation_seed", None)
    if args.task == "smnist" and seed is not None:
        raise UsageError("--permutation-seed applies only to --task psmnist (smnist reads the pixels in order)")
    from_data = dict(in_chans=c, num_classes=len(info.cls.classes), img_size=w, seq_len=h * w,
                     permutation_seed=(seed or 0) if args.task == "psmnist" else None)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    try:
        config = config_cls(**{k: v for k, v in {**vars(args), **from_data}.items() if k in fields})
        config.validate()
        if getattr(config, "backend", None) == "official":
            resolve_backend("official", device)  # the official kernels run on this device, or an error says why not
        model = model_cls(config)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"invalid model configuration: {e}") from None
    return model.to(device)  # (out of memory here is no configuration error)


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule

def build_optimizer(model, args, device):
    # as Mamba and most vision transformers: no decay on biases, norms, embeddings or the SSM's A_log/D/dt_bias
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def learning_rate(step, *, lr, warmup_steps, total_steps):
    """The learning rate of optimizer step `step` (from 0): linear warmup to lr, then cosine decay to 0. A function
    of the step alone, so that a resumed run only needs to know where it is."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------------
# The run: what training carries from step to step (checkpoint.py saves and restores it)

def setup(args, env, data, model, resume):
    """The model as it trains (raw_model; compiled, DDP or graphed for the steps; with --ema also the average of its
    weights, which validation, the checkpoints' "model" and the test use), AdamW, mixed precision and the state of
    the run (history, best epoch), restored from `resume` if given."""
    run = types.SimpleNamespace(args=args, env=env, data=data, raw_model=model, history={}, metrics={},
                                start_epoch=0, best_val_acc=-1.0, best_epoch=0)
    run.model = compile_model(model) if args.compile else model
    run.train_model = DDP(run.model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.ddp else run.model
    run.optimizer = build_optimizer(model, args, env.device)
    run.steps_per_epoch = data.train.num_batches
    total_steps = args.epochs * run.steps_per_epoch
    run.schedule = dict(lr=args.lr, warmup_steps=min(round(WARMUP_EPOCHS * run.steps_per_epoch), total_steps),
                        total_steps=total_steps)
    # the average's window (~1/(1-decay) steps) spans at most a quarter of the run, so that a short run averages its
    # last steps, not its random start; a resumed run keeps its decay (even with another --epochs)
    decay = resume["ema_decay"] if resume else min(args.ema, max(0.0, 1 - 4 / total_steps))
    run.ema = WeightAverage(model, decay) if args.ema else None
    average = run.ema.module if run.ema else None
    run.eval_model = (compile_model(average) if args.compile else average) if average else run.model
    cuda = env.device.type == "cuda"
    run.use_amp = cuda if args.amp is None else args.amp
    run.amp_dtype = torch.float16 if cuda and not torch.cuda.is_bf16_supported() else torch.bfloat16
    run.scaler = torch.amp.GradScaler(env.device.type, enabled=run.use_amp and run.amp_dtype == torch.float16)
    run.amp = str(run.amp_dtype).removeprefix("torch.") if run.use_amp else None  # as printed and in the JSON
    # CUDA graphs need autocast's weight cache off (it only saves recasting a weight used twice)
    run.autocast = lambda: torch.autocast(env.device.type, dtype=run.amp_dtype, enabled=run.use_amp,
                                          cache_enabled=not args.cuda_graphs)
    run.criterion = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    run.history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec",
                                   *(["val_acc_raw"] if run.ema else []))}
    if resume:
        restore_run(run, resume)
    if args.cuda_graphs:  # captured now, with the weights it starts from (graphing changes none of them)
        with run.autocast():
            run.train_model = graph_training(model, torch.zeros(args.batch_size, *DATASETS[args.dataset].shape,
                                                                device=env.device))
    return run


# ----------------------------------------------------------------------------------------------------
# The epoch loop

def epoch_totals(loss_sum, correct, seen, epoch):
    """(mean loss, accuracy) of the epoch so far, over all ranks (which all take batches of the same sizes), so that
    every rank sees the same NaN and stops at the same step."""
    loss_total, correct_total = sum_over_ranks([loss_sum.item(), correct.item()], loss_sum.device)
    n = max(seen * rank_and_world_size()[1], 1)
    if not math.isfinite(loss_total):
        raise TrainingError(f"the training loss became {loss_total / n} in epoch {epoch}: stopping; the checkpoints "
                            f"from before are kept (try a lower --lr)")
    return loss_total / n, correct_total / n


def augmenting(args):
    return bool(args.aug_translate or args.aug_rotate or args.aug_scale)


def train_one_epoch(run, epoch):
    """One pass over the training split. The epoch's shuffle, augmentation and dropout are seeded by (seed, epoch),
    so a resumed run redoes an interrupted epoch exactly. Under torchrun every rank draws the same shuffle (and takes
    its share of it), then its own augmentation and dropout."""
    args, split, device = run.args, run.data.train, run.data.train.device
    rank, world_size = rank_and_world_size()
    seed = args.seed * 100_003 + epoch
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = split.batches(generator)  # draws this epoch's order
    generator.manual_seed(seed * 1_000_003 + rank)  # then each rank its own augmentation
    torch.manual_seed(seed * 1_000_003 + 500_009 + rank)  # and dropout
    fill = -run.data.mean / run.data.std  # a black pixel, normalized
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    seen, t0 = 0, time.perf_counter()
    run.train_model.train()
    bar = tqdm(batches, total=split.num_batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False,
               dynamic_ncols=True, disable=rank > 0)
    for i, (x, y) in enumerate(bar):
        # x : (B, C, H, W) normalized, y : (B,)
        step = (epoch - 1) * run.steps_per_epoch + i
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(step, **run.schedule)
        if augmenting(args):
            x = random_affine(x, generator, translate=args.aug_translate, rotate=args.aug_rotate,
                              scale=args.aug_scale, fill=fill)
        logits, loss = training_step(run.train_model, x, y, optimizer=run.optimizer, criterion=run.criterion,
                                     scaler=run.scaler, autocast=run.autocast, grad_clip=GRAD_CLIP)
        if run.ema:
            run.ema.update()
        # running sums stay on the device: reading them is a host sync, done only every LOG_INTERVAL steps
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
        if (i + 1) % LOG_INTERVAL == 0:
            loss_mean, acc = epoch_totals(loss_sum, correct, seen, epoch)
            rate = world_size * seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss_mean:.4f}", acc=f"{acc:.2%}", img_s=f"{rate:,.0f}")
    bar.close()
    train_loss, train_acc = epoch_totals(loss_sum, correct, seen, epoch)  # waits for the device: honest timing
    return {"train_loss": train_loss, "train_acc": train_acc,
            "images_per_sec": world_size * seen / (time.perf_counter() - t0)}


@torch.no_grad()
def evaluate(model, split, criterion, desc):
    """(mean loss, accuracy) over a whole split, in fp32 (as test_model.py, so both give the same accuracy for the
    same weights); under torchrun each rank evaluates its slice of it."""
    model.eval()
    loss_sum = torch.zeros((), device=split.device)
    correct = torch.zeros((), dtype=torch.long, device=split.device)
    for x, y in tqdm(split.batches(), total=split.num_batches, desc=desc, unit="batch", leave=False,
                     dynamic_ncols=True, disable=rank_and_world_size()[0] > 0):
        logits = model(x)
        loss_sum += criterion(logits, y) * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
    loss_total, correct_total, n = sum_over_ranks([loss_sum.item(), correct.item(), split.num_samples], split.device)
    return loss_total / n, correct_total / n


def validate(run, epoch, train_metrics):
    """Score the epoch on the validation split; record it in the history. Returns whether it is the best yet."""
    if run.env.ddp:  # DDP syncs buffers at each training forward only: evaluate with rank 0's BatchNorm statistics
        for buffer in itertools.chain(run.raw_model.buffers(), run.ema.module.buffers() if run.ema else []):
            dist.broadcast(buffer, 0)  # (--arch cnn), the ones its checkpoint holds
    val_loss, val_acc = evaluate(run.eval_model, run.data.val, run.criterion, "validation")
    if not math.isfinite(val_loss):
        raise TrainingError(f"the validation loss became {val_loss} in epoch {epoch}: stopping; the checkpoints "
                            f"from before are kept (try a lower --lr)")
    run.metrics = {**train_metrics, "val_loss": val_loss, "val_acc": val_acc,
                   "lr": run.optimizer.param_groups[0]["lr"]}
    if run.ema:
        run.metrics["val_acc_raw"] = evaluate(run.model, run.data.val, run.criterion, "validation (raw weights)")[1]
    for key in run.history:
        run.history[key].append(run.metrics[key])
    improved = val_acc > run.best_val_acc
    if improved:
        run.best_val_acc, run.best_epoch = val_acc, epoch
    return improved


def output_paths(args):
    """(best checkpoint, last checkpoint, training_history.png, results JSON, TensorBoard logs), all beside --out."""
    root, ext = os.path.splitext(args.out)
    folder = os.path.dirname(args.out)
    return (args.out, f"{root}_last{ext or '.pth'}", os.path.join(folder, "training_history.png"), root + ".json",
            os.path.join(folder, "runs"))


def epoch_line(run, epoch, improved):
    m = run.metrics
    raw = f" (raw weights {m['val_acc_raw']:.2%})" if run.ema else ""
    return (f"epoch {epoch}/{run.args.epochs} | train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%} | val loss "
            f"{m['val_loss']:.4f} acc {m['val_acc']:.2%}{raw} | lr {m['lr']:.2e} | {m['images_per_sec']:,.0f} img/s"
            f"{' | best' if improved else ''}")


def log_scalars(run, epoch, writer):
    """The epoch's numbers in TensorBoard; "loss/..." and "accuracy/..." put train and validation side by side."""
    names = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
             "val_acc": "accuracy/val", "val_acc_raw": "accuracy/val_raw_weights", "lr": "lr",
             "images_per_sec": "images_per_sec"}
    for key, value in run.metrics.items():
        writer.add_scalar(names[key], value, epoch)
    writer.flush()


def plot_history(history, path, *, augmented):
    epochs = range(1, len(history["train_loss"]) + 1)
    fig = Figure(figsize=(11, 4))  # not pyplot's: nothing to show, no backend to pick, nothing to close
    ax_loss, ax_acc = fig.subplots(1, 2)
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


def write_results(run, path, test_loss=None, test_acc=None):
    """The run's numbers for scripts (.ci/gpu.py reads them), after every epoch (a run cut short keeps them) and with
    the test's once it ran. train_wall_s: this process's time from its start (a resumed run's: from the resume)."""
    args, env = run.args, run.env
    results = {"test_acc": test_acc, "test_loss": test_loss, "best_epoch": run.best_epoch,
               "best_val_acc": run.best_val_acc, "epochs_done": len(run.history["val_acc"]),
               "train_wall_s": time.perf_counter() - run.started, "images_per_sec": run.history["images_per_sec"],
               "backend": describe_backend(args.backend, env.device) if args.arch == "mamba2" else None,
               "device": str(env.device), "amp": run.amp,
               "args": dict(vars(args))}
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode()))


def fit(run, writer):
    """The epoch loop: train, validate, checkpoint; early stop. Returns 130 after Ctrl-C, else 0."""
    args, env = run.args, run.env
    best_path, last_path, plot_path, results_path, _ = output_paths(args)
    patience = max(5, args.epochs // 2) if args.patience is None else args.patience
    for epoch in range(run.start_epoch + 1, args.epochs + 1):
        if patience and epoch - 1 - run.best_epoch >= patience:
            print0(f"early stop: no better validation accuracy for {patience} epochs")
            break
        try:
            train_metrics = train_one_epoch(run, epoch)
        except KeyboardInterrupt:
            how = "torchrun <as before>" if env.ddp else "python"
            print0(f"interrupted in epoch {epoch}: {last_path} holds epoch {epoch - 1}; continue with: {how} train.py "
                   f"--resume {last_path} (epoch {epoch} starts again)", file=sys.stderr)
            return 130
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of memory on {env.device}: lower --batch-size (now {args.batch_size}), or "
                                f"--d-model / --num-blocks, or turn on --amp") from None
        improved = validate(run, epoch, train_metrics)
        if env.master:
            log_scalars(run, epoch, writer)
            ckpt = run_checkpoint(run, epoch)
            if improved:
                save_checkpoint(ckpt, best_path)
            save_checkpoint(ckpt, last_path)
            plot_history(run.history, plot_path, augmented=augmenting(args))
            write_results(run, results_path)
        print0(epoch_line(run, epoch, improved))
    return 0


# ----------------------------------------------------------------------------------------------------
# The final test

def final_test(run, writer):
    """The test set, once, in fp32, with the weights that were best on validation (rank 0 reads them, all evaluate);
    its numbers go into the best checkpoint, TensorBoard's hparams and the results JSON."""
    args, env = run.args, run.env
    best_path, last_path, plot_path, results_path, _ = output_paths(args)
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
        write_results(run, results_path, test_loss, test_acc)
    weights = "averaged weights" if run.ema else "weights"
    print0(f"test: loss {test_loss:.4f} acc {test_acc:.2%} with the {weights} of epoch {run.best_epoch} (validation "
           f"acc {run.best_val_acc:.2%}) -> {best_path}, {last_path}, {plot_path}, {results_path}")


# ----------------------------------------------------------------------------------------------------
# main

def describe_run(run, resume):
    """What is about to train, on what, how."""
    args, env, data, config = run.args, run.env, run.data, run.raw_model.config
    print0(f"{args.dataset}: {data.sizes[0]:,} train / {data.sizes[1]:,} validation / {data.sizes[2]:,} test images")
    if args.task != "image":
        seed = config.permutation_seed
        order = "row-major order" if seed is None else f"the order of --permutation-seed {seed}"
        print0(f"task {args.task}: {config.seq_len} pixels per image, one per step, in {order}")
    ema = f", weight average (decay {run.ema.decay:.4g})" if run.ema else ""
    print0(f"model: {args.arch}, {count_params(run.raw_model):,} parameters, device {env.device}, "
           f"amp {run.amp or 'off'}"
           f"{', CUDA graphs' if args.cuda_graphs else ''}{', compiled' if args.compile else ''}{ema}")
    if args.arch == "mamba2":
        print0(f"backend: {describe_backend(args.backend, env.device)}")
    if env.ddp:
        print0(f"torchrun: {env.world_size} processes ({dist.get_backend()}): effective batch size "
               f"{env.world_size * args.batch_size}, {run.steps_per_epoch} steps per epoch, peak lr {args.lr:g}")
    if resume:
        print0(f"resuming {args.resume} after epoch {run.start_epoch} (best validation accuracy "
               f"{run.best_val_acc:.2%})")
    print0(f"TensorBoard: tensorboard --logdir {output_paths(args)[-1]}   (run {args.run_name})")


def train(argv):
    """The whole run; returns the exit status (0, or 130 after Ctrl-C)."""
    started = time.perf_counter()
    args, resume = parse_args(argv)
    env = start_processes(args)
    model = build_model(args, env.device)
    run = setup(args, env, load_data(args, env), model, resume)
    run.started = started
    describe_run(run, resume)
    writer = SummaryWriter(os.path.join(output_paths(args)[-1], args.run_name),
                           purge_step=run.start_epoch + 1 if resume else None) if env.master else None
    with writer or contextlib.nullcontext():
        status = fit(run, writer)
        if args.cuda_graphs:
            print0(run.train_model.counts())
        if status == 0:
            final_test(run, writer)
    return status


def main(argv=None):
    keep_freed_memory_in_process()
    rank = os.environ.get("RANK")  # set by torchrun: say which process failed

    def run():
        status = train(sys.argv[1:] if argv is None else argv)
        if dist.is_initialized():  # every rank got here (after an error torchrun ends the others)
            dist.barrier()  # rank 0 may still be writing its files: the ranks leave together
            dist.destroy_process_group()
        return status
    sys.exit(exit_status(run, f" (rank {rank})" if rank else ""))


if __name__ == "__main__":
    main()

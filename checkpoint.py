"""
Checkpoints of train.py: written atomically, read with weights_only=True (tensors and plain Python values only,
never code to run), checked for what they must hold, and the one place that rebuilds the trained model from one.

A checkpoint is a dict:
    format          CHECKPOINT_FORMAT; changes whenever what a checkpoint holds changes meaning
    model           the weights that validation chose (the weight average's, with --ema)
    config          the model's config as a dict: rebuilds exactly the trained model
    args            train.py's flags ("task" and "arch" pick the model class)
    dataset, normalization, epoch, metrics
and, in those train.py writes (run_checkpoint), the optimizer state and the run's history, which --resume reads.
"""

import dataclasses
import os
import pickle
import textwrap
import uuid
import warnings

import torch

from baselines import CNN, CNNConfig, ViT, ViTConfig
from cli import UsageError, shorten
from vision_mamba2 import SequentialMamba2, SequentialMamba2Config, VisionMamba2, VisionMamba2Config, resolve_backend

# (task, arch) -> (config class, model class). The baselines (baselines.py) are image classifiers of about the
# Mamba model's size, trained by the same recipe.
MODELS = {("image", "mamba2"): (VisionMamba2Config, VisionMamba2),
          ("image", "cnn"): (CNNConfig, CNN),
          ("image", "vit"): (ViTConfig, ViT),
          ("smnist", "mamba2"): (SequentialMamba2Config, SequentialMamba2),
          ("psmnist", "mamba2"): (SequentialMamba2Config, SequentialMamba2)}


def atomic_write(path, write):
    """write(file) into a temporary file beside path, then os.replace: path is always the old file or the new one,
    never half. The temporary name is this writer's own, so that two runs writing into one folder (each its
    training_history.png) never take each other's."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# every checkpoint has these; "format" changes whenever what a checkpoint holds changes meaning
CHECKPOINT_KEYS = ("format", "model", "config", "args", "dataset", "normalization")
CHECKPOINT_FORMAT = 1


def run_checkpoint(run, epoch):
    """A checkpoint of train.py's run after `epoch`: what rebuild_model needs, and what --resume needs to go on."""
    ema, raw = run.ema, run.raw_model
    return {"format": CHECKPOINT_FORMAT, "model": (ema.module if ema else raw).state_dict(),
            "config": dataclasses.asdict(raw.config), "args": dict(vars(run.args)),
            "dataset": run.args.dataset, "normalization": {"mean": run.data.mean, "std": run.data.std},
            "epoch": epoch, "metrics": dict(run.metrics), "raw_model": raw.state_dict() if ema else None,
            "ema_decay": ema.decay if ema else None, "ema_updates": ema.updates if ema else 0,
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "best_val_acc": run.best_val_acc, "best_epoch": run.best_epoch, "history": run.history}


def restore_run(run, ckpt):
    """Put a run_checkpoint back into train.py's run, which carries on after the epoch it finished."""
    run.raw_model.load_state_dict(ckpt["raw_model"] or ckpt["model"])
    if run.ema:
        run.ema.module.load_state_dict(ckpt["model"])
        run.ema.updates = ckpt["ema_updates"]
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.history, run.metrics = ckpt["history"], ckpt["metrics"]
    run.start_epoch, run.best_val_acc, run.best_epoch = ckpt["epoch"], ckpt["best_val_acc"], ckpt["best_epoch"]


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, flag="--checkpoint"):
    """A checkpoint of train.py as a dict (read with weights_only=True: tensors and plain values, never code to run);
    a UsageError saying why if the file is not one, or of another format."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns about old pickle protocols
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip or pickle errors: truncated, corrupt, not a checkpoint, or refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line), None)  # a reference to a function or class
        if isinstance(e, pickle.UnpicklingError) and code:
            raise UsageError(f"{path} was refused by weights_only loading ({code}): it is not a train.py "
                             f"checkpoint, and this code never runs code from a checkpoint") from None
        reason = next((line for line in lines if "nsupported" in line), lines[0] if lines else "")
        detail = f"{type(e).__name__}: {textwrap.shorten(reason, 150)}" if reason else type(e).__name__
        raise UsageError(f"{path} is not a readable PyTorch checkpoint, or it is truncated ({detail})") from None
    if not isinstance(ckpt, dict) or not set(CHECKPOINT_KEYS) - {"format"} <= ckpt.keys():
        found = f"the keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise UsageError(f"{path} is not a checkpoint of train.py (from another program?): expected the keys "
                         f"{list(CHECKPOINT_KEYS)}, found {found}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is a checkpoint of format {ckpt.get('format', 'none')}, written by another version "
                         f"of this code; this one reads format {CHECKPOINT_FORMAT}: train it again")
    args = ckpt["args"]
    kind = (args.get("task"), args.get("arch")) if isinstance(args, dict) else None
    if kind not in MODELS:
        known = ", ".join(f"{t}/{a}" for t, a in MODELS)
        found = f"task/arch {kind[0]}/{kind[1]}" if kind else f"args of type {type(args).__name__}"
        raise UsageError(f"{path} names no model this code builds: its args hold {found}; expected one of {known}")
    return ckpt


YOURS = "vision_mamba2_mnist.pth"  # what `python train.py` writes in the working directory
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", YOURS)  # comes with the code
DEFAULT_HELP = (f"a checkpoint written by train.py (default: ./{YOURS}, what python train.py writes, if there is "
                f"one, else the pretrained model that comes with the code, pretrained/{YOURS})")  # --checkpoint's


def default_checkpoint():
    """--checkpoint's default for test_model.py and demo.py, and the line that says which it is: yours if python
    train.py wrote one here, else the pretrained one that comes with the code."""
    if os.path.exists(YOURS):
        return YOURS, f"using your {YOURS} (written by python train.py; pass --checkpoint to use another)"
    if os.path.exists(SHIPPED):
        return SHIPPED, (f"using the pretrained model that comes with the code, {SHIPPED} (there is no {YOURS} "
                         f"here: python train.py writes one, which is then used)")
    raise UsageError(f"no checkpoint: there is no {YOURS} here (train one with `python train.py`) nor a pretrained "
                     f"model at {SHIPPED}: pass --checkpoint PATH")


def model_kind(ckpt):
    """(task, arch) of a checkpoint that load_checkpoint accepted."""
    return ckpt["args"]["task"], ckpt["args"]["arch"]


def rebuild_model(ckpt, path, device):
    """Exactly the trained model, from the checkpoint alone, in eval mode: its task and arch pick the class
    (MODELS), its config the shapes, its weights the rest (psMNIST's pixel order is in its config and weights)."""
    kind = model_kind(ckpt)
    config_cls, model_cls = MODELS[kind]
    try:
        config = config_cls.from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path} says it holds a {'/'.join(kind)} model, but its config does not describe one "
                         f"({shorten(e)})") from None
    # the backend is how the model runs, not what it computes: weights trained with the official kernels
    # evaluate anywhere
    if getattr(config, "backend", None) == "official" and resolve_backend("auto", device) != "official":
        config = dataclasses.replace(config, backend="auto")
    try:
        model = model_cls(config)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"{path} holds a {'/'.join(kind)} config that cannot be built ({shorten(e)})") from None
    expected, found = model.state_dict().keys(), ckpt["model"].keys()
    if expected != found:
        raise UsageError(f"{path} says it holds a {'/'.join(kind)} model, but its weights are another model's: "
                         f"{len(found - expected)} unexpected (e.g. {sorted(found - expected)[:2]}) and "
                         f"{len(expected - found)} missing (e.g. {sorted(expected - found)[:2]})")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # same names, other shapes
        raise UsageError(f"{path}: its weights do not fit the model its config describes ({shorten(e)})") from None
    return model.to(device).eval()


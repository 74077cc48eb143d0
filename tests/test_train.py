"""
train.py end to end, on CPU, in seconds: a tiny model on a tiny synthetic dataset written in torchvision's
MNIST layout (raw IDX files), so nothing is downloaded. Run from the repository root: python -m pytest tests/
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
import data
import steps
import test_model
import train
from helpers import PROC_ENV, REPO, load, metrics_on_the_test_set
from vision_mamba2 import VisionMamba2, create_vision_mamba2_model

TINY = ["--d-model", "16", "--num-blocks", "1", "--d-state", "16", "--headdim", "8", "--batch-size", "32",
        "--lr", "1e-2", "--device", "cpu", "--seed", "0"]
EPOCHS = 3
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # history entries that must replay exactly


def train_cmd(data_dir, out_dir, *extra):
    return [sys.executable, str(REPO / "train.py"), *TINY, "--data-dir", str(data_dir),
            "--out", str(out_dir / "m.pth"), *extra]


def run_train(data_dir, out_dir, *extra):
    return subprocess.run(train_cmd(data_dir, out_dir, *extra), capture_output=True, text=True, env=PROC_ENV,
                          timeout=300)


def scalars(log_dir):
    """The TensorBoard scalars of the one run logged under log_dir (a resumed run logs into its run's folder)."""
    run_dir, = log_dir.iterdir()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run of EPOCHS epochs; tests that write copy its outputs first."""
    out_dir = tmp_path_factory.mktemp("reference")
    proc = run_train(data_dir, out_dir, "--epochs", str(EPOCHS))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out_dir, proc


def test_end_to_end_outputs(reference, data_dir):
    out_dir, proc = reference
    assert "Traceback" not in proc.stderr
    assert [line.split(" |")[0] for line in proc.stdout.splitlines() if line.startswith("epoch ")] == \
        [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert "test: loss" in proc.stdout

    best, last = load(out_dir / "m.pth"), load(out_dir / "m_last.pth")
    for ckpt in (best, last):
        assert {"format", "model", "config", "args", "epoch", "metrics", "optimizer", "scaler", "best_val_acc",
                "history", "dataset", "normalization"} <= set(ckpt)
        assert ckpt["dataset"] == "mnist" and ckpt["normalization"] == {"mean": 0.1307, "std": 0.3081}
        assert ckpt["config"]["d_model"] == 16 and ckpt["args"]["epochs"] == EPOCHS
    assert last["epoch"] == EPOCHS
    assert best["epoch"] == best["best_epoch"] == 1 + int(np.argmax(last["history"]["val_acc"]))
    assert best["metrics"]["val_acc"] == best["best_val_acc"] == max(last["history"]["val_acc"])
    history = last["history"]
    assert all(len(history[k]) == EPOCHS for k in CURVES)
    assert history["train_loss"][-1] < history["train_loss"][0]

    # what test_model.py does: rebuild the model from the checkpoint alone. The test numbers train.py reported and
    # saved are those of these weights, measured here apart from train.py; and above chance (10%): it learned
    model = create_vision_mamba2_model(**best["config"])
    model.load_state_dict(best["model"])
    loss, acc = metrics_on_the_test_set(model, best, data_dir)
    assert best["metrics"]["test_acc"] == acc, (best["metrics"], acc)
    assert best["metrics"]["test_loss"] == pytest.approx(loss, rel=1e-5), (best["metrics"], loss)
    assert f"test: loss {loss:.4f} acc {acc:.2%}" in proc.stdout
    assert acc > 0.2, acc  # 26% after these 3 short epochs (test_the_model_learns trains longer)

    assert (out_dir / "training_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out_dir.glob("*.tmp"))
    results = json.loads((out_dir / "m.json").read_text())  # the numbers .ci/gpu.py reads
    assert results["test_acc"] == acc and results["epochs_done"] == EPOCHS and results["args"]["epochs"] == EPOCHS
    assert (results["best_epoch"], results["best_val_acc"]) == (best["best_epoch"], best["best_val_acc"])
    assert results["images_per_sec"] == history["images_per_sec"] and results["device"] == "cpu"

    tb = scalars(out_dir / "runs")
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "images_per_sec"):
        assert [step for step, _ in tb[tag]] == list(range(1, EPOCHS + 1)), tag
    assert [v for _, v in tb["loss/val"]] == pytest.approx(history["val_loss"])
    assert tb["test/accuracy"][-1][1] == pytest.approx(best["metrics"]["test_acc"])


def test_resume_continues_epoch_count(reference, data_dir, tmp_path):
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    before = load(tmp_path / "m_last.pth")
    proc = run_train(data_dir, tmp_path, "--resume", str(tmp_path / "m_last.pth"), "--epochs", str(EPOCHS + 1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split(" |")[0] for line in proc.stdout.splitlines() if line.startswith("epoch ")] == \
        [f"epoch {EPOCHS + 1}/{EPOCHS + 1}"]
    after = load(tmp_path / "m_last.pth")
    assert after["epoch"] == EPOCHS + 1
    assert after["history"]["train_loss"][:EPOCHS] == before["history"]["train_loss"]
    tb = scalars(tmp_path / "runs")
    assert [step for step, _ in tb["loss/train"]] == list(range(1, EPOCHS + 2))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_interrupt_saves_resumable_checkpoint_and_resume_is_exact(reference, data_dir, tmp_path):
    # same command as the reference run, Ctrl-C'd during epoch 2, then resumed, which redoes epoch 2: the finished
    # run must match the uninterrupted one number for number (same seed, same CPU)
    proc = subprocess.Popen(train_cmd(data_dir, tmp_path, "--epochs", str(EPOCHS)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=PROC_ENV)
    err = b""
    while f"epoch 2/{EPOCHS}".encode() not in err:  # epoch 2's progress bar has appeared
        chunk = os.read(proc.stderr.fileno(), 1 << 16)
        assert chunk, f"train.py ended before epoch 2: {err[-2000:]}"
        err += chunk
    proc.send_signal(signal.SIGINT)
    err = (err + proc.communicate(timeout=300)[1]).decode()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    interrupted = load(tmp_path / "m_last.pth")  # whole and loadable
    assert interrupted["epoch"] == 1  # the last epoch it finished
    results = json.loads((tmp_path / "m.json").read_text())  # written after each epoch: a cut run keeps its numbers
    assert results["epochs_done"] == 1 and results["test_acc"] is None
    assert results["images_per_sec"] == interrupted["history"]["images_per_sec"]

    proc = run_train(data_dir, tmp_path, "--resume", str(tmp_path / "m_last.pth"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, uninterrupted = load(tmp_path / "m_last.pth")["history"], load(reference[0] / "m_last.pth")["history"]
    for key in CURVES:
        assert resumed[key] == uninterrupted[key], key
    assert load(tmp_path / "m.pth")["metrics"]["test_acc"] == load(reference[0] / "m.pth")["metrics"]["test_acc"]


def run_main(argv):
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(a) for a in argv])
    return exit_info.value.code


def test_the_model_learns(data_dir, tmp_path):
    """Ten short epochs on the synthetic digits (the class is a square's size): validation and test accuracy well
    above the 10 % of chance."""
    assert run_main([*TINY, "--data-dir", data_dir, "--out", tmp_path / "m.pth",
                     "--epochs", 10]) == 0
    metrics = load(tmp_path / "m.pth")["metrics"]
    assert metrics["val_acc"] > 0.5 and metrics["test_acc"] > 0.5, metrics


def test_same_seed_same_losses(data_dir, tmp_path):
    histories = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run_main([*TINY, "--data-dir", data_dir, "--out", out / "m.pth",
                         "--epochs", 2, "--max-train-samples", 96]) == 0
        histories.append(load(out / "m_last.pth")["history"])
    for key in CURVES:
        assert histories[0][key] == histories[1][key], key


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    real_train_one_epoch = train.train_one_epoch

    def poisoned(run, epoch):  # epoch 2 starts from NaN weights
        if epoch == 2:
            with torch.no_grad():
                next(run.raw_model.parameters()).fill_(float("nan"))
        return real_train_one_epoch(run, epoch)

    monkeypatch.setattr(train, "train_one_epoch", poisoned)
    status = run_main([*TINY, "--data-dir", data_dir, "--out", tmp_path / "m.pth",
                       "--epochs", 2, "--max-train-samples", 64])
    err = capsys.readouterr().err
    assert status == 1
    assert err.strip().splitlines()[-1].startswith("error: the training loss became nan in epoch 2")
    last = load(tmp_path / "m_last.pth")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert load(tmp_path / "m.pth")["epoch"] == 1


@pytest.mark.parametrize("epochs, patience, ran", [(12, None, 7), (10, None, 6), (12, 2, 3), (6, None, 6)])
def test_early_stopping_patience_grows_with_the_run(epochs, patience, ran, data_dir, tmp_path, monkeypatch, capsys):
    """Validation accuracy that never improves after epoch 1: the run stops once `patience` epochs have gone
    by without a better one; the default patience is half of --epochs, at least 5."""
    def no_training(run, epoch):  # the weights never change, so neither does validation accuracy
        return {"train_loss": 1.0, "train_acc": 0.1, "images_per_sec": 1.0}

    monkeypatch.setattr(train, "train_one_epoch", no_training)
    flags = [] if patience is None else ["--patience", patience]
    assert run_main([*TINY, "--data-dir", data_dir, "--out", tmp_path / "m.pth",
                     "--epochs", epochs, "--max-train-samples", 64, *flags]) == 0
    out = capsys.readouterr().out
    assert len(load(tmp_path / "m_last.pth")["history"]["val_acc"]) == ran
    stopped = f"early stop: no better validation accuracy for {ran - 1} epochs"
    assert (stopped in out) == (ran < epochs)


def test_model_options_reach_the_checkpoint_and_test_model(data_dir, tmp_path):
    """--patch-size, --drop-path and --local-conv go into the model config the checkpoint carries; test_model.py
    rebuilds exactly the model train.py built from the flags: the test loss train.py measured with it (the best
    weights loaded) is the rebuilt model's, measured here."""
    assert run_main([*TINY, "--data-dir", data_dir, "--out", tmp_path / "m.pth",
                     "--epochs", 1, "--max-train-samples", 64, "--num-blocks", 2, "--drop-path", 0.2,
                     "--patch-size", 2, "--local-conv"]) == 0
    ckpt = load(tmp_path / "m.pth")
    assert ckpt["config"]["drop_path"] == 0.2
    assert ckpt["config"]["local_conv"] is True and "blocks.1.local.weight" in ckpt["model"]
    assert ckpt["config"]["patch_size"] == 2 and ckpt["model"]["pos_embed"].shape[-2:] == (14, 14)
    model = checkpoint.rebuild_model(ckpt, str(tmp_path / "m.pth"), torch.device("cpu"))
    assert [block.drop_path.p for block in model.blocks] == [0.0, 0.2]
    loss, acc = metrics_on_the_test_set(model, ckpt, data_dir)
    assert ckpt["metrics"]["test_loss"] == pytest.approx(loss, rel=1e-5) and ckpt["metrics"]["test_acc"] == acc


@pytest.mark.parametrize("task,arch,dataset,name", [
    ("image", "mamba2", "mnist", "vision_mamba2_mnist.pth"),
    ("image", "cnn", "mnist", "cnn_mnist.pth"),
    ("image", "vit", "fashion-mnist", "vit_fashion_mnist.pth"),
    ("smnist", "mamba2", "mnist", "vision_mamba2_smnist.pth"),
    ("psmnist", "mamba2", "fashion-mnist", "vision_mamba2_psmnist_fashion_mnist.pth"),
    ("smnist", "mamba2", "mnist1d", "vision_mamba2_smnist_mnist1d.pth"),
])
def test_the_default_checkpoint_name_says_what_was_trained(task, arch, dataset, name):
    assert train.default_out(task, arch, dataset) == name


def test_a_run_on_another_dataset_leaves_the_mnist_checkpoint_alone(data_dir, tmp_path, monkeypatch):
    """Without --out, python train.py --dataset fashion-mnist used to overwrite vision_mamba2_mnist.pth. And it takes
    Fashion-MNIST's augmentation defaults, where a flag given on the command line still wins."""
    monkeypatch.chdir(tmp_path)
    common = [*TINY, "--data-dir", data_dir, "--epochs", 1, "--max-train-samples", 64]
    assert run_main(common) == 0
    mnist = (tmp_path / "vision_mamba2_mnist.pth").read_bytes()
    assert run_main([*common, "--dataset", "fashion-mnist"]) == 0
    args = load(tmp_path / "vision_mamba2_fashion_mnist.pth")["args"]
    assert args["dataset"] == "fashion-mnist"
    assert (args["aug_translate"], args["aug_rotate"], args["aug_scale"]) == (2, 0, 0)  # its own augmentation
    assert load(tmp_path / "vision_mamba2_fashion_mnist_last.pth")["args"]["out"] == "vision_mamba2_fashion_mnist.pth"
    assert (tmp_path / "vision_mamba2_mnist.pth").read_bytes() == mnist
    assert load(tmp_path / "vision_mamba2_mnist.pth")["args"]["aug_rotate"] == 15
    assert run_main([*common, "--dataset", "fashion-mnist", "--aug-rotate", 5, "--out", tmp_path / "f.pth"]) == 0
    assert load(tmp_path / "f.pth")["args"]["aug_rotate"] == 5 and load(tmp_path / "f.pth")["args"]["aug_scale"] == 0


@pytest.mark.parametrize("argv,recipe", [
    ([], dict(epochs=10, ema=0.999, aug_translate=3.0, aug_rotate=15.0)),
    (["--dataset", "fashion-mnist"], dict(epochs=10, ema=0.999, aug_translate=2.0, aug_rotate=0.0)),
    (["--task", "smnist"], dict(epochs=30, ema=0.0, aug_translate=0.0, aug_rotate=0.0)),
    (["--task", "psmnist", "--dataset", "fashion-mnist"], dict(epochs=30, ema=0.0, aug_translate=0.0, aug_rotate=0.0)),
])
def test_each_task_and_dataset_takes_the_recipe_its_help_shows(argv, recipe, capsys):
    """The defaults a run takes are those its --help shows; a sequential task is never warped, whatever the
    dataset's own augmentation (a warp moves pixels to other steps of the sequence)."""
    args, _ = train.parse_args([*argv, "--device", "cpu"])
    assert {key: getattr(args, key) for key in recipe} == recipe
    with pytest.raises(SystemExit):
        train.parse_args([*argv, "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    flags = re.split(r" (?=--[a-z])", shown)  # one piece per flag (and per mention of one in a help line)
    for key, value in recipe.items():
        own = [f for f in flags if re.match(f"--{key.replace('_', '-')} [A-Z]+ ", f)]  # the flag and its metavar
        assert len(own) == 1 and f"(default: {value})" in own[0], (key, value, own)


def test_ema_validates_checkpoints_and_resumes_the_average_of_the_weights(data_dir, tmp_path, monkeypatch):
    """--ema D: the checkpoint's model is the exponential moving average of the weights after each step (the raw
    ones ride along for resume), validation scores that average, and a resumed run continues it exactly."""
    after_each_step = []  # the raw weights after every optimizer step
    real_train_one_epoch = train.train_one_epoch

    def recording(run, epoch):
        if epoch == run.start_epoch + 1:  # once a run: record, then update the average
            real_update = run.ema.update

            def update():
                after_each_step.append({k: v.clone() for k, v in run.raw_model.state_dict().items()})
                real_update()
            run.ema.update = update
        return real_train_one_epoch(run, epoch)

    monkeypatch.setattr(train, "train_one_epoch", recording)
    # 8 steps an epoch: the one-epoch run below can average with 0.5 (the cap, 1 - 4/8, does not bind)
    flags = [*TINY, "--data-dir", data_dir, "--max-train-samples", 96, "--batch-size", 12, "--ema", 0.5]
    assert run_main([*flags, "--out", tmp_path / "m.pth", "--epochs", 2]) == 0
    last = load(tmp_path / "m_last.pth")
    assert last["ema_updates"] == len(after_each_step) > 2
    expected = after_each_step[0]  # the average starts at the weights after the first step
    for raw in after_each_step[1:]:
        expected = {k: torch.lerp(e, raw[k], 0.5) for k, e in expected.items()}
    assert last["model"].keys() == expected.keys()
    for k, e in expected.items():
        torch.testing.assert_close(last["model"][k], e, msg=k)
        assert torch.equal(last["raw_model"][k], after_each_step[-1][k]), k
    assert not all(torch.equal(last["model"][k], last["raw_model"][k]) for k in expected)

    # validation scored the average, which is what the checkpoint holds for test_model.py
    _, val_loader, _ = train.get_mnist_dataloaders(data_dir=str(data_dir), batch_size=64, max_train_samples=96,
                                                   seed=0)
    model = checkpoint.rebuild_model(last, str(tmp_path / "m_last.pth"), torch.device("cpu"))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    val_loss, _ = train.evaluate(model, data.DeviceSplit(val_loader, torch.device("cpu"), 0.1307, 0.3081), criterion,
                                 "validation")
    assert val_loss == pytest.approx(last["history"]["val_loss"][-1], rel=1e-5)
    raw_accuracies = [value for _, value in scalars(tmp_path / "runs")["accuracy/val_raw_weights"]]
    assert raw_accuracies == pytest.approx(last["history"]["val_acc_raw"]) and len(raw_accuracies) == 2  # plotted

    # one epoch, then a resumed second: the same average and raw weights as the straight run
    out = tmp_path / "resumed"
    assert run_main([*flags, "--out", out / "m.pth", "--epochs", 1]) == 0
    assert run_main(["--resume", out / "m_last.pth", "--epochs", 2]) == 0
    resumed = load(out / "m_last.pth")
    assert resumed["ema_updates"] == last["ema_updates"]
    for key in ("model", "raw_model"):
        for k, v in last[key].items():
            assert torch.equal(resumed[key][k], v), (key, k)


def test_a_short_run_averages_only_its_last_quarter_and_a_resumed_run_keeps_its_decay(data_dir, tmp_path, capsys):
    """The default --ema 0.999 spans ~1,000 steps: a 6-step run caps its decay at 1 - 4/6, so the average is of its
    last steps, not of its random start; more --epochs on resume keep the decay the run started with."""
    flags = [*TINY, "--data-dir", data_dir, "--max-train-samples", 96, "--out", tmp_path / "m.pth"]
    assert run_main([*flags, "--epochs", 2]) == 0  # 3 steps an epoch
    assert "weight average (decay 0.3333)" in capsys.readouterr().out
    assert load(tmp_path / "m_last.pth")["ema_decay"] == pytest.approx(1 / 3)
    assert run_main(["--resume", tmp_path / "m_last.pth", "--epochs", 4]) == 0
    resumed = load(tmp_path / "m_last.pth")
    assert resumed["epoch"] == 4 and resumed["ema_decay"] == pytest.approx(1 / 3)


def test_the_weight_average_copies_integer_buffers():
    """BatchNorm's step count (and the scan orders) are integers: copied, never averaged and rounded."""
    bn = torch.nn.BatchNorm1d(3)
    ema = steps.WeightAverage(bn, 0.9)
    for _ in range(4):
        bn(torch.randn(8, 3))
        ema.update()
    assert ema.module.num_batches_tracked.item() == 4
    assert not torch.equal(ema.module.running_mean, bn.running_mean)  # the floats are averaged


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "m.pth")
    checkpoint.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    previous = load(path)
    assert previous["epoch"] == 1 and torch.equal(previous["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["m.pth"]


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--batch-size", "lots"], "--batch-size: expected an integer"),
    (["--lr", "-1"], "--lr: must be in (0"),
    (["--lr", "nan"], "--lr: must be in (0"),
    (["--drop-path", "1.5"], "--drop-path: must be in [0, 1)"),
    (["--dataset", "cifar10"], "--dataset: invalid choice"),
    (["--device", "toaster"], "--device: not a torch device"),
    (["--cuda-graphs", "--compile"], "--cuda-graphs and --compile exclude each other"),
    (["--out", "results/"], "--out results/ is a folder: name the checkpoint file, e.g. results/vision_mamba2_mnist"),
    (["--out", "m.json"], "--out m.json: name the checkpoint .pth"),
    (["--arch", "cnn", "--drop-path", "0.1"], "--drop-path belongs to --task/--arch image/mamba2, smnist/mamba2"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--arch", "resnet"], "argument --arch: invalid choice: 'resnet'"),
    (["--task", "cifar"], "argument --task: invalid choice: 'cifar'"),
    (["--task", "smnist", "--arch", "vit"], "--task smnist takes only --arch mamba2"),
    (["--task", "smnist", "--aug-rotate", "5"], "--aug-rotate applies only to --task image"),
    (["--task", "smnist", "--permutation-seed", "1"], "--permutation-seed applies only to --task psmnist"),
])
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("argv, message", [
    (["--headdim", "7"], "invalid model configuration: d_model*expand = 32 must be divisible by headdim = 7"),
    (["--patch-size", "5"], "invalid model configuration: img_size 28 must be divisible by patch_size 5"),
    (["--cuda-graphs"], "--cuda-graphs runs on one CUDA GPU, in one process (here: cpu)"),  # TINY says --device cpu
    (["--backend", "official"], "backend 'official' runs only on a CUDA GPU, got device cpu"),  # on a GPU machine too
    (["--resume", REPO / "pretrained" / "vision_mamba2_mnist.pth"], "holds a trained model only"),
])
def test_unusable_values_are_one_line_errors_before_the_data_loads(argv, message, tmp_path, capsys):
    """No data where --data-dir points: each of these must be refused before the dataset is looked for."""
    assert run_main([*TINY, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "m.pth",
                     *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and message in err


def test_resume_keeps_hyperparameters(reference, data_dir, tmp_path, capsys):
    argv = [*TINY, "--data-dir", data_dir, "--out", tmp_path / "m.pth", "--resume", reference[0] / "m_last.pth"]
    assert run_main([*argv, "--lr", "0.5"]) == 2
    assert "--lr 0.5 contradicts the checkpoint's 0.01" in capsys.readouterr().err


@pytest.mark.parametrize("version", [None, checkpoint.CHECKPOINT_FORMAT + 1])
def test_a_checkpoint_of_another_format_is_refused_in_one_line(version, reference, data_dir, tmp_path, capsys):
    old = load(reference[0] / "m_last.pth")
    if version is None:
        del old["format"]  # as written before checkpoints carried a format
    else:
        old["format"] = version
    checkpoint.save_checkpoint(old, str(tmp_path / "old_last.pth"))
    assert run_main([*TINY, "--data-dir", data_dir, "--resume", tmp_path / "old_last.pth"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is a checkpoint of format {version or 'none'}" in err
    with pytest.raises(SystemExit) as exit_info:
        test_model.main(["--checkpoint", str(tmp_path / "old_last.pth"), "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "train it again" in err


def test_errors_in_a_real_process_have_no_traceback(data_dir, tmp_path):
    bad = subprocess.run([sys.executable, str(REPO / "train.py"), "--epochs", "0"], capture_output=True, text=True,
                         env=PROC_ENV, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr

    # no data and no way to download it: say where the files must go
    missing = run_train(tmp_path / "nowhere", tmp_path, "--epochs", "1")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in missing.stderr
    assert "train-images-idx3-ubyte" in missing.stderr


def test_mixed_precision_run_on_cpu_end_to_end(data_dir, tmp_path, capsys, monkeypatch):
    """--amp trains under bf16 autocast (what CUDA does by default); validation and the final test run in fp32, so
    test_model.py finds the accuracy train.py printed for the same checkpoint."""
    forward, calls = VisionMamba2.forward, []

    def recording_forward(self, x):  # every forward: training or not, under which autocast
        calls.append((self.training, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        return forward(self, x)
    monkeypatch.setattr(VisionMamba2, "forward", recording_forward)
    assert run_main([*TINY, "--data-dir", data_dir, "--out", tmp_path / "m.pth",
                     "--epochs", 2, "--amp", "--scan", "cross", "--local-conv"]) == 0
    assert "amp bfloat16" in capsys.readouterr().out
    assert {autocast for training, autocast in calls if training} == {torch.bfloat16}
    assert {autocast for training, autocast in calls if not training} == {False}  # validation and test: fp32
    best = load(tmp_path / "m.pth")
    assert best["args"]["amp"] is True
    model = create_vision_mamba2_model(**best["config"])
    model.load_state_dict(best["model"])
    with torch.no_grad():
        assert best["metrics"]["test_loss"] == pytest.approx(metrics_on_the_test_set(model, best, data_dir)[0],
                                                             rel=1e-5)  # bf16 would be ~1e-3 away
    with pytest.raises(SystemExit) as exit_info:
        test_model.main(["--checkpoint", str(tmp_path / "m.pth"), "--data-dir", str(data_dir), "--out-dir",
                         str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == best["metrics"]["test_acc"]


def test_two_writers_of_one_file_take_their_own_temporary_files(tmp_path):
    """Two runs with --out in one folder both write its training_history.png: a writer that finds the other's
    temporary file must not take it (a shared name crashed the one that renamed second)."""
    path = tmp_path / "training_history.png"

    def slow_writer(f):
        checkpoint.atomic_write(str(path), lambda g: g.write(b"the other run's"))  # the other run, meanwhile
        f.write(b"this run's")
    checkpoint.atomic_write(str(path), slow_writer)
    assert path.read_bytes() == b"this run's" and not list(tmp_path.glob("*.tmp"))

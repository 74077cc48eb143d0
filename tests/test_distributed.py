"""
train.py under torchrun: two CPU processes (gloo) on the tiny synthetic MNIST of test_train.py. A finished run
writes one set of outputs whose numbers a single process reproduces from its checkpoint; checkpoints (saved at the
end of each epoch) resume under another number of processes, and exactly under the same after Ctrl-C; a rank that
fails ends the job. The GPU path (nccl, one GPU per process) is the same code with
another backend and device, and is not run here.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import checkpoint
import data
import test_model
import train
from helpers import PROC_ENV, REPO, load
from test_train import CURVES, TINY, run_main, scalars, train_cmd
from vision_mamba2 import create_vision_mamba2_model

EPOCHS = 2
DDP = ["--batch-size", "8"]  # 8 images per step and process: 18 steps per epoch


def torchrun_prefix():
    with socket.socket() as s:  # a free port for the rendezvous, so that runs never meet each other
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port)]


def torchrun_cmd(data_dir, out_dir, *extra):
    return [*torchrun_prefix(), *train_cmd(data_dir, out_dir, *DDP, *extra)[1:]]


def torchrun(data_dir, out_dir, *extra):
    return subprocess.run(torchrun_cmd(data_dir, out_dir, *extra), capture_output=True, text=True, env=PROC_ENV,
                          timeout=180)


def epoch_lines(stdout):
    return [line.split(" |")[0] for line in stdout.splitlines() if line.startswith("epoch ")]


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    proc = torchrun(data_dir, out_dir, "--epochs", str(EPOCHS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir, proc


def test_two_processes_equal_one_evaluating_their_checkpoint(ddp_run, data_dir, tmp_path):
    out_dir, proc = ddp_run
    assert "Traceback" not in proc.stderr
    # rank 0 alone prints and writes: each epoch once, one set of files, one TensorBoard curve
    assert epoch_lines(proc.stdout) == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert "torchrun: 2 processes (gloo)" in proc.stdout and "effective batch size 16" in proc.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.json", "m.pth", "m_last.pth", "runs",
                                                         "training_history.png"]
    assert [step for step, _ in scalars(out_dir / "runs")["loss/val"]] == list(range(1, EPOCHS + 1))

    best, last = load(out_dir / "m.pth"), load(out_dir / "m_last.pth")
    assert last["epoch"] == EPOCHS
    assert not [key for key in best["model"] if key.startswith("module.")]  # the model, not its DDP wrapper

    # one process evaluates the checkpoint on the same validation and test splits
    model = create_vision_mamba2_model(**best["config"])
    model.load_state_dict(best["model"])
    saved = best["args"]
    loaders = train.get_mnist_dataloaders(data_dir=data_dir, batch_size=saved["batch_size"], seed=saved["seed"])
    criterion = nn.CrossEntropyLoss(label_smoothing=train.LABEL_SMOOTHING)
    for loader, key in [(loaders[1], "val"), (loaders[2], "test")]:
        split = data.DeviceSplit(loader, torch.device("cpu"), **best["normalization"])
        loss, acc = train.evaluate(model, split, criterion, key)
        assert acc == best["metrics"][f"{key}_acc"], key
        assert loss == pytest.approx(best["metrics"][f"{key}_loss"], rel=1e-5), key

    # and so does test_model.py
    with pytest.raises(SystemExit) as exit_info:
        test_model.main(["--checkpoint", str(out_dir / "m.pth"), "--data-dir", str(data_dir),
                         "--out-dir", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == best["metrics"]["test_acc"]


def test_epoch_end_checkpoint_resumes_in_one_process(ddp_run, data_dir, tmp_path):
    shutil.copytree(ddp_run[0], tmp_path, dirs_exist_ok=True)
    assert run_main([*TINY, *DDP, "--data-dir", data_dir, "--out", tmp_path / "m.pth",
                     "--resume", tmp_path / "m_last.pth", "--epochs", EPOCHS + 1]) == 0
    after = load(tmp_path / "m_last.pth")
    assert after["epoch"] == EPOCHS + 1
    assert after["history"]["train_loss"][:EPOCHS] == load(ddp_run[0] / "m_last.pth")["history"]["train_loss"]
    # one process takes twice the steps per epoch; the schedule goes on from where the two left it (a function of
    # the step), so the last step is at the very end of the cosine decay
    assert 0 < after["history"]["lr"][-1] < 1e-3 * after["args"]["lr"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_stops_every_rank_and_resume_is_exact(ddp_run, data_dir, tmp_path):
    # Ctrl-C in a terminal reaches torchrun, which passes SIGINT on to every rank
    proc = subprocess.Popen(torchrun_cmd(data_dir, tmp_path, "--epochs", str(EPOCHS)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=PROC_ENV)
    err = b""
    while f"epoch 2/{EPOCHS}".encode() not in err:  # rank 0's progress bar of epoch 2 has appeared
        chunk = os.read(proc.stderr.fileno(), 1 << 16)
        assert chunk, f"the run ended before epoch 2: {err[-3000:]}"
        err += chunk
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    err = (err + rest).decode()
    assert proc.returncode != 0  # torchrun reports the interrupted ranks' exit status 130 as a failure
    assert "interrupted in epoch 2" in err and 'train.py", line' not in err  # (torchrun prints a traceback of its own)
    assert load(tmp_path / "m_last.pth")["epoch"] == 1  # the last epoch the job finished

    proc = torchrun(data_dir, tmp_path, "--resume", str(tmp_path / "m_last.pth"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert epoch_lines(proc.stdout) == [f"epoch 2/{EPOCHS}"]
    resumed, uninterrupted = load(tmp_path / "m_last.pth")["history"], load(ddp_run[0] / "m_last.pth")["history"]
    for key in CURVES:
        assert resumed[key] == uninterrupted[key], key
    assert load(tmp_path / "m.pth")["metrics"]["test_acc"] == load(ddp_run[0] / "m.pth")["metrics"]["test_acc"]


def test_each_rank_gets_its_own_part_of_every_split(data_dir):
    def splits(**shard):  # as a process of torchrun builds them (DistributedSampler needs no process group here)
        loaders = train.get_mnist_dataloaders(data_dir=data_dir, batch_size=8, max_train_samples=249, **shard)
        return [data.DeviceSplit(dl, torch.device("cpu"), 0.1307, 0.3081) for dl in loaders]

    def images(split, epoch=None):  # each image's bytes, in the order the split gives them
        generator = None if epoch is None else torch.Generator().manual_seed(epoch)
        return [x_i.numpy().tobytes() for x, _ in split.batches(generator) for x_i in x]

    whole, ranks = splits(), [splits(rank=r, world_size=2) for r in range(2)]
    # training: in every epoch the ranks take disjoint halves of one shuffle, 249 // 2 images and as many steps each
    train0, train1 = ranks[0][0], ranks[1][0]
    assert train0.num_samples == train1.num_samples == 124 and train0.num_batches == train1.num_batches == 16
    for epoch in (1, 2):
        part0, part1 = set(images(train0, epoch)), set(images(train1, epoch))
        assert len(part0) == len(part1) == 124 and not part0 & part1 and part0 | part1 <= set(images(whole[0], 1))
    assert set(images(train0, 1)) != set(images(train0, 2))  # reshuffled every epoch
    # evaluation: the two slices hold every image exactly once
    for i in (1, 2):
        assert sorted(images(ranks[0][i]) + images(ranks[1][i])) == sorted(images(whole[i]))
        assert ranks[0][i].num_samples + ranks[1][i].num_samples == whole[i].num_samples


def test_a_failing_rank_ends_the_job(data_dir, tmp_path):
    # rank 0 cannot write its first checkpoint (--out lies under a file) while rank 1 goes on to epoch 2
    (tmp_path / "file").write_text("")
    proc = subprocess.run(torchrun_cmd(data_dir, tmp_path, "--epochs", str(EPOCHS), "--out",
                                       str(tmp_path / "file" / "m.pth")),
                          capture_output=True, text=True, env=PROC_ENV, timeout=180)
    assert proc.returncode != 0
    assert "error (rank 0): " in proc.stderr and str(tmp_path / "file") in proc.stderr
    assert "epoch 2/2 |" not in proc.stdout


@pytest.mark.parametrize("ema", [["--ema", "0"], ["--ema", "0.5"]], ids=["weights", "ema"])
def test_cnn_validates_with_rank_0s_batchnorm_statistics(ema, data_dir, tmp_path):
    # DDP copies rank 0's buffers to the others only at training forwards: after the last step of an epoch each
    # rank's BatchNorm running statistics differ (and so do their averages, --ema), and validation must use the
    # ones the checkpoint holds
    cmd = [*torchrun_prefix(), str(REPO / "train.py"), "--arch", "cnn", "--width", "4", "--batch-size", "8",
           "--device", "cpu", "--seed", "0", "--epochs", "1", "--data-dir", str(data_dir),
           "--out", str(tmp_path / "c.pth"), *ema]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=PROC_ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = load(tmp_path / "c.pth")
    model = checkpoint.rebuild_model(best, "c.pth", torch.device("cpu"))
    saved = best["args"]
    loaders = train.get_mnist_dataloaders(data_dir=data_dir, batch_size=saved["batch_size"], seed=saved["seed"])
    split = data.DeviceSplit(loaders[1], torch.device("cpu"), **best["normalization"])
    criterion = nn.CrossEntropyLoss(label_smoothing=train.LABEL_SMOOTHING)
    loss, acc = train.evaluate(model, split, criterion, "val")
    assert acc == best["metrics"]["val_acc"] and loss == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)

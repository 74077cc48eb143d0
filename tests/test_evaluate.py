"""
test_model.py on a checkpoint trained here in seconds (test_train.py's tiny model on conftest.py's synthetic data):
every output is written, the numbers agree with each other, and every bad input is one line and an exit code.
"""

import json
import os
import re
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.datasets import FashionMNIST

import data
import test_model
from helpers import N_TEST, PROC_ENV, REPO, load, train_in_process
from test_train import TINY
from vision_mamba2 import VisionMamba2

OUTPUTS = ("confusion_matrix.png", "predictions_visualization.png", "confident_mistakes.png", "metrics.json")


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint")
    assert train_in_process([*TINY, "--epochs", "2", "--data-dir", data_dir, "--out", out / "m.pth"]) == 0
    return out / "m.pth"


def run(argv, capsys):
    """test_model.main in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        test_model.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_writes_every_output_and_the_numbers_agree(checkpoint, data_dir, tmp_path):
    # a real process: headless, no window, no traceback. Batches of 64 as train.py evaluated its test set
    proc = subprocess.run([sys.executable, str(REPO / "test_model.py"), "--checkpoint", str(checkpoint),
                           "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--num-samples", "9",
                           "--batch-size", "64", "--device", "cpu"],
                          capture_output=True, text=True, env=PROC_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name
    for name in OUTPUTS[:3]:
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and all(300 < side < 1400 for side in png.size), (name, png.size)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == metrics["num_images"] == N_TEST
    printed = re.search(r"accuracy (\d+\.\d\d)% \(([\d,]+) / ([\d,]+)\)", proc.stdout)
    assert int(printed[2]) == np.trace(cm) == metrics["correct"] and int(printed[3]) == N_TEST
    assert float(printed[1]) == pytest.approx(100 * np.trace(cm) / N_TEST, abs=0.005)
    assert metrics["accuracy"] == np.trace(cm) / N_TEST == load(checkpoint)["metrics"]["test_acc"]
    per_class = list(metrics["per_class"].values())
    assert [m["correct"] for m in per_class] == list(np.diag(cm))
    assert [m["support"] for m in per_class] == list(cm.sum(axis=1))
    assert metrics["dataset"] == "mnist" and metrics["checkpoint"] == {
        "path": str(checkpoint), "task": "image", "arch": "mamba2", "epoch": load(checkpoint)["epoch"],
        "trained_on": "mnist"}
    assert "macro avg" in proc.stdout and "f1-score" in proc.stdout  # sklearn's classification_report
    assert all(name in proc.stdout for name in metrics["classes"])


def test_a_reader_that_stops_reading_loses_nothing(checkpoint, data_dir, tmp_path):
    """`python test_model.py | head`: the reader may close the pipe before the report is printed. The files are
    written first, and the closed stdout ends the run quietly (Python would print a BrokenPipeError at exit)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "test_model.py"), "--checkpoint", str(checkpoint),
                             "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=PROC_ENV)
    proc.stdout.close()  # before the first line: every write to it fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err[-2000:]
    assert "Error" not in err and "Traceback" not in err, err[-2000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == load(checkpoint)["metrics"]["test_acc"]
    assert (tmp_path / "confident_mistakes.png").stat().st_size > 0


def test_the_test_set_goes_through_in_batches_once(checkpoint, data_dir, tmp_path, capsys, monkeypatch):
    sizes = []
    forward = VisionMamba2.forward
    monkeypatch.setattr(VisionMamba2, "forward", lambda self, x: sizes.append(len(x)) or forward(self, x))
    status, _, err = run(["--checkpoint", checkpoint, "--data-dir", data_dir, "--out-dir", tmp_path,
                          "--batch-size", 40], capsys)
    assert status == 0, err
    assert sizes == [40, 40, 20]


def test_an_image_model_refuses_sequences_in_one_line(checkpoint, data_dir, tmp_path, capsys):
    pytest.importorskip("mnist1d")
    status, _, err = run(["--checkpoint", checkpoint, "--data-dir", data_dir, "--out-dir", tmp_path,
                          "--dataset", "mnist1d", "--device", "cpu"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "the mnist1d test set holds items of shape (1, 1, 40), which this model, trained on mnist, does not read" \
        in err


def test_other_datasets_use_their_class_names(checkpoint, data_dir, tmp_path, capsys):
    ckpt = load(checkpoint)
    mean, std = data.DATASETS["fashion-mnist"].mean, data.DATASETS["fashion-mnist"].std
    ckpt.update(dataset="fashion-mnist", normalization={"mean": mean, "std": std})
    ckpt["args"]["dataset"] = "fashion-mnist"
    torch.save(ckpt, tmp_path / "fashion.pth")

    status, out, err = run(["--checkpoint", tmp_path / "fashion.pth", "--data-dir", data_dir, "--out-dir",
                            tmp_path], capsys)  # by default, the dataset the checkpoint was trained on
    assert status == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == "fashion-mnist" and metrics["classes"] == FashionMNIST.classes
    assert "T-shirt/top" in out

    status, _, err = run(["--checkpoint", tmp_path / "fashion.pth", "--data-dir", data_dir, "--out-dir", tmp_path,
                          "--dataset", "mnist"], capsys)
    assert status == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == "mnist" and metrics["checkpoint"]["trained_on"] == "fashion-mnist"


def edited(key, value):
    """Writes the trained checkpoint with the entries of `value` put into ckpt[key]."""
    def write(ckpt, path):
        ckpt[key].update(value)
        torch.save(ckpt, path)
    return write


BAD_CHECKPOINTS = {
    "missing": (None, "--checkpoint .*bad.pth: no such file"),
    "text": (lambda ckpt, path: path.write_text("not a checkpoint\n"), "is not a readable PyTorch checkpoint"),
    "empty": (lambda ckpt, path: path.write_bytes(b""), "is not a readable PyTorch checkpoint"),
    "truncated": (None, "is not a readable PyTorch checkpoint, or it is truncated"),
    "bare state_dict": (lambda ckpt, path: torch.save(ckpt["model"], path),
                        r"is not a checkpoint of train.py \(from another program\?\)"),
    "list": (lambda ckpt, path: torch.save([1, 2], path), "is not a checkpoint of train.py .* found a list"),
    "unknown config key": (edited("config", {"future_knob": 1}), r"says it holds a image/mamba2 model, but its "
                           r"config does not describe one \(the model config has unknown keys \['future_knob'\]"),
    "other shapes": (edited("config", {"d_model": 24}), "its weights do not fit the model its config describes .*"
                                                        "size mismatch"),
    "unknown task": (edited("args", {"task": "sequential-mnist"}), r"names no model this code builds: its args hold "
                     r"task/arch sequential-mnist/mamba2; expected one of image/mamba2, image/cnn"),
    "args without a task": (lambda ckpt, path: torch.save({**ckpt, "args": {"arch": "mamba2"}}, path),
                            "its args hold task/arch None/mamba2; expected one of image/mamba2"),
    "no args": (lambda ckpt, path: torch.save({**ckpt, "args": None}, path), "its args hold args of type NoneType"),
    "relabelled as a CNN": (edited("args", {"arch": "cnn"}), r"says it holds a image/cnn model, but its config does "
                            r"not describe one \(the model config has unknown keys \[.*\] and lacks \['width'\]"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_one_line_errors(case, checkpoint, data_dir, tmp_path, capsys):
    write, message = BAD_CHECKPOINTS[case]
    path = tmp_path / "bad.pth"
    if case == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif write:
        write(load(checkpoint), path)
    status, _, err = run(["--checkpoint", path, "--data-dir", data_dir, "--out-dir", tmp_path], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "metrics.json").exists()


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_that_would_run_code_is_refused(zipfile, checkpoint, data_dir, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    ckpt = load(checkpoint)
    ckpt["model"] = RunsCode(marker)
    torch.save(ckpt, tmp_path / "evil.pth", _use_new_zipfile_serialization=zipfile)

    status, _, err = run(["--checkpoint", tmp_path / "evil.pth", "--data-dir", data_dir, "--out-dir", tmp_path],
                         capsys)
    assert status == 2 and err.count("\n") == 1
    assert "was refused by weights_only loading" in err and "never runs code from a checkpoint" in err
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_absent_dataset_offline_says_where_to_put_it(checkpoint, tmp_path, capsys, monkeypatch):
    # offline, as torchvision sees it (test_train.py runs data.load_datasets offline in a real process)
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    status, _, err = run(["--checkpoint", checkpoint, "--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path],
                         capsys)
    assert status == 2 and err.count("\n") == 1
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in err and "t10k-images-idx3-ubyte" in err

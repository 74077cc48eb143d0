"""Sequential MNIST: the pixel-by-pixel Mamba-2 classifier (shapes, causality, the pixel order, config errors), and
train.py --task smnist/psmnist with test_model.py end to end on conftest.py's synthetic IDX files and on MNIST-1D."""


import dataclasses
import pytest
import torch

import checkpoint
import data
import train
from helpers import load, run_script as run
from vision_mamba2 import ResidualMamba2Block, SequentialMamba2, SequentialMamba2Config, pixel_permutation

TINY = dict(d_model=16, num_blocks=2, d_state=8, headdim=8, dropout=0.0)
TINY_FLAGS = ["--d-model", "16", "--num-blocks", "1", "--d-state", "16", "--headdim", "8", "--batch-size", "32",
              "--device", "cpu", "--seed", "0"]


def model(**overrides):
    torch.manual_seed(0)
    return SequentialMamba2(SequentialMamba2Config(**{**TINY, **overrides}))


@pytest.mark.parametrize("readout", ["mean", "last"])
@pytest.mark.parametrize("permutation_seed", [None, 0])
def test_forward_backward_shapes(readout, permutation_seed):
    m = model(readout=readout, permutation_seed=permutation_seed)
    x = torch.randn(3, 1, 28, 28)
    assert m.features(x).shape == (3, 784, 16)
    logits = m(x)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("permutation_seed", [None, 0])
def test_changing_a_pixel_changes_nothing_before_its_step(permutation_seed):
    m = model(permutation_seed=permutation_seed).eval()
    x = torch.randn(2, 1, 28, 28)
    step_of_pixel = m.permutation.argsort()  # image pixel (row-major) -> the step that reads it
    with torch.no_grad():
        before = m.features(x)
        for pixel in (0, 300, 783):
            t = int(step_of_pixel[pixel])
            y = x.clone()
            y.view(2, -1)[:, pixel] += 3.0
            after = m.features(y)
            assert torch.equal(after[:, :t], before[:, :t]), f"pixel {pixel} (step {t}) changed earlier steps"
            assert not torch.allclose(after[:, t], before[:, t])  # ...and it is read at its own step


def test_drop_path_skips_a_samples_whole_block_in_training_only():
    torch.manual_seed(0)
    block = ResidualMamba2Block(SequentialMamba2Config(d_model=16, d_state=8, headdim=8), drop_path=0.5)
    x = torch.randn(64, 10, 16)  # (B, L, D)
    skipped = (block.train()(x) - x).flatten(1).abs().amax(1) == 0
    assert 0 < skipped.sum() < len(x)
    assert not ((block.eval()(x) - x).flatten(1).abs().amax(1) == 0).any()


def test_the_pixel_order_is_a_fixed_bijection():
    perm = pixel_permutation(784, 0)
    assert sorted(perm.tolist()) == list(range(784))
    # pinned: a torch that draws randperm differently fails here, as loading a psMNIST checkpoint would
    assert perm[:8].tolist() == [60, 361, 167, 578, 107, 772, 313, 626]
    assert torch.equal(perm, pixel_permutation(784, 0))
    assert not torch.equal(perm, pixel_permutation(784, 1))
    assert torch.equal(pixel_permutation(784, None), torch.arange(784))  # sMNIST: row-major

    # psMNIST reads the image as sMNIST reads the image with its pixels moved into the permuted order
    ps, s = model(permutation_seed=0), model(permutation_seed=None)
    s.load_state_dict({k: v for k, v in ps.state_dict().items() if k != "permutation"}, strict=False)
    x = torch.randn(2, 1, 28, 28)
    shuffled = x.view(2, 1, -1)[:, :, perm].view(2, 1, 28, 28)
    torch.testing.assert_close(ps.features(x), s.features(shuffled), rtol=0, atol=0)


def test_weights_load_only_into_the_same_pixel_order():
    state = model(permutation_seed=0).state_dict()
    assert torch.equal(state["permutation"], pixel_permutation(784, 0))  # saved with the weights
    model(permutation_seed=0).load_state_dict(state)
    with pytest.raises(RuntimeError, match="pixel order is not the one permutation_seed 1 gives"):
        model(permutation_seed=1).load_state_dict(state)


@pytest.mark.parametrize("overrides,message", [
    (dict(readout="max"), "readout must be one of"),
    (dict(permutation_seed=-1), "permutation_seed must be None"),
    (dict(permutation_seed="0"), "permutation_seed must be None"),
    (dict(headdim=12), "must be divisible by headdim"),
    (dict(seq_len=0), "seq_len must be a positive integer"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_impossible_configs_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        model(**overrides)


def test_wrong_inputs_and_unknown_keys():
    with pytest.raises(ValueError, match=r"H\*W = seq_len = 784"):
        model()(torch.randn(2, 1, 14, 14))
    fields = dataclasses.asdict(SequentialMamba2Config(readout="last"))
    assert SequentialMamba2Config.from_dict(fields).readout == "last"
    with pytest.raises(ValueError, match=r"unknown keys \['scan'\]"):
        SequentialMamba2Config.from_dict({**fields, "scan": "bi"})


@pytest.mark.parametrize("argv,message", [
    (["--task", "smnist", "--scan", "bi"], "--scan belongs to --task/--arch image/mamba2, not to smnist/mamba2"),
    (["--task", "psmnist", "--aug-rotate", "5"], "--aug-rotate applies only to --task image"),
    (["--readout", "last"], "--readout belongs to --task/--arch smnist/mamba2, psmnist/mamba2, not to image/mamba2"),
    (["--task", "smnist", "--permutation-seed", "3"], "--permutation-seed applies only to --task psmnist"),
    (["--task", "smnist", "--no-local-conv"], "--no-local-conv belongs to --task/--arch image/mamba2, not to smnist"),
    (["--task", "smnist", "--patch-size", "4"], "--patch-size belongs to --task/--arch image/mamba2, image/vit, not"),
    (["--dataset", "mnist1d"], "--dataset mnist1d holds 1-D sequences, not images: train on it with --task smnist"),
])
def test_flags_of_another_task_are_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before any data is read
        train.main([*argv, "--out", str(tmp_path / "m.pth"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err


def test_psmnist_trains_resumes_and_evaluates(data_dir, tmp_path):
    out = tmp_path / "m.pth"
    flags = [*TINY_FLAGS, "--data-dir", data_dir, "--out", out]
    proc = run("train.py", "--task", "psmnist", "--permutation-seed", "1", "--epochs", "1", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task psmnist: 784 pixels per image, one per step, in the order of --permutation-seed 1" in proc.stdout
    assert "test: loss" in proc.stdout and "Traceback" not in proc.stderr
    ckpt = load(out)
    args, config = ckpt["args"], ckpt["config"]
    assert args["task"] == "psmnist" and config["permutation_seed"] == 1 and config["seq_len"] == 784
    assert (args["aug_translate"], args["aug_rotate"], args["aug_scale"], args["ema"]) == (0, 0, 0, 0)  # the task's
    assert torch.equal(ckpt["model"]["permutation"], pixel_permutation(784, 1))

    # resume without --task: the checkpoint's task, pixel order and defaults carry on
    proc = run("train.py", "--resume", tmp_path / "m_last.pth", "--epochs", "2", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout and "epoch 2/2" in proc.stdout and "task psmnist" in proc.stdout
    assert load(tmp_path / "m_last.pth")["epoch"] == 2

    rebuilt = checkpoint.rebuild_model(load(out), str(out), torch.device("cpu"))
    assert isinstance(rebuilt, SequentialMamba2) and torch.equal(rebuilt.permutation, pixel_permutation(784, 1))
    proc = run("test_model.py", "--checkpoint", out, "--data-dir", data_dir, "--out-dir", tmp_path / "eval",
               "--num-samples", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task psmnist" in proc.stdout and "mnist test set: accuracy" in proc.stdout
    for name in ("confusion_matrix.png", "predictions_visualization.png", "confident_mistakes.png", "metrics.json"):
        assert (tmp_path / "eval" / name).stat().st_size > 0

    # a checkpoint whose pixel order is not its seed's is refused, in one line
    ckpt["config"]["permutation_seed"] = 2
    torch.save(ckpt, tmp_path / "other.pth")
    proc = run("test_model.py", "--checkpoint", tmp_path / "other.pth", "--data-dir", data_dir,
               "--out-dir", tmp_path / "eval2", "--device", "cpu")
    assert proc.returncode == 2 and "pixel order is not the one permutation_seed 2 gives" in proc.stderr, proc.stderr


class Floats(torch.utils.data.Dataset):
    """Float data in the layout DeviceSplit reads (.data, .targets), as MNIST1D has."""
    data = torch.arange(12.0).reshape(4, 1, 3)
    targets = torch.arange(4)

    def __len__(self):
        return 4


def test_device_split_normalizes_float_data_and_leaves_it_alone():
    split = data.DeviceSplit(torch.utils.data.DataLoader(Floats(), batch_size=2), torch.device("cpu"), 1.0, 2.0)
    for _ in range(2):  # a second pass sees the same values: normalizing a batch never edits the stored data
        x = torch.cat([x for x, _ in split.batches()])
        assert torch.equal(x, (Floats.data[:, None] - 1.0) / 2.0)


def test_mnist1d_trains_and_evaluates(data_dir, tmp_path):
    pytest.importorskip("mnist1d")
    out = tmp_path / "m.pth"
    proc = run("train.py", "--task", "psmnist", "--dataset", "mnist1d", *TINY_FLAGS, "--epochs", "1",
               "--max-train-samples", "256", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mnist1d: 256 train / 500 validation / 1,000 test images" in proc.stdout
    assert "task psmnist: 40 pixels per image" in proc.stdout and "test: loss" in proc.stdout
    ckpt = load(out)
    assert ckpt["config"]["seq_len"] == 40 and ckpt["dataset"] == "mnist1d"
    assert torch.equal(ckpt["model"]["permutation"], pixel_permutation(40, 0))

    proc = run("test_model.py", "--checkpoint", out, "--out-dir", tmp_path / "eval", "--num-samples", "4",
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mnist1d test set: accuracy" in proc.stdout
    for name in ("confusion_matrix.png", "predictions_visualization.png", "confident_mistakes.png", "metrics.json"):
        assert (tmp_path / "eval" / name).stat().st_size > 0

    # 28x28 images are not what a 40-step model reads: one line, no traceback
    proc = run("test_model.py", "--checkpoint", out, "--dataset", "mnist", "--data-dir", data_dir,
               "--out-dir", tmp_path / "eval2", "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the mnist test set holds items of shape (1, 28, 28), which this model, trained on mnist1d, does not " \
           "read" in proc.stderr

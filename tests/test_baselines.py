"""The CNN and ViT baselines: their size against Vision Mamba 2's, shapes and config errors, and
train.py --arch cnn/vit with test_model.py end to end on conftest.py's synthetic IDX files."""

import dataclasses
import json

import pytest
import torch

import checkpoint
import train
from baselines import CNN, CNNConfig, ViT, ViTConfig
from helpers import load, run_script as run
from vision_mamba2 import VisionMamba2Config, VisionMamba2, count_params


@pytest.mark.parametrize("model_cls,config_cls", [(CNN, CNNConfig), (ViT, ViTConfig)])
def test_defaults_have_about_the_mamba_models_parameter_count(model_cls, config_cls):
    ours = count_params(VisionMamba2(VisionMamba2Config()))
    theirs = count_params(model_cls(config_cls()))
    assert abs(theirs / ours - 1) < 0.05, (theirs, ours)


@pytest.mark.parametrize("model", [CNN(CNNConfig(width=4)), ViT(ViTConfig(d_model=16, num_blocks=1, heads=2))])
def test_forward_backward_and_input_check(model):
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 28, 28\), got \(3, 28, 28\)"):
        model(torch.randn(3, 28, 28))


def test_other_image_sizes_and_channels():
    x = torch.randn(2, 3, 32, 32)
    assert CNN(CNNConfig(img_size=32, in_chans=3, num_classes=5, width=4))(x).shape == (2, 5)
    assert ViT(ViTConfig(img_size=32, in_chans=3, num_classes=5, d_model=16, heads=2, patch_size=4))(x).shape == (2, 5)


@pytest.mark.parametrize("build,message", [
    (lambda: ViT(ViTConfig(d_model=30, heads=4)), "d_model 30 must be divisible by heads 4"),
    (lambda: ViT(ViTConfig(patch_size=3)), "img_size 28 must be divisible by patch_size 3"),
    (lambda: CNN(CNNConfig(img_size=30)), "img_size 30 must be divisible by 4"),
    (lambda: CNN(CNNConfig(width=0)), "width must be a positive integer"),
    (lambda: CNN(CNNConfig(dropout=1.0)), r"dropout must be in \[0, 1\)"),
    (lambda: ViTConfig.from_dict({**dataclasses.asdict(ViTConfig()), "d_state": 8}), r"unknown keys \['d_state'\]"),
])
def test_bad_configs_say_what_to_change(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("argv,message", [
    (["--arch", "cnn", "--d-state", "8"], "--d-state belongs to --task/--arch image/mamba2, smnist/mamba2, "),
    (["--arch", "vit", "--scan", "uni"], "--scan belongs to --task/--arch image/mamba2, not to image/vit"),
    (["--arch", "cnn", "--d-model", "64"], "--d-model belongs to --task/--arch image/mamba2, image/vit, smnist/"),
    (["--arch", "cnn", "--patch-size", "4"], "--patch-size belongs to --task/--arch image/mamba2, image/vit, not to"),
    (["--width", "8"], "--width belongs to --task/--arch image/cnn, not to image/mamba2"),
    (["--heads", "2"], "--heads belongs to --task/--arch image/vit, not to image/mamba2"),
    (["--arch", "vit", "--task", "smnist"], "--arch vit is an image classifier: --task smnist takes only --arch"),
])
def test_flags_of_another_arch_are_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before any data is read
        train.main([*argv, "--out", str(tmp_path / "m.pth"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("arch,flags,model_cls", [
    ("cnn", ["--width", "4"], CNN),
    ("vit", ["--d-model", "16", "--num-blocks", "1", "--heads", "2"], ViT),
])
def test_baseline_trains_resumes_and_evaluates(arch, flags, model_cls, data_dir, tmp_path, capsys):
    common = ["--batch-size", "32", "--device", "cpu", "--seed", "0", "--data-dir", data_dir]
    proc = run("train.py", "--arch", arch, *flags, "--epochs", "1", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / f"{arch}_mnist.pth"  # the arch's own default --out: the Mamba model's is not overwritten
    assert f"model: {arch}, " in proc.stdout and "backend" not in proc.stdout.split("model: ")[1].split("\n")[0]
    assert "test: loss" in proc.stdout and "Traceback" not in proc.stderr
    ckpt = load(out)
    assert ckpt["args"]["arch"] == arch and not (tmp_path / "vision_mamba2_mnist.pth").exists()
    assert any((tmp_path / "runs").glob(f"{arch}_mnist-*"))  # the run is named after its checkpoint

    # resume without --arch: the checkpoint's architecture carries on
    proc = run("train.py", "--resume", tmp_path / f"{arch}_mnist_last.pth", "--epochs", "2", "--out", out, *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout and "epoch 2/2" in proc.stdout and f"model: {arch}, " in proc.stdout
    # ... and another one is refused, in one line
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(tmp_path / f"{arch}_mnist_last.pth"), "--arch", "mamba2",
                    "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--arch mamba2 contradicts the checkpoint's {arch}" in err, err

    rebuilt = checkpoint.rebuild_model(load(out), str(out), torch.device("cpu"))
    assert type(rebuilt) is model_cls
    proc = run("test_model.py", "--checkpoint", out, "--data-dir", data_dir, "--out-dir", tmp_path / "eval",
               "--num-samples", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"arch {arch}, epoch {load(out)['epoch']}" in proc.stdout and "mnist test set: accuracy" in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"]["arch"] == arch and metrics["accuracy"] == load(out)["metrics"]["test_acc"]


def test_compiled_vit_trains_and_validates(data_dir, tmp_path):
    # eval mode without autocast takes PyTorch's fused Transformer kernel, which fails under torch.compile
    # (pytorch/pytorch#196251) unless steps.compile_model turns that shortcut off
    proc = run("train.py", "--arch", "vit", "--d-model", "16", "--num-blocks", "1", "--heads", "2", "--compile",
               "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--data-dir", data_dir,
               "--out", tmp_path / "vit.pth")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ", compiled" in proc.stdout and "test: loss" in proc.stdout

"""bench.py: every section runs and prints its table, one JSON holds them all, bad input is a one-line error.
Tiny sizes on the synthetic MNIST of conftest.py; the timings themselves are never asserted."""

import importlib.util
import json
import math

import pytest
import torch

from helpers import run_script

HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None
TINY = ["--repeats", "1", "--batch-size", "2", "--naive-images", "32", "--scaling-lengths", "8", "16",
        "--tokens", "32", "--lengths", "16", "--batch", "2", "--images", "64", "--step-images", "4",
        "--eval-images", "8", "--eval-batch-size", "4", "--single-images", "4"]


def numbers(rows):
    return [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_every_section_runs_into_one_json(data_dir, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "scaling.png"
    proc = run_script("bench.py", "--data-dir", data_dir, "--device", "cpu", "--json", out, "--plot", plot, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["models", "scaling", "ssd", "train", "eval", "ops"]
    assert report["command"].startswith("python bench.py --data-dir") and report["machine"]["threads"] >= 1
    if not HAS_MAMBA_SSM:
        assert "skipped" in report["sections"].pop("ssd") and "ssd: skipped" in proc.stdout
    for name, rows in report["sections"].items():
        assert rows and all(math.isfinite(v) and v >= 0 for v in numbers(rows)), (name, rows)

    models = report["sections"]["models"]
    assert [r["model"].split(" (")[0].split(":")[0] for r in models] == \
        ["Vision Mamba 2", "Vision Mamba 2", "CNN", "ViT", "naive pipeline"]  # no CUDA here: no official row
    assert [r["batch"] for r in models] == [2, 2, 2, 2, 32] and {r["device"] for r in models} == {"cpu"}
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["activation_mib"] > 0 and r["peak_mib"] is None
               for r in models)
    assert "| Vision Mamba 2 | portable | eager | 475,498 | fp32 | 2 |" in proc.stdout
    assert "| Vision Mamba 2 (--patch-size 2) | portable | eager | 489,194 | fp32 | 2 |" in proc.stdout
    assert {r["mode"] for r in models} == {"eager"}
    assert {r["model"] for r in report["sections"]["scaling"]} == {"Mamba-2", "attention"}
    ops = report["sections"]["ops"]
    assert [r["model"].split(" (")[0] for r in ops] == ["Vision Mamba 2", "sequential Mamba 2", "CNN", "ViT"]
    assert all(r["batch"] == 2 and r["ops_per_step"] > 0 for r in ops)
    assert "| Vision Mamba 2 | 475,498 | 2 |" in proc.stdout
    assert plot.stat().st_size > 0


def test_quick_takes_small_sizes_and_flags_still_win():
    import bench

    args = bench.parse_args(["--quick", "--repeats", "3", "models"])
    assert args.repeats == 3 and args.sections == ["models"]
    assert (args.batch_size, args.tokens, args.eval_images) == (32, 3136, 256)
    assert bench.parse_args([]).batch_size == 128
    assert bench.parse_args([]).tokens is None  # chosen by the device: 8,192 on a CPU, 32,768 on a GPU


def test_a_row_that_runs_out_of_memory_says_so_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    import torch

    import bench

    calls = []

    def median_time(fn, repeats, warmup=1, device=None):  # the second length of every stack runs out of memory
        calls.append(1)
        if len(calls) % 2 == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 126.00 MiB")
        return 0.5

    monkeypatch.setattr(bench, "median_time", median_time)
    args = bench.parse_args(["scaling", "--device", "cpu", "--scaling-lengths", "8", "16", "--tokens", "32",
                             "--plot", str(tmp_path / "scaling.png")])
    rows = bench.bench_scaling(args)
    assert [r["ms"] is None for r in rows] == [False, True, False, True]
    assert [r["us_per_token"] for r in rows if r["ms"]] == [500000 / 32, 500000 / 32]
    assert capsys.readouterr().out.count("| out of memory | out of memory | out of memory | out of memory |") == 2
    assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["nonsense"], "unknown section 'nonsense': choose from models, scaling, ssd, train, eval, ops"),
    (["--repeats", "0"], "--repeats"),
    (["train", "--data-dir", "{empty}"], "error: "),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    proc = run_script("bench.py", *[a.format(empty=tmp_path) for a in argv])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_rows_say_why_they_have_no_numbers_and_the_others_still_run(data_dir, monkeypatch, capsys):
    import torch

    import bench
    import train

    def compile_model(model, mode="default"):  # stands in for torch.compile: fails on the ViT only
        torch.backends.mha.set_fastpath_enabled(False)  # as the real one does
        if isinstance(model, bench.ViT):
            raise RuntimeError("a compiler bug")
        return model

    warmups, real_median_time = [], bench.median_time

    def median_time(fn, repeats, warmup=1, device=torch.device("cpu")):  # the first model runs out of memory
        warmups.append(warmup)
        if len(warmups) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 126.00 MiB")
        return real_median_time(fn, repeats, warmup, device)

    monkeypatch.setattr(train, "compile_model", compile_model)
    monkeypatch.setattr(bench, "median_time", median_time)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    args = bench.parse_args(["models", "--compile", "--device", "cpu", "--data-dir", str(data_dir), "--repeats", "1",
                             "--batch-size", "2", "--naive-images", "32"])
    rows = bench.bench_models(args)
    assert [(r["model"].split()[0], r["mode"], r["failed"]) for r in rows] == [
        ("Vision", "eager", "out of memory"), ("Vision", "compiled", None), ("Vision", "eager", None),
        ("Vision", "compiled", None), ("CNN", "eager", None), ("CNN", "compiled", None), ("ViT", "eager", None),
        ("ViT", "compiled", "compile failed (RuntimeError)"), ("naive", "eager", None)]
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # eager rows keep PyTorch's fused attention
    # compiled models warm up longer (CUDA graphs record then)
    assert warmups == [1, 3, 3, 1, 1, 3, 3, 1, 1, 3, 3, 1, 1]
    measured = [r for r in rows if not r["failed"]]
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in measured)
    # activation memory: eager only
    assert [r["activation_mib"] is None for r in measured] == [True, False, True, False, True, False, False]
    out, err = capsys.readouterr()
    assert "| Vision Mamba 2 | portable | eager | 475,498 | fp32 | 2 | out of memory | - | - | - | - |" in out
    assert "| ViT (baselines.py) | - | compiled | 462,154 | fp32 | 2 | compile failed (RuntimeError) |" in out
    assert "compile failed (RuntimeError): a compiler bug" in err


def test_compile_mode_needs_compile():
    proc = run_script("bench.py", "models", "--compile-mode", "reduce-overhead")
    assert proc.returncode == 2 and "--compile-mode applies only with --compile" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_graphs_need_a_gpu():
    proc = run_script("bench.py", "models", "--cuda-graphs")
    assert proc.returncode == 2 and "--cuda-graphs needs a CUDA GPU" in proc.stderr

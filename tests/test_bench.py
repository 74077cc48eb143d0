"""bench.py: every section runs and prints its table, one JSON holds them all, bad input is a one-line error.
Tiny sizes; the timings themselves are never asserted."""

import importlib.util
import json
import math

import pytest
import torch

from helpers import run_script

HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None
TINY = ["--repeats", "1", "--batch-size", "2", "--seq-batch-size", "1", "--lengths", "16", "32", "--tokens", "64"]


def numbers(rows):
    return [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_every_section_runs_into_one_json(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "scaling.png"
    proc = run_script("bench.py", "--device", "cpu", "--json", out, "--plot", plot, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["models", "scaling", "ssd", "profile"]
    assert report["command"].startswith("python bench.py --device cpu") and report["machine"]["threads"] >= 1
    if not HAS_MAMBA_SSM:
        assert "skipped" in report["sections"].pop("ssd") and "ssd: skipped" in proc.stdout
    for name, rows in report["sections"].items():
        assert rows and all(math.isfinite(v) and v >= 0 for v in numbers(rows)), (name, rows)

    names = ["Vision Mamba 2", "Vision Mamba 2", "sequential Mamba 2", "CNN", "ViT"]  # no CUDA here: no official row
    models = report["sections"]["models"]
    assert [r["model"].split(" (")[0] for r in models] == names
    assert [r["batch"] for r in models] == [2, 2, 1, 2, 2] and {r["device"] for r in models} == {"cpu"}
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["activation_mib"] > 0 and r["peak_mib"] is None
               for r in models)
    assert "| Vision Mamba 2 | portable | eager | 475,498 | 2 |" in proc.stdout
    assert "| Vision Mamba 2 (--patch-size 2) | portable | eager | 489,194 | 2 |" in proc.stdout
    assert "| sequential Mamba 2 (784 steps) | portable | eager | 490,986 | 1 |" in proc.stdout
    assert {r["mode"] for r in models} == {"eager"}
    assert {r["model"] for r in report["sections"]["scaling"]} == {"Mamba-2", "attention"}
    profiled = report["sections"]["profile"]
    assert [r["model"].split(" (")[0] for r in profiled] == names and [r["batch"] for r in profiled] == [2, 2, 1, 2, 2]
    assert all(r["ops_per_step"] > 0 and len(r["rest_largest"]) == 3 for r in profiled)
    assert "| Vision Mamba 2 | 475,498 | 2 |" in proc.stdout
    assert plot.stat().st_size > 0


def test_the_profile_splits_each_step_into_kinds_that_add_up():
    """Matrix products, convolutions and the rest share each model's whole step; the rest's largest ops are part of
    the rest."""
    import bench

    rows = bench.bench_profile(bench.parse_args(["profile", "--batch-size", "2", "--seq-batch-size", "1"]))
    assert [r["model"].split(" (")[0] for r in rows] == ["Vision Mamba 2", "Vision Mamba 2", "sequential Mamba 2",
                                                         "CNN", "ViT"]
    for r in rows:
        shares = r["shares"]
        assert list(shares) == ["matrix products", "convolutions", "the rest"] and abs(sum(shares.values()) - 1) < 1e-9
        assert shares["matrix products"] > 0 and shares["the rest"] > 0 and r["step_ms"] > 0, r
        assert len(r["rest_largest"]) == 3 and sum(r["rest_largest"].values()) <= shares["the rest"] + 1e-9
        assert all(bench.kind_of(op) == "the rest" for op in r["rest_largest"])
    assert rows[3]["shares"]["convolutions"] > 0 and rows[4]["shares"]["convolutions"] > 0  # CNN; ViT's patch stem
    assert bench.kind_of("aten::mm") == bench.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == \
        "matrix products" and bench.kind_of("aten::convolution_backward") == "convolutions"
    assert bench.kind_of("aten::mul") == bench.kind_of("Optimizer.step#AdamW.step") == "the rest"


def test_quick_takes_small_sizes_and_flags_still_win():
    import bench

    args = bench.parse_args(["--quick", "--repeats", "3", "models"])
    assert args.repeats == 3 and args.sections == ["models"]
    assert (args.batch_size, args.seq_batch_size, args.tokens) == (32, 4, 3136)
    assert bench.parse_args([]).batch_size == 128
    assert bench.parse_args([]).tokens is None  # chosen by the device: 8,192 on a CPU, 32,768 on a GPU


def test_a_row_that_runs_out_of_memory_says_so_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    import torch

    import bench

    calls = []

    def median_time(fn, repeats, device=None):  # the second length of every stack runs out of memory
        calls.append(1)
        if len(calls) % 2 == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 126.00 MiB")
        return 0.5

    monkeypatch.setattr(bench, "median_time", median_time)
    args = bench.parse_args(["scaling", "--device", "cpu", "--lengths", "8", "16", "--tokens", "32",
                             "--plot", str(tmp_path / "scaling.png")])
    rows = bench.bench_scaling(args)
    assert [r["ms"] is None for r in rows] == [False, True, False, True]
    assert [r["us_per_token"] for r in rows if r["ms"]] == [500000 / 32, 500000 / 32]
    assert capsys.readouterr().out.count("| out of memory | out of memory | out of memory | out of memory |") == 2
    assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["nonsense"], "unknown section 'nonsense': choose from models, scaling, ssd, profile"),
    (["--repeats", "0"], "--repeats"),
    (["models", "--seq-batch-size", "0"], "--seq-batch-size"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    proc = run_script("bench.py", *[a.format(empty=tmp_path) for a in argv])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_rows_say_why_they_have_no_numbers_and_the_others_still_run(monkeypatch, capsys):
    import bench

    class GraphedTraining:  # stands in for capturing CUDA graphs: fails on the ViT only, else runs eagerly
        def __new__(cls, model, sample):
            if isinstance(model, bench.ViT):
                raise RuntimeError("a capture bug")
            return model

    calls, real_median_time = [], bench.median_time

    def median_time(fn, repeats, device=torch.device("cpu")):  # the first model runs out of memory
        calls.append(fn)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 126.00 MiB")
        return real_median_time(fn, repeats, device)

    monkeypatch.setattr(bench.steps, "GraphedTraining", GraphedTraining)
    monkeypatch.setattr(bench, "median_time", median_time)
    args = bench.parse_args(["models", "--device", "cpu", "--repeats", "1", "--batch-size", "2",
                             "--seq-batch-size", "1"])
    args.cuda_graphs = True  # parse_args refuses it without a GPU
    rows = bench.bench_models(args)
    assert [(r["model"].split()[0], r["mode"], r["failed"]) for r in rows] == [
        ("Vision", "eager", "out of memory"), ("Vision", "CUDA graphs", None), ("Vision", "eager", None),
        ("Vision", "CUDA graphs", None), ("sequential", "eager", None), ("sequential", "CUDA graphs", None),
        ("CNN", "eager", None), ("CNN", "CUDA graphs", None), ("ViT", "eager", None),
        ("ViT", "CUDA graphs", "CUDA graphs failed (RuntimeError)")]
    assert len(calls) == 1 + 2 * 8  # training, then inference, per measured row
    measured = [r for r in rows if not r["failed"]]
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in measured)
    # activation memory: eager only
    assert [r["activation_mib"] is None for r in measured] == [True, False, True, False, True, False, True, False]
    out, err = capsys.readouterr()
    assert "| Vision Mamba 2 | portable | eager | 475,498 | 2 | out of memory | - | - | - | - |" in out
    assert "| ViT (baselines.py) | - | CUDA graphs | 462,154 | 2 | CUDA graphs failed (RuntimeError) |" in out
    assert "CUDA graphs failed (RuntimeError): a capture bug" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_graphs_need_a_gpu():
    proc = run_script("bench.py", "models", "--cuda-graphs")
    assert proc.returncode == 2 and "--cuda-graphs needs a CUDA GPU" in proc.stderr


def test_without_mamba_ssm_ssd_is_refused_by_name_and_skipped_in_a_full_run(monkeypatch, capsys):
    import bench

    monkeypatch.setattr(bench, "load_official_kernels", lambda: None)
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(["ssd"])
    assert exit.value.code == 2 and "ssd cannot run here: it compares against mamba-ssm's" in capsys.readouterr().err
    args = bench.parse_args([])
    monkeypatch.setattr(bench, "SECTIONS", {"ssd": bench.bench_ssd})  # the other sections run in the tests above
    assert bench.run(args) == 0 and "ssd: skipped, it compares" in capsys.readouterr().out
    assert "install mamba-ssm" in args.report["sections"]["ssd"]["skipped"]


def test_a_variant_is_one_more_row_built_from_train_py_flags(capsys):
    import bench
    from vision_mamba2 import count_params, create_vision_mamba2_model

    args = bench.parse_args(["models", "--variant=--stem-width 24", "--variant", "--mlp-ratio 1 --num-blocks 3"])
    specs = bench.model_specs(args, torch.device("cpu"))
    variants = [(name, build()) for name, _, build, _ in specs if name.startswith("Vision Mamba 2 --")]
    assert [name for name, _ in variants] == ["Vision Mamba 2 --stem-width 24",
                                              "Vision Mamba 2 --mlp-ratio 1 --num-blocks 3"]
    assert [count_params(m) for _, m in variants] == [
        count_params(create_vision_mamba2_model(stem_width=24)),
        count_params(create_vision_mamba2_model(mlp_ratio=1, num_blocks=3))]
    assert variants[0][1].config.backend == "portable"
    for flags, message in [("--stem-width 5", "invalid choice: 5"), ("--epochs 3", "--epochs is not a model flag"),
                           ("--d-model 100 --headdim 24", "must be divisible by headdim")]:
        with pytest.raises(SystemExit) as exit:
            bench.parse_args(["models", f"--variant={flags}"])
        assert exit.value.code == 2 and message in capsys.readouterr().err

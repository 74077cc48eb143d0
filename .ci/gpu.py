"""
What only a CUDA GPU can measure or check, in one command of at most 9 minutes on one GPU, each step under its own
time budget, logs and JSON written to OUT as each step ends. Run through the two scripts beside this file:

    bash .ci/gpu [--wheels DIR] [--data-dir DIR] [--steps NAME,...] OUT      # the default recipe: speed, tests
    bash .ci/gpu-sequential [--wheels DIR] [--epochs N] [--tasks smnist,psmnist] OUT   # sequential MNIST
    bash .ci/gpu --dry-run OUT; bash .ci/gpu-sequential --dry-run OUT        # the same steps on a CPU, tiny sizes

Both first install mamba-ssm (skipped when it already imports): from the wheels in --wheels DIR or $MAMBA_WHEELS
(e.g. the pure-Python wheel `MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip wheel --no-build-isolation
--no-deps mamba-ssm==2.3.1` makes), into <cache-dir>/site, else from PyPI as the README says. Then OUT/env.json: GPU,
driver, torch, triton, CUDA, and which backend `auto` picks. MNIST must be in --data-dir (default ./data, torchvision's
layout: MNIST/raw/ with the four .gz files); nothing is downloaded.

Time: the steps run one after another, alone on the GPU. Step i may run until the sum of the budgets of steps 1..i
(capped at 9 minutes), so time a step leaves unused goes to the next ones and a step that overruns is cut (SIGINT,
then SIGKILL 10 s later: at most those 10 s come out of the next step's time). A cut train.py saves a mid-epoch
checkpoint on SIGINT, so the epochs it finished are still read. Triton's kernel cache and torch.compile's cache live
in one folder (--cache-dir) for all steps and both scripts: kernels compiled by one step are loaded by the next.

OUT/summary.json, rewritten after every step: per step its command, exit code, seconds, budget, status and what was
read from its outputs; the script exits 1 if a step failed or a measurement is missing. The dry run writes a tiny
synthetic MNIST (tests/helpers.py) unless --data-dir is given; what needs CUDA is run where that checks the command
line (train.py --cuda-graphs must exit 2 on a CPU, tests/test_cuda.py must skip) or skipped with the reason recorded.

.ci/gpu, in this order (budget in seconds; estimates from the H100 run in docs/h100/ and scaled to the 7x7 model):
    install 20, env 20      (each imports mamba-ssm, and so transformers: ~5 s)
    train-cuda-graphs 120  train.py --cuda-graphs --epochs 2 --max-train-samples 19968 --val-size 5120. First, so
                           that it pays Triton's first compile + autotune of the official kernels (~90 s on the H100)
                           and the default run after it is timed as users see it once the kernels are compiled.
                           Epoch 1 is compile + capture, epoch 2 the steady speed; 19,968 = 156 batches of 128 and
                           5,120 = 20 of 256 leave no smaller last batch, which torch.compile would compile again.
    train-default 135      python train.py, the whole default recipe: the 60 s goal (wall time, test accuracy, img/s)
    bench-b128 40, bench-b1024 45
                           bench.py models --cuda-graphs at batch 128 and 1024: portable and official, eager and
                           CUDA graphs (bench.py also times the 14x14 model, the CNN, the ViT and the naive pipeline:
                           it has no flag to time the default model alone). bench.py --json writes a section's rows
                           when the section ends, so each call writes its own file: a cut call loses only its rows.
    test-cuda 95           tests/test_cuda.py with TRITON_INTERPRET=0 TRITON_F32_DEFAULT=ieee (fp32 kernels compared
                           tightly: a separate kernel cache, so it compiles again, ~90 s)
    train-portable 25, train-portable-compile 40
                           --backend portable and --backend portable --compile, sized as train-cuda-graphs. Last:
                           bench.py already times the portable backend eagerly, and torch.compile's first compile
                           takes over a minute; rerun what was cut with --steps (its budget then comes first)
Top-level keys of summary.json: gpu, train_wall_s and test_acc (of python train.py), train_img_per_s (the fastest
default-model training measured, train.py's median epoch or a bench.py row) with its batch size, backend, mode and
source beside it, and official_over_portable (training img/s, official / portable, at the same batch size and mode).

.ci/gpu-sequential trains --task smnist, then --task psmnist, one after the other (two runs side by side on one GPU
slowed each other ~2x: docs/h100/log4*.txt), and evaluates each one's best checkpoint with test_model.py; each
task's folder OUT/<task>/ gets its checkpoints, train.log, training_history.png, train_metrics.json (the
checkpoints' metrics and history), eval.log, metrics.json and test_model.py's figures. A task whose last checkpoint
(*_last.pth) is already in OUT resumes from it (--resume), so a run cut by the time limit continues in the next call.
Recipe: --backend portable --compile at the default batch 128, --epochs 10. Why (docs/h100/log4s_smnist.txt, H100):
the compiled portable backend is the only one measured on sMNIST, at 10.5 s an epoch (5,245 img/s, epochs 9-19,
after the image run beside it had ended), and on the image task it trained 2.3x faster than the official kernels
(README); its first epoch took 96 s, nearly all compiling, while another compile shared the machine. So: smnist
~15 s start + ~85 s compile + ~30 s compiling the evaluation graphs + 10 x 11 s = ~240 s; psmnist, its graphs
mostly in the compile cache, ~195 s; test_model.py ~25 s each: ~500 of the 540 s. 12 epochs would need ~545 s.
Budgets: install 20, env 20, train-smnist 255, eval-smnist 30, train-psmnist 185, eval-psmnist 30.
(The Annotated S4 trained 20 epochs; here --epochs N trades the margin for epochs.)
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # vision_mamba2 (env), helpers (a dry run's data and environment)
PY = sys.executable
TOTAL_S = 9 * 60  # the whole command, every step included
KILL_AFTER = 10  # seconds between a step's SIGINT and its SIGKILL
DRY_BUDGET = 240  # a dry run's per step, with no limit in all: only catches a hang, however busy the CPU
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# the default model at a dry run's size: what is checked there is the command line and the outputs, not the model
TINY = ["--device", "cpu", "--max-train-samples", "64", "--val-size", "32", "--batch-size", "32", "--d-model", "16",
        "--num-blocks", "1"]


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file


class Steps:
    """Runs the steps one by one, each under `timeout` until its deadline, and rewrites OUT/summary.json after each."""

    def __init__(self, out, env, summarize, total):
        self.out, self.env, self.summarize, self.total = out, env, summarize, total
        self.t0, self.planned, self.records = time.monotonic(), 0, {}

    def elapsed(self):
        return time.monotonic() - self.t0

    def run(self, name, cmd, budget, *, expect=0, env=None, note=None, result=None, log=None):
        """Run cmd from the repository, logged to `log` (default OUT/<name>.log), until this step's deadline;
        result() then reads what it wrote."""
        cmd, log = [str(c) for c in cmd], log or self.out / f"{name}.log"
        self.planned += budget
        # a step cut at its deadline may take KILL_AFTER more, but never past the total
        timeout = int(min(self.planned, self.total - KILL_AFTER) - self.elapsed())
        record = dict(command=shlex.join(cmd), budget_s=budget, log=os.path.relpath(log, self.out),
                      **({"note": note} if note else {}))
        if timeout < 5:
            record.update(status="no time", reason=f"no time left of the {self.total} s")
            return self.finish(name, record)
        with open(log, "w") as f:
            f.write(f"$ {record['command']}\n")
            f.flush()
            start = time.monotonic()
            rc = subprocess.run(["timeout", "-s", "INT", "-k", str(KILL_AFTER), str(timeout), *cmd], cwd=REPO,
                                env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT).returncode
        # timeout: 124 after its SIGINT, 137 or -9 (itself too) after its SIGKILL
        status = "ok" if rc == expect else "timed out" if rc in (124, 137, -9) else "failed"
        record.update(rc=rc, expected_rc=expect, seconds=round(time.monotonic() - start, 1), timeout_s=timeout,
                      status=status)
        if result:
            record["result"] = result()
        return self.finish(name, record)

    def skip(self, name, reason, budget=0):
        self.planned += budget  # its time, if any, goes to the next steps
        return self.finish(name, dict(status="skipped", reason=reason))

    def finish(self, name, record):
        self.records[name] = record
        said = record.get("reason") or f"rc {record['rc']}, {record['seconds']} s of {record['timeout_s']}"
        print(f"[{self.elapsed():4.0f} s] {name}: {record['status']} ({said})", flush=True)
        self.summarize()
        return record


# ----------------------------------------------------------------------------------------------------
# What both scripts share: arguments, environment, mamba-ssm, the data

def fail(message):
    """Input or a machine these steps cannot use: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def common_parser(prog, description):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("out", type=Path, help="folder for logs, JSON and outputs (created)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--wheels", type=Path, default=os.environ.get("MAMBA_WHEELS"),
                   help="folder of wheels to install mamba-ssm from, offline (default: $MAMBA_WHEELS, else PyPI)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="torchvision root holding MNIST/raw/ (default: ./data; dry run: a synthetic one in OUT)")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "vision-mamba2-gpu",
                   help="Triton's and torch.compile's caches and mamba-ssm's install, shared by every step")
    return p


def parse(parser, argv):
    """The arguments, with paths made absolute: the steps run from the repository."""
    args = parser.parse_args(argv)
    for key in ("out", "wheels", "data_dir", "cache_dir"):
        if getattr(args, key) is not None:
            setattr(args, key, Path(getattr(args, key)).resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def total(args):
    return math.inf if args.dry_run else TOTAL_S


def child_env(args):
    """The steps' environment: compiled (not interpreted) Triton, one cache folder, unbuffered logs."""
    env = os.environ
    if args.dry_run:  # as the test suite: one thread on a shared CPU, and no download can succeed
        from helpers import PROC_ENV
        env = PROC_ENV
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join([str(args.cache_dir / "site"), *filter(None, [env.get("PYTHONPATH")])]),
            "TRITON_CACHE_DIR": str(args.cache_dir / "triton"),
            "TORCHINDUCTOR_CACHE_DIR": str(args.cache_dir / "inductor")}


def prepare_data(args):
    """The MNIST root the steps read: --data-dir or ./data (checked), or for a dry run a tiny synthetic one."""
    if args.dry_run and args.data_dir is None:
        import numpy as np
        from helpers import synthetic_digits, write_idx
        raw = args.out / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for split, n in [("train", 160), ("t10k", 64)]:
            images, labels = synthetic_digits(n, rng)
            write_idx(raw / f"{split}-images-idx3-ubyte", images)
            write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        return args.out / "data"
    data = args.data_dir or REPO / "data"
    raw = data / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing:
        fail(f"MNIST is not in {raw}{os.sep} (no {', '.join(missing)}, .gz or not): pass --data-dir")
    return data


def install_mamba_ssm(steps, args):
    """mamba-ssm from --wheels into <cache-dir>/site (on PYTHONPATH), else from PyPI; skipped when it imports."""
    check = [PY, "-c", "import sys, vision_mamba2; sys.exit(vision_mamba2.load_official_kernels() is None)"]

    def imports():
        return subprocess.run(check, cwd=REPO, env=steps.env, capture_output=True, timeout=120).returncode == 0

    if imports():
        return steps.skip("install", "mamba-ssm already imports", budget=DRY_BUDGET if args.dry_run else 20)
    if args.wheels:
        wheels = sorted(args.wheels.glob("*.whl"))
        if not wheels:
            fail(f"no .whl file in --wheels {args.wheels}")
        cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target",
               args.cache_dir / "site", *wheels]
        env = {}
    else:  # its setup.py imports torch: no build isolation; no CUDA build (Mamba-2 runs on Triton)
        cmd = [PY, "-m", "pip", "install", "--no-build-isolation", "mamba-ssm==2.3.1"]
        env = {"MAMBA_FORCE_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE"}
    return steps.run("install", cmd, DRY_BUDGET if args.dry_run else 20, env=env,
                     result=lambda: {"imports": imports()})


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def environment_step(steps, args):
    steps.run("env", [PY, Path(__file__), "env", args.out / "env.json"], DRY_BUDGET if args.dry_run else 20)
    if not args.dry_run and not read_json(args.out / "env.json").get("cuda_available"):
        fail(f"no CUDA GPU here (see {args.out / 'env.log'}): on a CPU, run with --dry-run")


def describe_environment(path):
    """OUT/env.json: the machine, the versions, and which Mamba-2 backend `auto` picks (subcommand `env`)."""
    import importlib.metadata
    import platform

    import torch
    from vision_mamba2 import describe_backend, load_official_kernels, resolve_backend

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def output(*cmd):
        if shutil.which(cmd[0]) is None:
            return None
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or None

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    kernels, nvcc = load_official_kernels(), output("nvcc", "--version")
    info = dict(
        gpu=torch.cuda.get_device_name(0) if cuda else None,
        gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        nvidia_smi=output("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
        nvcc=nvcc and nvcc.splitlines()[-1],
        cuda_available=cuda, torch=torch.__version__, torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), triton=version("triton"), mamba_ssm=version("mamba_ssm"),
        causal_conv1d=version("causal_conv1d"), torchvision=version("torchvision"), python=platform.python_version(),
        cpus=os.cpu_count(), platform=platform.platform(),
        device=device, backend_auto=resolve_backend("auto", device), backend_auto_why=describe_backend("auto", device),
        fused_conv_scan=kernels is not None and kernels.fused is not None,  # needs causal-conv1d's CUDA build
        **{k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "PYTHONPATH")})
    write_json(path, info)
    print(json.dumps(info, indent=2))


def report(summary, out):
    print(f"{out / 'summary.json'}: {'ok' if summary['ok'] else 'NOT ok'}; failed: {summary['failed'] or 'none'}; "
          f"missing: {summary['missing'] or 'none'}")
    return 0 if summary["ok"] else 1


# ----------------------------------------------------------------------------------------------------
# Reading what train.py and bench.py wrote

def load_checkpoint(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True) if Path(path).exists() else None


def last_path(out):
    return out.with_name(f"{out.stem}_last{out.suffix}")  # train.py's *_last.pth beside --out


def train_result(out, log):
    """What a train.py run (--out `out`) left: its epochs' img/s, the steady speed, the test accuracy."""
    last = load_checkpoint(last_path(out))
    if last is None:
        return None
    best, args, speeds = load_checkpoint(out), last["args"], last["history"]["images_per_sec"]
    said = re.search(r"^backend: (\w+)", log.read_text(errors="replace"), re.M) if log.exists() else None
    return dict(epochs_done=last["epoch"], epochs=args["epochs"], batch_size=args["batch_size"],
                backend=said and said.group(1),
                mode="CUDA graphs" if args["cuda_graphs"] else "compiled" if args["compile"] else "eager",
                images_per_sec=[round(s) for s in speeds],
                # epoch 1 holds the compiling (Triton, torch.compile) and the graph capture
                steady_img_per_s=round(statistics.median(speeds[1:] or speeds)) if speeds else None,
                best_val_acc=last["best_val_acc"], best_epoch=last["best_epoch"],
                test_acc=best and best["metrics"].get("test_acc"))


def bench_result(path):
    """The default model's rows of a bench.py models --json file."""
    rows = read_json(path).get("sections", {}).get("models")
    rows = rows if isinstance(rows, list) else []  # (a section bench.py skipped holds the reason instead)
    keep = ("backend", "mode", "batch", "train_img_s", "infer_img_s", "peak_mib", "failed")
    return [{k: row[k] for k in keep} for row in rows if row["model"] == "Vision Mamba 2"]


def settle(summary, steps, wanted, done, full=True):
    """summary + what failed (or had no time left), what is missing (once all steps ran), and whether all is well."""
    summary.update(wall_s=round(steps.elapsed(), 1), steps=steps.records,
                   failed=[n for n, r in steps.records.items() if r["status"] in ("failed", "timed out", "no time")],
                   missing=[k for k in wanted if summary.get(k) in (None, {}, [])] if done and full else [])
    summary["ok"] = done and not summary["missing"] and not summary["failed"]
    write_json(steps.out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------
# .ci/gpu: the default recipe

STEPS = ("install", "env", "train-cuda-graphs", "train-default", "bench-b128", "bench-b1024", "test-cuda",
         "train-portable", "train-portable-compile")
TRAIN_STEPS = ("train-cuda-graphs", "train-default", "train-portable", "train-portable-compile")
BENCH_STEPS = {"bench-b128": 128, "bench-b1024": 1024}  # batch size on the GPU (a dry run: /64)


def checks_summary(steps, args):
    r = steps.records
    env = read_json(args.out / "env.json")
    default = r.get("train-default", {})
    speeds = []  # (img/s, batch, backend, mode, source) of every default-model training measured
    for name in TRAIN_STEPS:
        res = r.get(name, {}).get("result")
        if res and res["steady_img_per_s"]:
            speeds.append((res["steady_img_per_s"], res["batch_size"], res["backend"], res["mode"],
                           f"train.py ({name}), median epoch after the first"))
    ratios = {}
    for name in BENCH_STEPS:
        rows = [row for row in r.get(name, {}).get("result") or [] if row["train_img_s"]]
        speeds += [(round(row["train_img_s"]), row["batch"], row["backend"], row["mode"], f"bench.py models ({name})")
                   for row in rows]
        by = {(row["backend"], row["mode"], row["batch"]): row["train_img_s"] for row in rows}
        for mode, batch in sorted({(mode, batch) for _, mode, batch in by}):
            if ("official", mode, batch) in by and ("portable", mode, batch) in by:
                ratios[f"batch {batch}, {mode} (bench.py)"] = round(by["official", mode, batch] /
                                                                    by["portable", mode, batch], 2)
    official, portable = (r.get(name, {}).get("result") for name in ("train-default", "train-portable"))
    if official and portable and official["backend"] == "official" and official["steady_img_per_s"] \
            and portable["steady_img_per_s"]:
        ratios[f"batch {official['batch_size']}, eager (train.py)"] = \
            round(official["steady_img_per_s"] / portable["steady_img_per_s"], 2)
    best = max(speeds, default=(None,) * 5)
    summary = dict(
        gpu=env.get("gpu"), dry_run=args.dry_run,
        train_wall_s=default.get("seconds") if default.get("status") == "ok" else None,
        test_acc=(default.get("result") or {}).get("test_acc"),
        train_img_per_s=best[0], train_img_per_s_batch_size=best[1], train_img_per_s_backend=best[2],
        train_img_per_s_mode=best[3], train_img_per_s_source=best[4], official_over_portable=ratios,
        backend_auto=env.get("backend_auto"), triton_cache_was_empty=args.cold_cache)
    wanted = ["backend_auto", "train_wall_s", "test_acc", "train_img_per_s",
              *([] if args.dry_run else ["gpu", "official_over_portable"])]
    return settle(summary, steps, wanted, done=all(s in r for s in args.steps), full=tuple(args.steps) == STEPS)


def checks(argv):
    p = common_parser(".ci/gpu", "The default recipe on one GPU in 9 minutes (see the top of .ci/gpu.py)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated steps to run (in this order whatever the order given): {','.join(STEPS)}")
    args = parse(p, argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown step {sorted(unknown)[0]!r}: choose from {', '.join(STEPS)}")
    args.steps = [s for s in STEPS if s in args.steps.split(",")]
    data = prepare_data(args)
    args.cold_cache = not any((args.cache_dir / "triton").glob("*"))
    steps = Steps(args.out, child_env(args), lambda: checks_summary(steps, args), total(args))
    dry = args.dry_run

    def budget(seconds):
        return DRY_BUDGET if dry else seconds

    def train(name, flags, seconds, **kw):
        out = args.out / name / "vision_mamba2_mnist.pth"
        cmd = [PY, "train.py", *flags, "--data-dir", data, "--out", out, "--log-dir", args.out / name / "runs"]
        steps.run(name, cmd, budget(seconds), result=lambda: train_result(out, args.out / f"{name}.log"), **kw)

    def bench(name, seconds):
        json_path, batch = args.out / f"{name}.json", BENCH_STEPS[name]
        size = ["--device", "cpu", "--batch-size", batch // 64, "--repeats", 1, "--seq-batch-size", 1] if dry else \
            ["--batch-size", batch, "--cuda-graphs"]
        steps.run(name, [PY, "bench.py", "models", *size, "--json", json_path], budget(seconds),
                  note="dry run: without --cuda-graphs (bench.py takes it on CUDA only)" if dry else None,
                  result=lambda: bench_result(json_path))

    # the variant runs: 2 epochs, the first for compiling, with no smaller last batch (see the top of this file)
    short = TINY + ["--epochs", "2"] if dry else ["--epochs", "2", "--max-train-samples", "19968", "--val-size", "5120"]
    if "install" in args.steps:
        install_mamba_ssm(steps, args)
    if "env" in args.steps:
        environment_step(steps, args)
    if "train-cuda-graphs" in args.steps:
        train("train-cuda-graphs", ["--cuda-graphs", *short], 120, expect=2 if dry else 0,
              note="dry run: on a CPU train.py refuses --cuda-graphs, exit status 2" if dry else None)
    if "train-default" in args.steps:
        train("train-default", TINY + ["--epochs", "2"] if dry else [], 135)
    if "bench-b128" in args.steps:
        bench("bench-b128", 40)
    if "bench-b1024" in args.steps:
        bench("bench-b1024", 45)
    if "test-cuda" in args.steps:
        steps.run("test-cuda", [PY, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs"], budget(95),
                  env={"TRITON_INTERPRET": "0", "TRITON_F32_DEFAULT": "ieee"},
                  note="dry run: without a GPU every test skips" if dry else None)
    if "train-portable" in args.steps:
        train("train-portable", ["--backend", "portable", *short], 25)
    if "train-portable-compile" in args.steps:
        if dry:
            steps.skip("train-portable-compile", "dry run: torch.compile takes minutes on a CPU (train-portable is "
                                                 "the same command without --compile)")
        else:
            train("train-portable-compile", ["--backend", "portable", "--compile", *short], 40)
    return report(checks_summary(steps, args), args.out)


# ----------------------------------------------------------------------------------------------------
# .ci/gpu-sequential: sequential MNIST

TASKS = ("smnist", "psmnist")
# seconds: the first task's training compiles from an empty cache (the less certain estimate, ~240 s) and what it
# leaves goes to the second (~195 s), which finds most of its graphs in the cache; a cut run resumes in the next call
TRAIN_BUDGETS = (255, 185)
EVAL_BUDGET = 30


def sequential_summary(steps, args):
    tasks = {}
    for task in args.tasks:
        evaluated = steps.records.get(f"eval-{task}", {}).get("status") == "ok"
        tasks[task] = dict(**(steps.records.get(f"train-{task}", {}).get("result") or {}),
                           test_model_acc=read_json(args.out / task / "metrics.json").get("accuracy") if evaluated
                           else None)
    env = read_json(args.out / "env.json")
    summary = dict(gpu=env.get("gpu"), backend_auto=env.get("backend_auto"), dry_run=args.dry_run,
                   recipe=shlex.join(args.recipe), epochs=args.epochs)
    for task in args.tasks:  # train.py's test accuracy, and test_model.py's of the same checkpoint
        summary.update({f"{task}_test_acc": tasks[task].get("test_acc"),
                        f"{task}_test_model_acc": tasks[task]["test_model_acc"]})
    summary["tasks"] = tasks
    wanted = ["backend_auto", *[f"{t}_{k}" for t in args.tasks for k in ("test_acc", "test_model_acc")],
              *([] if args.dry_run else ["gpu"])]
    return settle(summary, steps, wanted, done=all(f"eval-{t}" in steps.records for t in args.tasks))


def sequential(argv):
    p = common_parser(".ci/gpu-sequential",
                      "Sequential MNIST (smnist, psmnist) on one GPU in 9 minutes (see the top of .ci/gpu.py)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: 10; dry run: 1)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, in this order (default: both)")
    args = parse(p, argv)
    args.tasks = args.tasks.split(",")
    if set(args.tasks) - set(TASKS):
        p.error(f"--tasks: choose from {', '.join(TASKS)}")
    args.epochs = args.epochs or (1 if args.dry_run else 10)
    # a dry run can't wait for torch.compile on a CPU (minutes): the same runs without it, tiny
    args.recipe = ["--backend", "portable", *(TINY + ["--d-state", "16", "--headdim", "8"] if args.dry_run
                                              else ["--compile"])]
    again = ["--device", "cpu"] if args.dry_run else ["--compile"]  # runtime flags: a resumed run needs them again
    data = prepare_data(args)
    steps = Steps(args.out, child_env(args), lambda: sequential_summary(steps, args), total(args))
    install_mamba_ssm(steps, args)
    environment_step(steps, args)
    for i, task in enumerate(args.tasks):
        folder = args.out / task
        folder.mkdir(exist_ok=True)
        out = folder / f"vision_mamba2_{task}.pth"
        resumed = last_path(out).exists()
        flags = ["--resume", last_path(out), *again] if resumed else ["--task", task, *args.recipe]
        paths = ["--epochs", args.epochs, "--data-dir", data, "--out", out, "--log-dir", folder / "runs"]

        def result(out=out, folder=folder, resumed=resumed):
            best, last = load_checkpoint(out), load_checkpoint(last_path(out))
            if last:
                write_json(folder / "train_metrics.json", dict(
                    epoch=last["epoch"], best_epoch=last["best_epoch"], best_val_acc=last["best_val_acc"],
                    metrics=best and best["metrics"], history=last["history"]))
            res = train_result(out, folder / "train.log")
            return res and dict(res, resumed=resumed)

        steps.run(f"train-{task}", [PY, "train.py", *flags, *paths],
                  DRY_BUDGET if args.dry_run else TRAIN_BUDGETS[min(i, 1)], log=folder / "train.log", result=result)
        if not out.exists():
            steps.skip(f"eval-{task}", "training wrote no checkpoint to evaluate")
            continue
        steps.run(f"eval-{task}", [PY, "test_model.py", "--checkpoint", out, "--data-dir", data, "--out-dir", folder,
                                   *(["--device", "cpu"] if args.dry_run else [])],
                  DRY_BUDGET if args.dry_run else EVAL_BUDGET, log=folder / "eval.log")
    return report(sequential_summary(steps, args), args.out)


if __name__ == "__main__":
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "env":
        describe_environment(argv[0])
    else:
        sys.exit({"checks": checks, "sequential": sequential}[command](argv))

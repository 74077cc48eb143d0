"""
What only a CUDA GPU measures, in one command of at most TOTAL_S seconds (run through .ci/gpu and .ci/gpu-sequential;
steps, budgets, the offline command and why: docs/gpu.md). The steps run one after another, each until a deadline,
the sum of its and the earlier steps' budgets: time a step leaves goes to the later ones, and a step past its
deadline is cut with SIGINT and keeps what it wrote. Results come from the files each step writes (train.py's
NAME.json beside --out, or its NAME_last.pth when cut; bench.py --json; pytest --junitxml; test_model.py's
metrics.json), never from logs. OUT/summary.json is rewritten after every step; the exit status is 1 when a step
failed or a measurement is missing.
"""

import argparse
import json
import os
import shlex
import statistics
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # vision_mamba2, for the env step
PY = sys.executable
TOTAL_S = 570  # the whole command: inside a 600 s limit, with time to pack OUT
KILL_AFTER = 10  # seconds between a step's SIGINT (train.py saves where it stands) and its SIGKILL
DRY_BUDGET = 240  # a dry run's per step, with no limit in all: it only catches a hang, however busy the CPU
WHEEL = "mamba-ssm==2.3.2.post1"  # >= 2.3.2: its bf16-autocast backward compiles (state-spaces/mamba #854)
MNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# the default model at a dry run's size: what a dry run checks is the command lines and the files, not the model
TINY = ["--device", "cpu", "--max-train-samples", "64", "--batch-size", "32", "--d-model", "16",
        "--num-blocks", "1"]
# seconds; install includes checking whether mamba-ssm already imports (torch, mamba-ssm, a first kernel call)
CHECKS = {"install": 30, "env": 30, "train-default": 270, "test-cuda": 110, "bench-b128": 40, "bench-b1024": 40,
          "train-cuda-graphs": 35, "train-portable-compile": 15}
SEQUENTIAL = {"install": 30, "env": 30, "train-smnist": 265, "eval-smnist": 40, "train-psmnist": 165,
              "eval-psmnist": 40}
# the variants: 2 epochs (the first compiles or captures), no smaller last batch (156 x 128, 20 x 256)
SHORT = ["--epochs", "2", "--max-train-samples", "19968"]


def write_json(path, obj):
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=2))
    os.replace(f"{path}.tmp", path)  # a reader never sees half a file


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


class Steps:
    """Runs the steps one by one, each under `timeout` until its deadline, and rewrites OUT/summary.json after each
    (summarize() returns the summary and what it must hold: (name, value) pairs)."""

    def __init__(self, args, budgets, summarize):
        self.args, self.budgets, self.summarize, self.env = args, budgets, summarize, child_env(args)
        self.t0, self.planned, self.records = time.monotonic(), 0, {}

    def run(self, name, cmd, *, expect=0, env=None, log=None, result=None):
        cmd, log = [str(c) for c in cmd], log or self.args.out / f"{name}.log"
        self.planned += self.budgets[name]
        timeout = DRY_BUDGET if self.args.dry_run else \
            int(min(self.planned, TOTAL_S - KILL_AFTER) - (time.monotonic() - self.t0))
        record = dict(command=shlex.join(cmd), budget_s=self.budgets[name], log=os.path.relpath(log, self.args.out))
        if timeout < 5:
            return self.finish(name, dict(record, status="no time", why=f"no time left of the {TOTAL_S} s"))
        with open(log, "w") as f:
            f.write(f"$ {record['command']}\n")
            f.flush()
            start = time.monotonic()
            rc = subprocess.run(["timeout", "-s", "INT", "-k", str(KILL_AFTER), str(timeout), *cmd], cwd=REPO,
                                env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT).returncode
        # timeout exits 124 after its SIGINT, 137 (or -9, itself killed) after its SIGKILL
        status = "ok" if rc == expect else "cut" if rc in (124, 137, -9) else "failed"
        return self.finish(name, dict(record, rc=rc, expected_rc=expect, seconds=round(time.monotonic() - start, 1),
                                      status=status, why=f"rc {rc}, of {timeout} s", result=result and result()))

    def skip(self, name, why):
        self.planned += self.budgets[name]  # its time goes to the next steps
        return self.finish(name, dict(status="skipped", why=why))

    def finish(self, name, record):
        self.records[name] = record
        print(f"[{time.monotonic() - self.t0:4.0f} s] {name}: {record['status']} ({record.get('seconds', '-')} s; "
              f"{record['why']})", flush=True)
        return self.settle()

    def result(self, name):
        return self.records.get(name, {}).get("result")

    def settle(self):
        """The summary, with the steps, what is not ok and what is missing, and whether all is well."""
        summary, wanted = self.summarize()
        done = all(name in self.records for name in self.budgets)
        summary.update(wall_s=round(time.monotonic() - self.t0, 1), steps=self.records,
                       not_ok_steps={n: r["status"] for n, r in self.records.items()
                                     if r["status"] in ("failed", "cut", "no time")},
                       missing=[name for name, value in wanted if value in (None, {}, [])] if done else [])
        summary["ok"] = done and not summary["missing"] and "failed" not in summary["not_ok_steps"].values()
        write_json(self.args.out / "summary.json", summary)
        return summary


def parse(prog, argv, add):
    p = argparse.ArgumentParser(prog=prog, description=f"{prog}: see docs/gpu.md")
    p.add_argument("out", type=Path, help="folder for logs, JSON and outputs (created)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--wheels", type=Path, help=f"folder of wheels to install mamba-ssm from, offline (else {WHEEL} "
                                               "from PyPI)")
    p.add_argument("--data-dir", type=Path, help="torchvision root with MNIST/raw/ (default ./data; dry run: "
                                                 "random digits in OUT)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/vision-mamba2-gpu"),
                   help="Triton's kernels and autotuning, torch.compile's cache and mamba-ssm, shared by every step")
    add(p)
    args = p.parse_args(argv)
    for key in ("out", "wheels", "data_dir", "cache_dir"):  # absolute: the steps run from the repository
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = prepare_data(args)
    return p, args


def fail(message):
    """What these steps cannot use (input, machine): one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_data(args):
    """The MNIST root the steps read: --data-dir or ./data (checked), or for a dry run random digits in OUT."""
    if args.dry_run and args.data_dir is None:
        import numpy as np
        raw, rng = args.out / "data" / "MNIST" / "raw", np.random.default_rng(0)
        raw.mkdir(parents=True, exist_ok=True)
        for split, n in [("train", 160), ("t10k", 64)]:
            for kind, magic, array in [("images-idx3", 2051, rng.integers(0, 256, (n, 28, 28))),
                                       ("labels-idx1", 2049, rng.integers(0, 10, n))]:  # the IDX format
                header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
                (raw / f"{split}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
        return args.out / "data"
    raw = (args.data_dir or REPO / "data") / "MNIST" / "raw"
    missing = [f for f in MNIST if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing:
        fail(f"MNIST is not in {raw}{os.sep} (no {', '.join(missing)}, .gz or not): pass --data-dir")
    return raw.parents[1]


def child_env(args):
    """The steps' environment: Triton compiled (not interpreted), one cache for its kernels and autotuning and for
    torch.compile, mamba-ssm's install on the path, unbuffered logs; a dry run as the test suite (one thread, and an
    unreachable proxy: no download)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not (args.dry_run and
                                                                                 k.lower() == "no_proxy")}
    if args.dry_run:
        env.update(OMP_NUM_THREADS="1", **dict.fromkeys(["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"],
                                                        "http://127.0.0.1:9"))
    return {**env, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "TRITON_CACHE_AUTOTUNING": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(args.cache_dir / "site"), env.get("PYTHONPATH")])),
            "TRITON_CACHE_DIR": str(args.cache_dir / "triton"),
            "TORCHINDUCTOR_CACHE_DIR": str(args.cache_dir / "inductor")}


def prepare(steps, args):
    """mamba-ssm (from --wheels into <cache-dir>/site, else PyPI; skipped when it imports), then OUT/env.json."""
    check = [PY, "-c", "import sys, vision_mamba2; sys.exit(vision_mamba2.load_official_kernels() is None)"]
    if subprocess.run(check, cwd=REPO, env=steps.env, capture_output=True, timeout=120).returncode == 0:
        steps.skip("install", "mamba-ssm already imports")
    elif args.wheels:
        steps.run("install", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target",
                              args.cache_dir / "site", *sorted(args.wheels.glob("*.whl"))])
    else:  # no CUDA build (Mamba-2 is Triton), no download of a prebuilt wheel; torch is already here
        steps.run("install", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", WHEEL],
                  env={"MAMBA_FORCE_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE"})
    steps.run("env", [PY, __file__, "env", args.out / "env.json"])
    if not args.dry_run and not read_json(args.out / "env.json").get("gpu"):
        fail(f"no CUDA GPU here (see {args.out / 'env.log'}): on a CPU, run with --dry-run")


def describe_environment(path):
    """OUT/env.json: the GPU, the versions, and which Mamba-2 backend `auto` picks and why (subcommand `env`)."""
    import importlib.metadata as metadata
    import platform

    import torch
    from vision_mamba2 import describe_backend

    cuda = torch.cuda.is_available()
    info = dict(gpu=torch.cuda.get_device_name(0) if cuda else None, torch=torch.__version__,
                torch_cuda=torch.version.cuda, python=platform.python_version(), cpus=os.cpu_count(),
                **{p: next((d.version for d in metadata.distributions(name=p)), None) for p in ("triton", "mamba_ssm")},
                backend_auto=describe_backend("auto", "cuda" if cuda else "cpu"),
                **{k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_CACHE_AUTOTUNING", "PYTHONPATH")})
    write_json(path, info)
    print(json.dumps(info, indent=2))


def train_result(out):
    """What train.py --out `out` left: NAME.json once it finished, else (cut) its last checkpoint's history."""
    done, last = read_json(out.with_suffix(".json")), out.with_name(f"{out.stem}_last.pth")
    if not done and last.exists():
        import torch
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        done = dict(epochs_done=ckpt["epoch"], best_epoch=ckpt["best_epoch"], best_val_acc=ckpt["best_val_acc"],
                    images_per_sec=ckpt["history"]["images_per_sec"], args=ckpt["args"], cut=True)
    if not done:
        return None
    speeds = done["images_per_sec"]
    keep = ("test_acc", "best_val_acc", "best_epoch", "epochs_done", "train_wall_s", "backend", "amp", "cut")
    return dict({k: done[k] for k in keep if k in done}, batch_size=done["args"]["batch_size"],
                images_per_sec=[round(s) for s in speeds],
                # epoch 1 holds the compiling (Triton, torch.compile) and the graph capture
                steady_img_per_s=round(statistics.median(speeds[1:] or speeds)) if speeds else None)


def bench_result(path):
    """The default model's rows of a bench.py models --json file (written row by row: a cut run keeps its rows)."""
    rows = read_json(path).get("sections", {}).get("models")
    return [{k: row[k] for k in ("backend", "mode", "batch", "train_img_s", "infer_img_s", "peak_mib", "failed")}
            for row in (rows if isinstance(rows, list) else []) if row["model"] == "Vision Mamba 2"]


def pytest_result(path):
    """From pytest's --junitxml file: the tests that passed, those that failed, and those skipped with why."""
    if not path.exists():
        return None
    cases = {case.get("name"): case for case in ET.parse(path).getroot().iter("testcase")}
    failed = [n for n, case in cases.items() if case.find("failure") is not None or case.find("error") is not None]
    skipped = {n: case.find("skipped").get("message") for n, case in cases.items() if case.find("skipped") is not None}
    return dict(passed=[n for n in cases if n not in failed and n not in skipped], failed=failed, skipped=skipped)


def checks_summary(steps, args):
    default = steps.result("train-default") or {}
    speeds = [(res["steady_img_per_s"], res["batch_size"], name) for name in CHECKS if name.startswith("train-")
              for res in [steps.result(name)] if res and res["steady_img_per_s"]]
    rows = [row for name in ("bench-b128", "bench-b1024") for row in steps.result(name) or [] if row["train_img_s"]]
    speeds += [(round(row["train_img_s"]), row["batch"], f"bench.py, {row['backend']}, {row['mode']}") for row in rows]
    by = {(row["backend"], row["mode"], row["batch"]): row["train_img_s"] for row in rows}
    ratios = {f"batch {batch}, {mode}": round(by[b, mode, batch] / by["portable", mode, batch], 2)
              for b, mode, batch in by if b == "official" and ("portable", mode, batch) in by}
    best = max(speeds, default=(None, None, None))
    # end to end: the process's wall time, from its start to the test accuracy
    wall = steps.records.get("train-default", {}).get("seconds") if "test_acc" in default else None
    env = read_json(args.out / "env.json")
    summary = dict(gpu=env.get("gpu"), backend_auto=env.get("backend_auto"), dry_run=args.dry_run,
                   train_wall_s=wall, test_acc=default.get("test_acc"), default_run=default,
                   train_img_per_s=best[0], train_img_per_s_batch_size=best[1], train_img_per_s_source=best[2],
                   official_over_portable=ratios, tests=steps.result("test-cuda"), triton_cache_was_empty=args.cold)
    summary["goals"] = {"python train.py end to end (s)": goal(wall, "<= 60", lambda v: v <= 60),
                        "its test accuracy": goal(summary["test_acc"], ">= 0.995", lambda v: v >= 0.995),
                        "official / portable training img/s, batch 128, eager": goal(
                            ratios.get("batch 128, eager"), ">= 2", lambda v: v >= 2),
                        "training img/s, best setting": goal(best[0], ">= 50000", lambda v: v >= 50000)}
    wanted = ["backend_auto", "train_wall_s", "test_acc", "train_img_per_s",
              *(["tests"] if "test-cuda" in steps.budgets else []),
              *([] if args.dry_run else ["gpu", "official_over_portable"])]
    return summary, [(k, summary[k]) for k in wanted]


def goal(value, target, met):
    return dict(value=value, goal=target, met=None if value is None else met(value))


def checks(argv):
    p, args = parse(".ci/gpu", argv, lambda p: p.add_argument(
        "--steps", default=",".join(CHECKS), help=f"comma-separated, run in this order: {','.join(CHECKS)}"))
    asked, dry = args.steps.split(","), args.dry_run
    if set(asked) - set(CHECKS):
        p.error(f"unknown step {sorted(set(asked) - set(CHECKS))[0]!r}: choose from {', '.join(CHECKS)}")
    args.cold = not any((args.cache_dir / "triton").glob("*"))
    budgets = {n: b for n, b in CHECKS.items() if n in asked or n in ("install", "env")}
    steps = Steps(args, budgets, lambda: checks_summary(steps, args))

    def train(name, flags, **kw):
        out = args.out / name / "vision_mamba2_mnist.pth"
        out.with_suffix(".json").unlink(missing_ok=True)  # never read an earlier call's numbers
        steps.run(name, [PY, "train.py", *flags, "--data-dir", args.data, "--out", out, "--log-dir",
                         args.out / name / "runs"], result=lambda: train_result(out), **kw)

    prepare(steps, args)
    for name in budgets:
        if name == "train-default":
            train(name, TINY + ["--epochs", "2"] if dry else [])
        elif name == "test-cuda":
            xml = args.out / "test-cuda.xml"
            steps.run(name, [PY, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs", f"--junitxml={xml}"],
                      result=lambda: pytest_result(xml))
        elif name.startswith("bench-"):  # a dry run: no CUDA graphs
            path, batch = args.out / f"{name}.json", int(name.removeprefix("bench-b"))
            size = ["--device", "cpu", "--batch-size", batch // 64, "--repeats", 1, "--seq-batch-size", 1] if dry else \
                ["--batch-size", batch, "--cuda-graphs"]
            steps.run(name, [PY, "bench.py", "models", *size, "--json", path],
                      result=lambda: bench_result(path))
        elif name == "train-cuda-graphs":  # a dry run: train.py must refuse it on a CPU (exit status 2)
            train(name, ["--cuda-graphs", *(TINY if dry else SHORT)], expect=2 if dry else 0)
        elif name == "train-portable-compile" and dry:
            steps.skip(name, "dry run: torch.compile takes minutes on a CPU")
        elif name == "train-portable-compile":
            train(name, ["--backend", "portable", "--compile", *SHORT])
    return report(steps.settle())


def sequential_summary(steps, args):
    env = read_json(args.out / "env.json")
    summary = dict(gpu=env.get("gpu"), backend_auto=env.get("backend_auto"), dry_run=args.dry_run,
                   epochs=args.epochs, recipe=shlex.join(args.recipe))
    for task in args.tasks:
        evaluated = read_json(args.out / task / "metrics.json") \
            if steps.records.get(f"eval-{task}", {}).get("status") == "ok" else {}  # never an earlier call's
        summary[task] = dict(steps.result(f"train-{task}") or {}, resumed=args.resumed[task],
                             test_model_acc=evaluated.get("accuracy"), reading=evaluated.get("reading"))
    wanted = [(k, summary[k]) for k in ["backend_auto", *([] if args.dry_run else ["gpu"])]]
    return summary, wanted + [(f"{t}: {k}", summary[t].get(k)) for t in args.tasks for k in ("test_acc",
                                                                                           "test_model_acc")]


def sequential(argv):
    def add(p):
        p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: 10; dry run: 1)")
        p.add_argument("--tasks", default="smnist,psmnist", help="comma-separated, in this order")

    p, args = parse(".ci/gpu-sequential", argv, add)
    args.tasks = args.tasks.split(",")
    if set(args.tasks) - {"smnist", "psmnist"}:
        p.error("--tasks: choose from smnist, psmnist")
    args.epochs = args.epochs or (1 if args.dry_run else 10)
    # a dry run cannot wait for torch.compile on a CPU: the same runs without it, tiny
    args.recipe = ["--backend", "portable", *(TINY + ["--d-state", "16", "--headdim", "8"] if args.dry_run
                                              else ["--compile"])]
    again = ["--device", "cpu"] if args.dry_run else ["--compile"]  # runtime flags a resumed run needs again
    outs = {task: args.out / task / f"vision_mamba2_{task}.pth" for task in args.tasks}
    lasts = {task: out.with_name(f"{out.stem}_last.pth") for task, out in outs.items()}
    args.resumed = {task: last.exists() for task, last in lasts.items()}  # cut in an earlier call: goes on from there
    budgets = {n: b for n, b in SEQUENTIAL.items() if n in ("install", "env") or n.split("-")[1] in args.tasks}
    steps = Steps(args, budgets, lambda: sequential_summary(steps, args))
    prepare(steps, args)
    for task in args.tasks:
        folder, out, last = args.out / task, outs[task], lasts[task]
        folder.mkdir(exist_ok=True)
        out.with_suffix(".json").unlink(missing_ok=True)
        flags = ["--resume", last, *again] if last.exists() else ["--task", task, *args.recipe]
        steps.run(f"train-{task}", [PY, "train.py", *flags, "--epochs", args.epochs, "--data-dir", args.data, "--out",
                                    out, "--log-dir", folder / "runs"], log=folder / "train.log",
                  result=lambda out=out: train_result(out))
        if not out.exists():
            steps.skip(f"eval-{task}", "training wrote no checkpoint to evaluate")
            continue
        # on the GPU the whole test set in one batch of the recurrent reading pass (16 x --batch-size): its 784
        # steps cost their kernel launches, not their images
        size = ["--device", "cpu"] if args.dry_run else ["--batch-size", "640"]
        steps.run(f"eval-{task}", [PY, "test_model.py", "--checkpoint", out, "--data-dir", args.data, "--out-dir",
                                   folder, *size], log=folder / "eval.log")
    return report(steps.settle())


def report(summary):
    print(f"summary.json: {'ok' if summary['ok'] else 'NOT ok'}; steps not ok: {summary['not_ok_steps'] or 'none'}; "
          f"missing: {summary['missing'] or 'none'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "env":
        describe_environment(argv[0])
    else:
        sys.exit({"checks": checks, "sequential": sequential}[command](argv))

"""What only a CUDA GPU measures, in one command of at most TOTAL_S seconds: `gpu` (.ci/gpu) and `gpu-sequential`
(.ci/gpu-sequential). Steps, budgets, OUT/summary.json and the design: docs/gpu.md."""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TOTAL_S = 570  # the whole command, steps and all: under ten minutes
KILL_AFTER = 10  # seconds between a step's SIGINT (train.py saves where it stands) and its SIGKILL
DRY_BUDGET = 240  # a dry run's per step, with no limit in all: it only catches a hang, however busy the CPU
MNIST = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
BUDGETS = {"gpu": {"install": 30, "env": 30, "train-default": 270, "test-cuda": 110, "bench-b128": 40,  # seconds
                   "bench-b1024": 40, "train-cuda-graphs": 35, "train-portable-compile": 15},
           "gpu-sequential": {"install": 30, "env": 30, "train-smnist": 265, "eval-smnist": 40, "train-psmnist": 165,
                              "eval-psmnist": 40}}
# the default model at a dry run's size: what a dry run checks is the command lines and the files, not the model
TINY = ["--device", "cpu", "--max-train-samples", "64", "--batch-size", "32", "--d-model", "16", "--num-blocks", "1"]
# the variants: 2 epochs (the first compiles or captures), no smaller last batch (156 x 128, 20 x 256)
SHORT = ["--epochs", "2", "--max-train-samples", "19968"]


def write_json(path, obj):
    # not checkpoint.atomic_write: this process never imports torch, and each file here has one writer
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=2))
    os.replace(f"{path}.tmp", path)  # a reader never sees half a file


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


class Steps:
    """Runs the steps one by one, each until its deadline (docs/gpu.md), and rewrites OUT/summary.json after each."""

    def __init__(self, flow, args):
        # Triton compiled (not interpreted), the cache's mamba-ssm (--wheels) first on the path, unbuffered logs;
        # a dry run's as the test suite's: one thread, and an unreachable proxy (no download)
        cache, proxy = args.cache_dir, "http://127.0.0.1:9"
        env = {k: v for k, v in os.environ.items()
               if k != "TRITON_INTERPRET" and not (args.dry_run and k.lower() == "no_proxy")}
        if args.dry_run:
            env.update(OMP_NUM_THREADS="1", http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
        self.env = {**env, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "TRITON_CACHE_AUTOTUNING": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(cache / "site"), env.get("PYTHONPATH")])),
                    "TRITON_CACHE_DIR": str(cache / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
        self.flow, self.args, self.t0, self.planned, self.records = flow, args, time.monotonic(), 0, {}

    def run(self, name, cmd=None, *, skip=None, output=None, read=read_json):
        """cmd, then read(output), cut or not; or skipped, `skip` says why."""
        self.planned += BUDGETS[self.flow][name]
        timeout = DRY_BUDGET if self.args.dry_run else \
            int(min(self.planned, TOTAL_S - KILL_AFTER) - (time.monotonic() - self.t0))
        if skip or timeout < 5:
            record = dict(status="skipped" if skip else "no time", why=skip or f"no time left of the {TOTAL_S} s")
        else:
            cmd, log = [str(c) for c in cmd], self.args.out / f"{name}.log"
            if output:
                output.unlink(missing_ok=True)  # never an earlier call's numbers
            with open(log, "w") as f:
                print(f"$ {shlex.join(cmd)}", file=f, flush=True)
                start = time.monotonic()
                rc = subprocess.run(["timeout", "-s", "INT", "-k", str(KILL_AFTER), str(timeout), *cmd], cwd=REPO,
                                    env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
            # timeout exits 124 after its SIGINT, 137 (or -9, itself killed) after its SIGKILL
            status = "ok" if rc == 0 else "cut" if rc in (124, 137, -9) else "failed"
            record = dict(command=shlex.join(cmd), log=log.name, status=status, why=f"rc {rc}, of {timeout} s",
                          seconds=round(time.monotonic() - start, 1), result=output and read(output))
        self.records[name] = dict(record, budget_s=BUDGETS[self.flow][name])
        print(f"[{time.monotonic() - self.t0:4.0f} s] {name}: {record['status']} ({record.get('seconds', '-')} s; "
              f"{record['why']})", flush=True)
        self.settle(done=False)

    def result(self, name):
        return self.records.get(name, {}).get("result")

    def settle(self, *, done=True):
        summary, wanted = summarize(self)
        not_ok = {n: r["status"] for n, r in self.records.items() if r["status"] in ("failed", "cut", "no time")}
        missing = [name for name, value in wanted if value in (None, {}, [])] if done else []
        summary.update(wall_s=round(time.monotonic() - self.t0, 1), steps=self.records, not_ok_steps=not_ok,
                       missing=missing, ok=done and not missing and "failed" not in not_ok.values())
        write_json(self.args.out / "summary.json", summary)
        return summary


def parse(flow, argv):
    path = lambda text: Path(text).resolve()  # noqa: E731 (absolute: the steps run from the repository)
    p = argparse.ArgumentParser(prog=f".ci/{flow}", description="see docs/gpu.md")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")  # one line, not the usage too
    p.add_argument("out", type=path, help="folder for logs, JSON and outputs (created)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument("--wheels", type=path, help="folder of wheels to install mamba-ssm from (else: as installed)")
    p.add_argument("--data-dir", type=path, help="torchvision root with MNIST/raw/ (default ./data)")
    p.add_argument("--cache-dir", type=path, default=Path("/tmp/vision-mamba2-gpu"),
                   help="Triton's kernels and autotuning, torch.compile's cache and mamba-ssm, shared by every step")
    choices = list(BUDGETS[flow])[2:] if flow == "gpu" else ["smnist", "psmnist"]
    p.add_argument("--steps" if flow == "gpu" else "--tasks", type=lambda text: text.split(","), default=choices,
                   help=f"some of {','.join(choices)}, comma-separated, in this order")
    if flow == "gpu-sequential":
        p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: 10; dry run: 1)")
    args = p.parse_args(argv)
    if unknown := set(args.steps if flow == "gpu" else args.tasks) - set(choices):
        p.error(f"unknown {sorted(unknown)[0]!r}: choose from {','.join(choices)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.cold = not any((args.cache_dir / "triton").glob("*"))
    fake = args.dry_run and args.data_dir is None  # random digits in OUT
    args.data = args.out / "data" if fake else args.data_dir or REPO / "data"  # the MNIST root the steps read
    raw = args.data / "MNIST" / "raw"
    if fake:
        import numpy as np
        raw.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for name in MNIST:  # IDX: big-endian 0x08 (unsigned bytes) + the number of dimensions, each size, the bytes
            n = 160 if name.startswith("train") else 64
            array = rng.integers(0, 256, (n, 28, 28)) if "images" in name else rng.integers(0, 10, n)
            header = np.array([0x800 + array.ndim, *array.shape], dtype=">u4").tobytes()
            (raw / name).write_bytes(header + array.astype(np.uint8).tobytes())
    if missing := [f for f in MNIST if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]:
        p.error(f"MNIST is not in {raw}{os.sep} (no {', '.join(missing)}, .gz or not): pass --data-dir")
    return p, args


def describe_environment(path):
    """OUT/env.json: the GPU, the versions, and which Mamba-2 backend `auto` picks and why (subcommand `env`)."""
    import importlib.metadata as metadata
    import platform

    import torch
    sys.path.insert(0, str(REPO))
    from vision_mamba2 import describe_backend

    cuda = torch.cuda.is_available()
    write_json(path, dict(gpu=torch.cuda.get_device_name(0) if cuda else None, torch=torch.__version__,
                          torch_cuda=torch.version.cuda, python=platform.python_version(), cpus=os.cpu_count(),
                          **{p: next((d.version for d in metadata.distributions(name=p)), None)
                             for p in ("triton", "mamba_ssm")},
                          backend_auto=describe_backend("auto", "cuda" if cuda else "cpu")))


def train_result(path):
    """What train.py wrote to NAME.json: after every epoch, and with test_acc (else null) once it finished."""
    done = read_json(path)
    if not done:
        return None
    speeds = done["images_per_sec"]
    keep = ("test_acc", "best_val_acc", "best_epoch", "epochs_done", "train_wall_s", "backend", "amp")
    return dict({k: done[k] for k in keep if k in done}, batch_size=done["args"]["batch_size"],
                images_per_sec=[round(s) for s in speeds],
                # epoch 1 holds the compiling (Triton, torch.compile) and the graph capture
                steady_img_per_s=round(statistics.median(speeds[1:] or speeds)) if speeds else None)


def bench_result(path):
    rows = read_json(path).get("sections", {}).get("models")
    return [row for row in (rows if isinstance(rows, list) else []) if row["model"] == "Vision Mamba 2"]


def pytest_result(path):
    if not path.exists():
        return None
    cases = {case.get("name"): case for case in ET.parse(path).getroot().iter("testcase")}
    failed = [n for n, case in cases.items() if case.find("failure") is not None or case.find("error") is not None]
    skipped = {n: case.find("skipped").get("message") for n, case in cases.items() if case.find("skipped") is not None}
    return dict(passed=[n for n in cases if n not in failed and n not in skipped], failed=failed, skipped=skipped)


def train_step(out, flags, args):
    return dict(cmd=[PY, "train.py", *flags, "--data-dir", args.data, "--out", out], output=out.with_suffix(".json"),
                read=train_result)


def gpu_plan(args):
    """.ci/gpu's steps after install and env, as Steps.run's keywords; a dry run without CUDA graphs or compiling."""
    dry, out, xml = args.dry_run, args.out, args.out / "test-cuda.xml"
    train = lambda name, flags: train_step(out / name / "vision_mamba2_mnist.pth", flags, args)  # noqa: E731
    bench = lambda b: ["--device", "cpu", "--batch-size", b // 64, "--repeats", 1, "--seq-batch-size", 1] if dry \
        else ["--batch-size", b, "--cuda-graphs"]  # noqa: E731
    plan = {"train-default": train("train-default", TINY + ["--epochs", "2"] if dry else []),
            "test-cuda": dict(cmd=[PY, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs", f"--junitxml={xml}"],
                              output=xml, read=pytest_result),
            **{f"bench-b{b}": dict(cmd=[PY, "bench.py", "models", *bench(b), "--json", out / f"bench-b{b}.json"],
                                   output=out / f"bench-b{b}.json", read=bench_result) for b in (128, 1024)},
            "train-cuda-graphs": train("train-cuda-graphs", TINY if dry else ["--cuda-graphs", *SHORT]),
            "train-portable-compile": dict(skip="dry run: torch.compile takes minutes on a CPU") if dry else
            train("train-portable-compile", ["--backend", "portable", "--compile", *SHORT])}
    return {name: plan[name] for name in args.steps}


def sequential_plan(args):
    """.ci/gpu-sequential's steps after install and env: each task trained (or resumed), then evaluated."""
    epochs = ["--epochs", args.epochs or (1 if args.dry_run else 10)]
    # a dry run cannot wait for torch.compile on a CPU: the same runs without it, tiny
    recipe = ["--backend", "portable", *(TINY + ["--d-state", "16", "--headdim", "8"] if args.dry_run else
                                         ["--compile"])]
    again = ["--device", "cpu"] if args.dry_run else ["--compile"]  # runtime flags a resumed run needs again
    size = ["--device", "cpu"] if args.dry_run else ["--batch-size", "640"]  # fewer passes, each launch-bound
    plan = {}
    for task in args.tasks:
        out = args.out / task / f"vision_mamba2_{task}.pth"
        last = out.with_name(f"{out.stem}_last.pth")
        flags = ["--resume", last, *again] if last.exists() else ["--task", task, *recipe]
        plan[f"train-{task}"] = train_step(out, [*flags, *epochs], args)
        plan[f"eval-{task}"] = dict(cmd=[PY, "test_model.py", "--checkpoint", out, "--data-dir", args.data,
                                         "--out-dir", out.parent, *size], output=out.parent / "metrics.json")
    return plan


def summarize(steps):
    """summary.json's measurements, and what must be measured: (name, value) pairs."""
    args, records, result, env = steps.args, steps.records, steps.result, steps.result("env") or {}
    summary = dict(gpu=env.get("gpu"), backend_auto=env.get("backend_auto"), dry_run=args.dry_run,
                   triton_cache_was_empty=args.cold)
    wanted = [(k, summary[k]) for k in ["backend_auto", *([] if args.dry_run else ["gpu"])]]
    if steps.flow == "gpu-sequential":
        for task in args.tasks:
            evaluated = result(f"eval-{task}") or {}
            summary[task] = dict(result(f"train-{task}") or {}, test_model_acc=evaluated.get("accuracy"),
                                 resumed="--resume" in records.get(f"train-{task}", {}).get("command", ""),
                                 reading=evaluated.get("reading"))
            wanted += [(f"{task}: {k}", summary[task].get(k)) for k in ("test_acc", "test_model_acc")]
        return summary, wanted
    default = result("train-default") or {}
    speeds = [(res["steady_img_per_s"], f"{name}, batch {res['batch_size']}") for name in records
              if name.startswith("train-") for res in [result(name)] if res and res["steady_img_per_s"]]
    rows = [row for name in ("bench-b128", "bench-b1024") for row in result(name) or [] if row["train_img_s"]]
    speeds += [(round(r["train_img_s"]), f"bench.py, {r['backend']}, {r['mode']}, batch {r['batch']}") for r in rows]
    by = {(row["backend"], row["mode"], row["batch"]): row["train_img_s"] for row in rows}
    ratios = {f"batch {batch}, {mode}": round(by[b, mode, batch] / by["portable", mode, batch], 2)
              for b, mode, batch in by if b == "official" and ("portable", mode, batch) in by}
    best = max(speeds, default=(None, None))
    # end to end: the process's wall time, from its start to the test accuracy
    wall = records.get("train-default", {}).get("seconds") if default.get("test_acc") is not None else None
    summary.update(train_wall_s=wall, test_acc=default.get("test_acc"), default_run=default, train_img_per_s=best[0],
                   train_img_per_s_source=best[1], official_over_portable=ratios, tests=result("test-cuda"))
    goals = [("python train.py end to end (s)", wall, "<=", 60), ("its test accuracy", summary["test_acc"], ">=", .995),
             ("official / portable training img/s, batch 128, eager", ratios.get("batch 128, eager"), ">=", 2),
             ("training img/s, best setting", best[0], ">=", 50000)]
    summary["goals"] = {what: dict(value=v, goal=f"{op} {target}", met=None if v is None else
                                   v <= target if op == "<=" else v >= target) for what, v, op, target in goals}
    wanted += [(k, summary[k]) for k in ["train_wall_s", "test_acc", "train_img_per_s",
                                         *(["tests"] if "test-cuda" in args.steps else []),
                                         *([] if args.dry_run else ["official_over_portable"])]]
    return summary, wanted


def main(flow, argv):
    p, args = parse(flow, argv)
    steps, plan = Steps(flow, args), gpu_plan(args) if flow == "gpu" else sequential_plan(args)
    if args.wheels:  # into the cache, first on the steps' path
        steps.run("install", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target",
                              args.cache_dir / "site", *args.wheels.glob("*.whl")])
    else:
        steps.run("install", skip="no --wheels: mamba-ssm as installed")
    steps.run("env", [PY, __file__, "env", args.out / "env.json"], output=args.out / "env.json")
    if not args.dry_run and not (steps.result("env") or {}).get("gpu"):
        p.error(f"no CUDA GPU here (see {args.out / 'env.log'}): on a CPU, run with --dry-run")
    for name, step in plan.items():
        steps.run(name, **step)
    summary = steps.settle()
    print(f"summary.json: {'ok' if summary['ok'] else 'NOT ok'}; steps not ok: {summary['not_ok_steps'] or 'none'}; "
          f"missing: {summary['missing'] or 'none'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    if sys.argv[1] == "env":
        describe_environment(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1], sys.argv[2:]))

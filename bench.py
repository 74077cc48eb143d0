"""
Benchmarks, each printing a markdown table: speed and memory claims live here, never in timed tests.

    python bench.py --quick                          # every section at small sizes: minutes on 2 CPU cores
    python bench.py models profile --json b.json     # some sections (none named: all, at full size); rows in JSON
    python bench.py models --variant="--stem-width 24"   # and a model built from train.py's model flags

    models   training and inference img/s and activation memory of every model (Vision Mamba 2 at 7x7 and 14x14
             tokens, the sequential model, the CNN and ViT); --cuda-graphs: their steps replayed from CUDA graphs too
    scaling  a 4-block stack, Mamba-2 against attention, from 49 to 3,136 tokens: time and memory per token
    ssd      our SSD against mamba_ssm's ssd_minimal_discrete, forward and backward (needs mamba-ssm; CPU)
    profile  one CPU training step of each model: its aten ops (kernel launches on a GPU) and where its time goes

All in one process, so ratios compare like with like: medians after a warm-up, the GPU waited for; every training
step is train.py's (steps.training_step).
"""

import argparse
import collections
import dataclasses
import functools
import gc
import itertools
import json
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import steps
from baselines import CNN, CNNConfig, ViT, ViTConfig
from mamba2_torch import mamba_chunk_scan_combined
from vision_mamba2 import (ResidualMamba2Block, SequentialMamba2, SequentialMamba2Config, VisionMamba2,
                           VisionMamba2Config, count_params, load_official_kernels)

NEEDS_MAMBA_SSM = "compares against mamba-ssm's reference functions: install mamba-ssm (README)"


def median_time(fn, repeats, device=torch.device("cpu")):
    """Median seconds of fn() over `repeats` calls after an untimed one, each waited for to its last kernel (as
    torch.utils.benchmark times them: a GPU's queue is drained before and after)."""
    sync = {"cuda": lambda: torch.cuda.synchronize(device), "mps": torch.mps.synchronize}.get(device.type, lambda: 0)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trainer(model, *, amp, device, cache=True):
    """step(x, y): one training step of `model` as train.py takes it (steps.training_step, bf16 autocast when amp),
    with a fresh AdamW. cache=False: autocast's weight cache off, as CUDA graphs need."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type != "mps")
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=cache)

    def step(x, y):
        model.train()
        steps.training_step(model, x, y, optimizer=optimizer, criterion=F.cross_entropy, scaler=scaler,
                            autocast=autocast, grad_clip=0.0)
    return step


def attempt(measure, keys, *, may_fail=None):
    """failed=None and measure()'s numbers; or failed=why and `keys` as None when the GPU ran out of memory or, where
    `may_fail` names what may go wrong (capturing CUDA graphs), that failed: the row says why and the run goes on."""
    try:
        return dict(failed=None, **measure())
    except Exception as e:
        if not (may_fail or isinstance(e, torch.OutOfMemoryError)):
            raise
        why = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{may_fail} failed ({type(e).__name__})"
        print(f"{why}: {cli.shorten(e)}", file=sys.stderr)
    torch.cuda.empty_cache()  # only now: the except block's traceback held the failed step's tensors (no-op: no CUDA)
    return dict(failed=why, **dict.fromkeys(keys))


def cell(value, fmt, why=None):
    return why or ("-" if value is None else format(value, fmt))


def print_table(title, header, rows):
    """The title, then a markdown table: its header "a | b | ...", and `rows`, each a list of cells."""
    print(f"\n{title}\n\n| {header} |\n|{'---|' * len(header.split(' | '))}")
    for cells in rows:
        print(f"| {' | '.join(map(str, cells))} |")


def saved_activation_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass while fn() runs its forward: the activation memory
    of training, measurable on any device (CPU has no peak-memory counter)."""
    seen = set()

    def pack(t):
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))  # views of one storage count once
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(nbytes for _, nbytes in seen)


def mnist_batch(n, device="cpu"):
    """n random images and labels of MNIST's shape, the same for every model."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def backends(device):
    """The Mamba-2 backends to time on `device`: the official kernels too where they run (CUDA with mamba-ssm)."""
    return ["portable"] + (["official"] if device.type == "cuda" and load_official_kernels() is not None else [])


def model_variant(flags):
    """--variant: train.py's model flags in one string -> (the string, the VisionMamba2Config they give)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    cli.add_config_flags(parser, VisionMamba2Config)
    try:
        given, unknown = parser.parse_known_args(shlex.split(flags))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a model flag of train.py")
        config = VisionMamba2Config(**vars(given))
        config.validate()
        return flags, config
    except (argparse.ArgumentError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{flags!r}: {e}") from None


def model_specs(args, device):
    """(name, backend, build, batch) of every model the models and profile sections measure, the default first."""
    def vm2(config):
        return lambda backend: VisionMamba2(dataclasses.replace(config, backend=backend))
    mamba = [("Vision Mamba 2", vm2(VisionMamba2Config()), args.batch_size),  # 7x7 tokens
             ("Vision Mamba 2 (--patch-size 2)", vm2(VisionMamba2Config(patch_size=2)), args.batch_size),  # 14x14
             *((f"Vision Mamba 2 {flags}", vm2(config), args.batch_size) for flags, config in args.variant),
             ("sequential Mamba 2 (784 steps)", lambda backend: SequentialMamba2(SequentialMamba2Config(
                 backend=backend)), args.seq_batch_size)]
    return [(name, b, functools.partial(build, b), batch) for name, build, batch in mamba for b in backends(device)] \
        + [("CNN (baselines.py)", "-", lambda: CNN(CNNConfig()), args.batch_size),
           ("ViT (baselines.py)", "-", lambda: ViT(ViTConfig()), args.batch_size)]


def measure_model(name, backend, build, batch, *, mode, amp, repeats, device):
    """One row of the models section: training and inference img/s of a fresh model, its parameters, what autograd
    keeps of an eager training step (activation MiB) and, on CUDA, its peak memory."""
    x, y = mnist_batch(2 * batch, device)  # inference takes twice the batch, as train.py's evaluation
    cuda, graphs = device.type == "cuda", mode == "CUDA graphs"
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=amp)
    torch.manual_seed(0)
    model = build().to(device)
    if cuda:
        gc.collect()  # a graphed model of an earlier row is a reference cycle: its memory goes only now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0

    def infer():
        model.eval()
        with torch.no_grad(), autocast():
            return model(x)

    def run():
        with autocast(cache_enabled=False):  # graphs: captured for the training batch's shape; inference stays eager
            trained = steps.GraphedTraining(model, x[:batch]) if graphs else model
        step = trainer(trained, amp=amp, device=device, cache=not graphs)
        t_train = median_time(lambda: step(x[:batch], y[:batch]), repeats, device=device)
        t_infer = median_time(infer, repeats, device=device)
        model.train()
        with autocast():  # what autograd keeps of an eager step (captured graphs keep their own)
            saved = None if graphs else saved_activation_bytes(lambda: F.cross_entropy(model(x[:batch]), y[:batch]))
        return dict(train_img_s=batch / t_train, infer_img_s=2 * batch / t_infer,
                    activation_mib=None if graphs else saved / 2**20,
                    peak_mib=(torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None)

    numbers = ["train_img_s", "infer_img_s", "activation_mib", "peak_mib"]
    return dict(model=name, backend=backend, mode=mode, device=str(device), dtype="bf16 autocast" if amp else "fp32",
                batch=batch, params=count_params(model), **attempt(run, numbers, may_fail=mode if graphs else None))


def bench_models(args):
    """Whole models, training (forward + backward + AdamW step) and inference: images/s and memory, each on a batch
    already on the device, as train.py's loop does. --cuda-graphs: each model once more that way."""
    device = cli.resolve_device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp  # train.py's default: bf16 autocast on CUDA
    dtype = "bf16 autocast" if amp else "fp32"
    rows = []
    for spec, mode in itertools.product(model_specs(args, device), ["eager"] + ["CUDA graphs"] * args.cuda_graphs):
        rows.append(measure_model(*spec, mode=mode, amp=amp, repeats=args.repeats, device=device))
        write_json(args, "models", rows)  # row by row: a run cut short keeps what it measured
    first = rows[0]["train_img_s"]
    print_table(f"Whole models on MNIST-sized images, {device} ({torch.get_num_threads()} threads), {dtype}; "
                f"training = forward + backward + AdamW step (inference: twice the batch, no grad); median of "
                f"{args.repeats} after a warm-up. Activations: what autograd keeps of one eager training batch"
                f"{'; peak = most allocated by the model during the run' if device.type == 'cuda' else ''}",
                "model | backend | mode | params | batch | train img/s | infer img/s | activations MiB | peak MiB | "
                "train vs first row",
                [[r["model"], r["backend"], r["mode"], f"{r['params']:,}", r["batch"],
                  cell(r["train_img_s"], ",.1f", r["failed"]), cell(r["infer_img_s"], ",.1f"),
                  cell(r["activation_mib"], ",.1f"), cell(r["peak_mib"], ",.0f"),
                  "-" if r["failed"] or rows[0]["failed"] else f"{r['train_img_s'] / first:.2f}x"] for r in rows])
    return rows


def bench_scaling(args):
    """The same 4-block stack (width 128) over 49 to 3,136 tokens: Mamba-2 against softmax attention (ViT blocks).
    Tokens per batch are held constant, so a flat time per token means a cost linear in the length."""
    device = cli.resolve_device(args.device)
    # a GPU runs small batches as fast as it launches their kernels: attention's quadratic cost shows only at more
    tokens = args.tokens or (32768 if device.type == "cuda" else 8192)
    stacks = [("Mamba-2", b, [ResidualMamba2Block(SequentialMamba2Config(d_model=128, d_state=32, headdim=32,
                                                                        backend=b)) for _ in range(4)])
              for b in backends(device)]
    stacks.append(("attention", "-", [nn.TransformerEncoderLayer(128, nhead=4, dim_feedforward=256, dropout=0.0,
                                                                 batch_first=True, norm_first=True) for _ in range(4)]))
    columns = [("ms", ".1f"), ("us_per_token", ".2f"), ("activation_mib", ".1f"), ("activation_kib_per_token", ".1f")]
    rows = []
    for name, backend, blocks in stacks:
        model = nn.Sequential(*blocks).to(device)
        for l in args.lengths:
            b = max(1, tokens // l)
            x = torch.randn(b, l, 128, device=device)

            def measure():
                t = median_time(lambda: model(x).sum().backward(), args.repeats, device=device)
                saved = saved_activation_bytes(lambda: model(x).sum())
                return dict(ms=1e3 * t, us_per_token=1e6 * t / (b * l), activation_mib=saved / 2**20,
                            activation_kib_per_token=saved / 2**10 / (b * l))
            rows.append(dict(model=name, backend=backend, device=str(device), dtype="fp32", params=count_params(model),
                             length=l, batch=b, tokens_per_batch=tokens, **attempt(measure, [k for k, _ in columns])))
    print_table(f"4 blocks of width 128, forward + backward, {device} ({torch.get_num_threads()} threads), fp32, "
                f"about {tokens:,} tokens per batch; median of {args.repeats}",
                "model | backend | params | tokens | batch | time (ms) | us / token | activations (MiB) | KiB / token",
                [[r["model"], r["backend"], f"{r['params']:,}", f"{r['length']:,}", r["batch"],
                  *(cell(r[k], f, r["failed"]) for k, f in columns)] for r in rows])
    plot_scaling(rows, args.plot, device)
    return rows


def plot_scaling(rows, path, device):
    """The scaling rows as two panels, time and activation memory per token over the length (the README's figure)."""
    from matplotlib.figure import Figure  # not pyplot: no backend, no window, nothing kept once saved

    fig, lengths = Figure(figsize=(11, 4), layout="tight"), sorted({r["length"] for r in rows})
    for ax, key, title in zip(fig.subplots(1, 2), ("us_per_token", "activation_kib_per_token"),
                              ("forward + backward time per token (us)", "activation memory per token (KiB)")):
        for (name, backend), mine in itertools.groupby([r for r in rows if r["ms"] is not None],
                                                       key=lambda r: (r["model"], r["backend"])):
            mine = list(mine)
            ax.plot([r["length"] for r in mine], [r[key] for r in mine], "o-",
                    label=name if backend == "-" else f"{name} ({backend})")
        ax.set(xscale="log", xlabel="sequence length (tokens)", title=title)
        ax.set_xticks(lengths, [f"{l:,}" for l in lengths])
        ax.set_xticks([], minor=True)  # the lengths label the axis, not a log scale's minor ticks
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"4 blocks of width 128 on {device}, same tokens per batch")
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def bench_ssd(args):
    """Our SSD (mamba2_torch) against mamba_ssm's ssd_minimal_discrete: forward and backward on the CPU, each at its
    fastest chunk size, at the lengths and tokens per batch of the scaling section."""
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    tokens, h, p, n = args.tokens or 8192, 8, 32, 32
    rows = []
    for l in args.lengths:
        b = max(1, tokens // l)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, l, h, p, generator=gen).requires_grad_()
        dt = F.softplus(torch.randn(b, l, h, generator=gen) - 3).requires_grad_()
        A = (-torch.exp(torch.rand(h, generator=gen) * 2.7)).requires_grad_()
        B, C = (torch.randn(b, l, 1, n, generator=gen).requires_grad_() for _ in range(2))

        def ours(chunk):
            mamba_chunk_scan_combined(x, dt, A, B, C, chunk).sum().backward()

        def minimal(chunk):  # it takes x and A already scaled by dt, and B, C for every head
            y, _ = ssd_minimal_discrete(x * dt[..., None], A * dt, B.expand(b, l, h, n), C.expand(b, l, h, n), chunk)
            y.sum().backward()
        t_ours, ours_chunk = min((median_time(lambda: ours(c), args.repeats), c) for c in (32, 64))
        chunks = [c for c in (16, 28, 32, 49, 64, 98, 128, 196) if l % c == 0]  # ssd_minimal_discrete's divide l
        t_min, min_chunk = min((median_time(lambda: minimal(c), args.repeats), c) for c in chunks)
        rows.append(dict(device="cpu", dtype="fp32", length=l, batch=b, ours_ms=1e3 * t_ours, ours_chunk=ours_chunk,
                         minimal_ms=1e3 * t_min, minimal_chunk=min_chunk, minimal_over_ours=t_min / t_ours))
    print_table(f"SSD forward + backward, CPU ({torch.get_num_threads()} threads), fp32, about {tokens:,} tokens per "
                f"batch, heads {h}, headdim {p}, d_state {n}; median of {args.repeats}",
                "L | batch | ours (ms) | ssd_minimal_discrete (ms) | minimal / ours",
                [[f"{r['length']:,}", r["batch"], f"{r['ours_ms']:.1f} (chunk {r['ours_chunk']})",
                  f"{r['minimal_ms']:.1f} (chunk {r['minimal_chunk']})", f"{r['minimal_over_ours']:.2f}x"]
                 for r in rows])
    return rows


def returns_a_view(op):
    """Whether the aten op `op` ("aten::reshape") is a view op: an overload's schema marks every output as an alias
    of an input, not written to (Tensor(a)). Any overload: the profiler does not record which one ran, and an op's
    overloads differ here only in slice's, on strings."""
    packet = getattr(torch.ops.aten, op.removeprefix("aten::"))
    return any(s.returns and all(r.alias_info is not None and not r.alias_info.is_write for r in s.returns)
               for s in (getattr(packet, overload)._schema for overload in packet.overloads()))


def profiled_step(model, x, y, *, amp=False):
    """torch.profiler's record of the second training step of `model` on the CPU (the first creates the optimizer's
    state and the model's caches)."""
    step = trainer(model, amp=amp, device=torch.device("cpu"))
    step(x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(x, y)
    return prof


def launched_ops(prof):
    """{aten op: count} of the ops a profiled_step launched, each at least one kernel launch on a GPU: those called
    by no aten op (autograd's nodes call the backward's), less views: a view op (returns_a_view) whose nested aten
    calls are all views. So a reshape that copies (calls clone) counts, one that returns a view does not; x.float()
    counts when it casts. The same count on any CPU, at any batch size (no op depends on it)."""
    def top_level(e):  # no aten op above it
        return (p := e.cpu_parent) is None or not p.name.startswith("aten::") and top_level(p)

    def view(e):
        return returns_a_view(e.name) and all(view(c) for c in e.cpu_children if c.name.startswith("aten::"))

    return dict(collections.Counter(e.name for e in prof.events()
                                    if e.name.startswith("aten::") and top_level(e) and not view(e)))


MATRIX_PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
KINDS = ("matrix products", "convolutions", "the rest")


def kind_of(op):
    """Which of KINDS a profiled op (or autograd node, optimizer step, ...) is."""
    if op in MATRIX_PRODUCTS or "scaled_dot_product" in op:  # fused attention: mostly its two matrix products
        return "matrix products"
    if op.startswith("aten::") and "conv" in op:  # mkldnn_convolution, convolution_backward, ...
        return "convolutions"
    return "the rest"  # elementwise work, reductions, copies, autograd's and Python's overhead


def bench_profile(args):
    """One training step of each model (portable backend, CPU), profiled: the aten ops it launches (launched_ops),
    and each op's own CPU time, summed by kind (kind_of), with the rest's largest ops named."""
    dtype = "bf16 autocast" if args.amp else "fp32"  # fp32 unless --amp, as train.py on a CPU
    rows = []
    for name, _, build, batch in model_specs(args, torch.device("cpu")):
        torch.manual_seed(0)
        model = build()
        prof = profiled_step(model, *mnist_batch(batch), amp=bool(args.amp))
        own = collections.Counter()
        for e in prof.key_averages():
            own[e.key] += e.self_cpu_time_total / 1e3  # ms
        total = sum(own.values())
        rest = sorted((op for op in own if kind_of(op) == "the rest"), key=own.get, reverse=True)
        rows.append(dict(model=name, params=count_params(model), batch=batch, dtype=dtype,
                         ops_per_step=sum(launched_ops(prof).values()), step_ms=total,
                         shares={k: sum(ms for op, ms in own.items() if kind_of(op) == k) / total for k in KINDS},
                         rest_largest={op: own[op] / total for op in rest[:3]}))
    print_table(f"One training step on the CPU ({torch.get_num_threads()} threads), {dtype}, portable backend: the "
                f"aten ops it runs that are not views (each at least one kernel launch on a GPU), and each op's own "
                f"time by kind (torch.profiler, which adds a little to every op)",
                f"model | params | batch | aten ops | step ms | {' | '.join(KINDS)} | the rest's largest ops",
                [[r["model"], f"{r['params']:,}", r["batch"], f"{r['ops_per_step']:,}", f"{r['step_ms']:,.0f}",
                  *(f"{100 * r['shares'][k]:.1f} %" for k in KINDS),
                  ", ".join(f"{op.removeprefix('aten::')} {100 * s:.1f} %" for op, s in r["rest_largest"].items())]
                 for r in rows])
    return rows


SECTIONS = {"models": bench_models, "scaling": bench_scaling, "ssd": bench_ssd, "profile": bench_profile}
QUICK = dict(batch_size=32, seq_batch_size=4, repeats=1, tokens=3136)


def write_json(args, section, rows):
    """--json: every section's rows so far, written at once (a later failure or timeout keeps what was measured)."""
    args.report["sections"][section] = rows
    if args.json:
        checkpoint.atomic_write(args.json, lambda f: f.write(json.dumps(args.report, indent=2).encode()))


def run(args):
    for name in args.sections or SECTIONS:
        if name == "ssd" and load_official_kernels() is None:  # not asked for by name (parse_args refuses that)
            print(f"\nssd: skipped, it {NEEDS_MAMBA_SSM}")
            write_json(args, name, {"skipped": f"it {NEEDS_MAMBA_SSM}"})
        else:
            write_json(args, name, SECTIONS[name](args))
        sys.stdout.flush()
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def parse_args(argv):
    count = cli.int_at_least(1)
    p = cli.Parser(prog="bench.py", formatter_class=cli.HelpFormatter,
                   description="Benchmarks, each printing a markdown table (what each measures: the top of bench.py).")
    p.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes and one repeat, every table in a few minutes on "
                   "2 CPU cores: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="models, scaling: auto picks cuda, then mps, then cpu (ssd and profile run on the CPU)")
    p.add_argument("--repeats", type=count, default=5, help="timed repeats per measurement (the median is reported)")
    p.add_argument("--json", help="also write every section's rows, the machine and the command to this JSON file")
    p.add_argument("--batch-size", type=count, default=128, help="models, profile: the image models' training batch")
    p.add_argument("--seq-batch-size", type=count, default=32, help="models, profile: the sequential model's batch")
    p.add_argument("--variant", type=model_variant, action="append", default=[], metavar="FLAGS", help="models, "
                   "profile: one more Vision Mamba 2 row, built with these train.py model flags (repeatable)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="models, profile: bf16 autocast (default: as train.py, on CUDA only)")
    p.add_argument("--cuda-graphs", action="store_true", help="models: also each model's training steps replayed "
                   "from CUDA graphs, as train.py --cuda-graphs runs them")
    p.add_argument("--lengths", type=count, nargs="+", default=[49, 196, 784, 3136],
                   help="scaling, ssd: sequence lengths (7x7, 14x14, 28x28, 56x56 token grids)")
    p.add_argument("--tokens", type=count, default=None, help="scaling, ssd: tokens per batch at every length "
                   "(default: 8,192; scaling on CUDA: 32,768, where fewer wait on kernel launches)")
    p.add_argument("--plot", default="scaling.png", help="scaling: where to write the plot")
    args = p.parse_args(argv)
    if args.quick:  # small sizes as the defaults: flags on the command line still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if unknown := [s for s in args.sections if s not in SECTIONS]:
        p.error(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if "ssd" in args.sections and load_official_kernels() is None:
        p.error(f"ssd cannot run here: it {NEEDS_MAMBA_SSM}")
    if args.cuda_graphs and not (torch.cuda.is_available() and args.device.split(":")[0] in ("auto", "cuda")):
        p.error("--cuda-graphs needs a CUDA GPU (and --device auto or cuda)")
    # what --json writes: the command, the machine and every section's rows (filled in as they are measured)
    machine = dict(platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
                   gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    args.report = dict(command=" ".join(["python bench.py", *argv]), quick=args.quick, machine=machine, sections={})
    return args


def main(argv=None):
    steps.keep_freed_memory_in_process()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.exit(cli.exit_status(lambda: run(args)))


if __name__ == "__main__":
    main()

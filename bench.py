"""
Benchmarks, each printing a markdown table: speed and memory claims live here, never in timed tests.

    python bench.py                                  # every section (the full run is for GPUs)
    python bench.py --quick                          # every section, small sizes: a few minutes on 2 CPU cores
    python bench.py models profile --json b.json     # some sections; all their rows in one JSON file

    models   whole-model training and inference throughput and activation memory, every model in this one run:
             Vision Mamba 2 (7x7 tokens, and 14x14 as train.py --patch-size 2) on the portable backend and on the
             official kernels (CUDA with mamba-ssm), the sequential model (784 steps), the CNN and ViT of baselines.py
    scaling  the same 4-block stack, Mamba-2 vs attention, from 49 to 3,136 tokens: time and memory per token
    ssd      our SSD vs mamba_ssm's ssd_minimal_discrete and a sequential scan (needs mamba-ssm; CPU)
    ops      aten ops per training step (each at least one kernel launch on a GPU, where these small models wait
             on launches): Vision Mamba 2, the sequential model, CNN and ViT; counted on the CPU, exactly
    profile  where a training step of the default model spends its time (torch.profiler): matrix products and
             convolutions, against the rest (elementwise work, reductions, copies): how far the arithmetic's limit is

Every measurement happens in this one process, so ratios compare like with like: medians of several repeats
after a warm-up, timed with CUDA events on a GPU (perf_counter after a synchronize elsewhere). Every section
trains with the same step as train.py (steps.training_step).
"""

import argparse
import collections
import functools
import gc
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

import checkpoint
import cli
import steps
from baselines import CNN, CNNConfig, ViT, ViTConfig
from mamba2_torch import mamba_chunk_scan_combined
from vision_mamba2 import (SequentialMamba2, SequentialMamba2Config, count_params, create_vision_mamba2_model,
                           load_official_kernels)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_time(fn, repeats, warmup=1, device=torch.device("cpu")):
    """Median seconds of fn() over `repeats` calls after `warmup` untimed ones. On CUDA each call is timed by
    events recorded around it on the stream (the GPU's time up to its last kernel, not the launch's)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trainer(model, *, amp, device, cache=True):
    """step(x, y): one training step of `model` as train.py takes it (steps.training_step: forward under bf16
    autocast when amp, cross-entropy, backward, AdamW), with a fresh optimizer. cache=False: autocast's weight cache
    off, as CUDA graphs need."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type != "mps")
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=amp,
                                 cache_enabled=cache)

    def step(x, y):
        model.train()
        steps.training_step(model, x, y, optimizer=optimizer, criterion=F.cross_entropy, scaler=scaler,
                            autocast=autocast, grad_clip=0.0)
    return step


def uses_amp(args, device):
    """--amp / --no-amp, or train.py's default: bf16 autocast on CUDA, fp32 elsewhere."""
    return device.type == "cuda" if args.amp is None else args.amp


class Unavailable(Exception):
    """A section that cannot run on this machine (says why)."""


def attempt(measure, device, *, failure=None):
    """(measure(), None), or (None, why) when the GPU ran out of memory or, where `failure` names what may go wrong
    (compiling a model, capturing its CUDA graphs), that failed: the row says why and the run goes on."""
    try:
        return measure(), None
    except torch.OutOfMemoryError:
        why = "out of memory"
    except Exception as e:
        if failure is None:
            raise
        why = f"{failure} failed ({type(e).__name__})"
        print(f"{why}: {cli.shorten(e)}", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # only now: the except block's traceback held the failed step's tensors
    return None, why


def cell(value, fmt, why=None):
    return why or ("-" if value is None else format(value, fmt))



def model_specs(args, device):
    """(name, backend, build, batch) of every model the models section times."""
    backends = ["portable"] + (["official"] if device.type == "cuda" and load_official_kernels() is not None else [])
    # the default 7x7 token grid, and the 14x14 grid of train.py --patch-size 2 (four times the tokens)
    specs = [(name, backend, functools.partial(create_vision_mamba2_model, backend=backend, patch_size=p),
              args.batch_size) for name, p in [("Vision Mamba 2", 4), ("Vision Mamba 2 (--patch-size 2)", 2)]
             for backend in backends]
    specs += [("sequential Mamba 2 (784 steps)", backend,
               lambda backend=backend: SequentialMamba2(SequentialMamba2Config(backend=backend)), args.seq_batch_size)
              for backend in backends]
    return specs + [("CNN (baselines.py)", "-", lambda: CNN(CNNConfig()), args.batch_size),
                    ("ViT (baselines.py)", "-", lambda: ViT(ViTConfig()), args.batch_size)]


def measure_model(build, batch, mode, args, device):
    """One row of the models section: training and inference img/s of a fresh model, its parameters, what autograd
    keeps of an eager training step (activation MiB) and, on CUDA, its peak memory."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 1, 28, 28, generator=gen).to(device)  # inference takes twice the batch, as train.py
    y = torch.randint(0, 10, (2 * batch,), generator=gen).to(device)
    amp, cuda = uses_amp(args, device), device.type == "cuda"
    torch.manual_seed(0)
    raw_model = build().to(device)
    row = dict(params=count_params(raw_model), train_img_s=None, infer_img_s=None, activation_mib=None, peak_mib=None)
    if cuda:
        gc.collect()  # a graphed model of an earlier row is a reference cycle: its memory goes only now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0

    def run():
        model = steps.compile_model(raw_model, args.compile_mode) if mode == "compiled" else raw_model
        trained = model
        if mode == "CUDA graphs":  # captured for the training batch's shape; inference stays eager
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                trained = steps.GraphedTraining(raw_model, x[:batch])
        step = trainer(trained, amp=amp, device=device, cache=mode != "CUDA graphs")

        @torch.no_grad()
        def infer():
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return model(x)
        warmup = 3 if mode == "compiled" else 1  # a compiled model's warm-ups also record its CUDA graphs
        t_train = median_time(lambda: step(x[:batch], y[:batch]), args.repeats, warmup, device=device)
        t_infer = median_time(infer, args.repeats, warmup, device=device)
        saved = None
        if mode == "eager":  # what autograd saves in an eager step (compiled or captured graphs: their own)
            raw_model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, saved = saved_activation_bytes(lambda: F.cross_entropy(raw_model(x[:batch]), y[:batch]))
        sync(device)
        return dict(train_img_s=batch / t_train, infer_img_s=2 * batch / t_infer,
                    peak_mib=(torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None,
                    activation_mib=None if saved is None else saved / 2**20)

    failure = {"eager": None, "compiled": "compile", "CUDA graphs": "CUDA graphs"}[mode]
    measured, row["failed"] = attempt(run, device, failure=failure)
    return {**row, **(measured or {})}


def bench_models(args):
    """Whole models, training (forward + backward + AdamW step) and inference: images/s and memory, each on a batch
    already on the device, as train.py's loop does. --compile / --cuda-graphs: each model once more that way."""
    device = cli.resolve_device(args.device)
    dtype = "bf16 autocast" if uses_amp(args, device) else "fp32"
    modes = ["eager"] + (["compiled"] if args.compile else []) + (["CUDA graphs"] if args.cuda_graphs else [])
    fastpath = torch.backends.mha.get_fastpath_enabled()
    rows = []
    for name, backend, build, batch in model_specs(args, device):
        for mode in modes:
            rows.append(dict(model=name, backend=backend, mode=mode, device=str(device), dtype=dtype, batch=batch,
                             **measure_model(build, batch, mode, args, device)))
            torch.backends.mha.set_fastpath_enabled(fastpath)  # compile_model turned it off: eager rows keep it
            write_json(args, "models", rows)  # row by row: a run cut short keeps what it measured
    print(f"\nWhole models on MNIST-sized images, {device} ({torch.get_num_threads()} threads), {dtype}; training = "
          f"forward + backward + AdamW step (inference: twice the batch, no grad); median of {args.repeats} after a "
          f"warm-up. Activations: what autograd keeps of one eager training batch"
          f"{'; peak = most allocated by the model during the run' if device.type == 'cuda' else ''}\n")
    print("| model | backend | mode | params | batch | train img/s | infer img/s | activations MiB | peak MiB "
          "| train vs first row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref = rows[0]
    for r in rows:
        ratio = "-" if r["failed"] or ref["failed"] else f"{r['train_img_s'] / ref['train_img_s']:.2f}x"
        print(f"| {r['model']} | {r['backend']} | {r['mode']} | {r['params']:,} | {r['batch']} | "
              f"{cell(r['train_img_s'], ',.1f', r['failed'])} | {cell(r['infer_img_s'], ',.1f')} | "
              f"{cell(r['activation_mib'], ',.1f')} | {cell(r['peak_mib'], ',.0f')} | {ratio} |")
    return rows



def sequential_scan(x, dt, A, B, C):
    """The SSM recurrence one step at a time, as a plain loop: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    y_t = h_t C_t. (mamba_ssm's selective_scan_ref is the same loop, but materialises every step's
    decay up front: ~80 s for one backward pass at L = 196 here, too slow to repeat.)"""
    # x : (b, l, h, p)  dt : (b, l, h)  A : (h,)  B, C : (b, l, 1, n)
    state = x.new_zeros(*x.shape[:1], *x.shape[2:], B.shape[-1])  # (b, h, p, n)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t].expand(-1, x.shape[2], -1)))
    return torch.stack(ys, dim=1)



def bench_ssd(args):
    if load_official_kernels() is None:
        raise Unavailable("it compares against mamba-ssm's reference functions: install mamba-ssm (README)")
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    b, h, p, n = args.batch, 8, 32, 32
    rows = []
    for l in args.lengths:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, l, h, p, generator=gen).requires_grad_()
        dt = F.softplus(torch.randn(b, l, h, generator=gen) - 3).requires_grad_()
        A = (-torch.exp(torch.rand(h, generator=gen) * 2.7)).requires_grad_()
        B, C = (torch.randn(b, l, 1, n, generator=gen).requires_grad_() for _ in range(2))

        def ours(chunk):
            mamba_chunk_scan_combined(x, dt, A, B, C, chunk).sum().backward()

        def minimal(chunk):
            Bh, Ch = (t.expand(b, l, h, n) for t in (B, C))
            y, _ = ssd_minimal_discrete(x * dt[..., None], A * dt, Bh, Ch, chunk)
            y.sum().backward()

        def sequential():
            sequential_scan(x, dt, A, B, C).sum().backward()

        with torch.no_grad():  # the baseline computes the same function
            y_ours, y_seq = mamba_chunk_scan_combined(x, dt, A, B, C, 64), sequential_scan(x, dt, A, B, C)
            assert (y_ours - y_seq).norm() <= 1e-5 * y_seq.norm(), "the sequential scan differs from our SSD"
        t_ours, ours_chunk = min((median_time(lambda: ours(c), args.repeats), c) for c in (32, 64))
        # each gets its fastest chunk size (ssd_minimal_discrete's must divide l)
        chunks = [c for c in (16, 28, 32, 49, 64, 98, 128, 196) if l % c == 0]
        t_min, best_chunk = min((median_time(lambda: minimal(c), args.repeats), c) for c in chunks)
        t_seq = median_time(sequential, max(1, args.repeats // 2))
        rows.append(dict(device="cpu", dtype="fp32", length=l, batch=b, ours_ms=1e3 * t_ours, ours_chunk=ours_chunk,
                         minimal_ms=1e3 * t_min, minimal_chunk=best_chunk, sequential_ms=1e3 * t_seq,
                         minimal_over_ours=t_min / t_ours, sequential_over_ours=t_seq / t_ours))

    print(f"\nSSD forward+backward, CPU ({torch.get_num_threads()} threads), fp32, batch {b}, "
          f"heads {h}, headdim {p}, d_state {n}; median of {args.repeats}\n")
    print("| L | ours (ms) | ssd_minimal_discrete (ms) | sequential scan (ms) | minimal / ours | sequential / ours |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['ours_ms']:.1f} (chunk {r['ours_chunk']}) | {r['minimal_ms']:.1f} "
              f"(chunk {r['minimal_chunk']}) | {r['sequential_ms']:.1f} | {r['minimal_over_ours']:.2f}x "
              f"| {r['sequential_over_ours']:.1f}x |")
    return rows



def returns_a_view(op):
    """Whether the aten op named `op` ("aten::reshape") is a view op: one of its overloads' schemas marks every
    output as an alias of an input that is not written to (Tensor(a)): view, reshape, transpose, permute, select,
    slice, expand, split, unbind, as_strided, t, unsqueeze, squeeze, alias, detach, to, ... (The profiler does
    not record which overload ran; the overloads of one op differ here only in slice's, on strings.)"""
    packet = getattr(torch.ops.aten, op.removeprefix("aten::"))
    schemas = (getattr(packet, overload)._schema for overload in packet.overloads())
    return any(s.returns and all(r.alias_info is not None and not r.alias_info.is_write for r in s.returns)
               for s in schemas)


def profiled_step(model, x, y, *, amp=False):
    """torch.profiler's record of one training step of `model` on the CPU: the second step (the first one creates
    the optimizer's state and the model's caches)."""
    step = trainer(model.cpu(), amp=amp, device=torch.device("cpu"))
    step(x, y)
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(x, y)
    return prof


def training_step_ops(model, x, y):
    """The aten ops that one training step (forward, cross-entropy, backward, fused AdamW step) launches.

    Counted from torch.profiler's record of the step on the CPU (profiled_step). An op counts when it is
      - top level: an aten op called from no other aten op (the ops that autograd's backward nodes call count:
        their callers are autograd nodes), and
      - not a view: not a view op (returns_a_view) whose every nested aten call is a view op too. So a reshape
        that has to copy (it calls clone) counts and one that returns a view does not; likewise x.float() counts
        when it casts (it calls _to_copy), not on an fp32 tensor (it returns x itself).
    Each op counted is at least one kernel launch on a GPU. Deterministic: the same model and batch shape give
    the same count on any CPU (and any batch size: no op depends on it). Returns {op name: count}.
    """
    def top_level(e):
        while (e := e.cpu_parent) is not None:
            if e.name.startswith("aten::"):
                return False
        return True

    def view(e):
        return returns_a_view(e.name) and all(view(c) for c in e.cpu_children if c.name.startswith("aten::"))

    events = profiled_step(model, x, y).events()
    return dict(collections.Counter(e.name for e in events
                                    if e.name.startswith("aten::") and top_level(e) and not view(e)))


def bench_ops(args):
    """Top-level non-view aten ops per training step (training_step_ops), batch --batch-size, portable backend:
    on a GPU each is a kernel launch, and these models are small enough to wait on the launches."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    models = [("Vision Mamba 2", lambda: create_vision_mamba2_model(backend="portable")),
              ("sequential Mamba 2 (sMNIST, 784 steps)",
               lambda: SequentialMamba2(SequentialMamba2Config(backend="portable"))),
              ("CNN (baselines.py)", lambda: CNN(CNNConfig())), ("ViT (baselines.py)", lambda: ViT(ViTConfig()))]
    rows = []
    for name, build in models:
        torch.manual_seed(0)
        model = build()
        ops = sum(training_step_ops(model, x, y).values())
        rows.append(dict(model=name, params=count_params(model), batch=args.batch_size, ops_per_step=ops))
    print("\naten ops per training step (forward, cross-entropy, backward, fused AdamW), fp32, portable backend: "
          "the top-level ops that are not views, from torch.profiler on the CPU (bench.training_step_ops); on a "
          "GPU each is at least one kernel launch\n")
    print("| model | params | batch | aten ops per step | vs ViT |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['ops_per_step']:,} | "
              f"{r['ops_per_step'] / rows[-1]['ops_per_step']:.2f}x |")
    return rows



MATRIX_PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}


def kind_of(op):
    """What a profiled op (or autograd node, optimizer step, ...) is: a matrix product, a convolution or the rest."""
    if op in MATRIX_PRODUCTS:
        return "matrix products (mm, bmm)"
    if op.startswith("aten::") and "conv" in op:  # mkldnn_convolution, convolution_backward, ...
        return "convolutions, forward and backward"
    return "the rest: elementwise work, reductions, copies, overhead"


def bench_profile(args):
    """Where one training step of the default model (portable backend, CPU, batch --batch-size) spends its time:
    each op's own (self) CPU time from torch.profiler, summed by kind; the rest's largest ops listed under it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    amp = uses_amp(args, torch.device("cpu"))
    torch.manual_seed(0)
    own = collections.Counter()
    for e in profiled_step(create_vision_mamba2_model(backend="portable"), x, y, amp=amp).key_averages():
        own[e.key] += e.self_cpu_time_total / 1e3  # ms
    total = sum(own.values())
    kinds = collections.Counter()
    for op, ms in own.items():
        kinds[kind_of(op)] += ms
    rest = sorted(((op, ms) for op, ms in own.items() if kind_of(op).startswith("the rest")), key=lambda r: -r[1])
    rows = [dict(what=kind, ms=ms, share=ms / total) for kind, ms in kinds.most_common()]
    rows += [dict(what=f"of the rest: {op}", ms=ms, share=ms / total) for op, ms in rest[:args.profile_ops]]
    print(f"\nOne training step of the default Vision Mamba 2 (portable), CPU ({torch.get_num_threads()} threads), "
          f"{'bf16 autocast' if amp else 'fp32'}, batch {args.batch_size}: each op's own CPU time (torch.profiler, "
          f"which adds a little to every op), by kind; total {total:,.0f} ms\n")
    print("| where | ms | share |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['ms']:,.1f} | {100 * r['share']:.1f} % |")
    return [dict(r, batch=args.batch_size, dtype="bf16 autocast" if amp else "fp32") for r in rows]


def saved_activation_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass while fn() runs its forward: the
    activation memory of training, measurable on any device (CPU has no peak-memory counter)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:  # views of one storage count once
            seen.add(key)
            total += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total



def scaling_stacks(device):
    """(name, backend, build) of the 4-block stacks of width 128 the scaling section compares."""
    import torch.nn as nn

    from vision_mamba2 import ResidualMamba2Block, SequentialMamba2Config

    def mamba(backend):
        config = SequentialMamba2Config(d_model=128, d_state=32, headdim=32, backend=backend)
        return nn.Sequential(*(ResidualMamba2Block(config) for _ in range(4)))

    def attention():  # a ViT block: pre-norm multi-head self-attention + MLP
        return nn.Sequential(*(nn.TransformerEncoderLayer(128, nhead=4, dim_feedforward=256, dropout=0.0,
                                                          batch_first=True, norm_first=True) for _ in range(4)))

    stacks = [("Mamba-2", "portable", functools.partial(mamba, "portable"))]
    if device.type == "cuda" and load_official_kernels() is not None:
        stacks.append(("Mamba-2", "official", functools.partial(mamba, "official")))
    return stacks + [("attention", "-", attention)]


def bench_scaling(args):
    """The same 4-block stack (width 128) over 49 to 3,136 tokens: Mamba-2 vs softmax attention.
    Tokens per batch are held constant, so a flat time per token means linear cost in the length."""
    device = cli.resolve_device(args.device)
    # on an H100, 8,192 tokens per batch left every model waiting on kernel launches (all lengths alike); at
    # 32,768 attention's quadratic cost shows, while Mamba-2's steps still cost their launches (README)
    tokens = args.tokens or (32768 if device.type == "cuda" else 8192)
    stacks, rows = scaling_stacks(device), []
    for name, backend, build in stacks:
        model = build().to(device)
        for l in args.scaling_lengths:
            b = max(1, tokens // l)
            x = torch.randn(b, l, 128, device=device)

            def measure():
                t = median_time(lambda: model(x).sum().backward(), args.repeats, device=device)
                _, saved = saved_activation_bytes(lambda: model(x).sum())
                return dict(ms=1e3 * t, us_per_token=1e6 * t / (b * l), activation_mib=saved / 2**20,
                            activation_kib_per_token=saved / 2**10 / (b * l))
            measured, failed = attempt(measure, device)
            rows.append(dict(model=name, backend=backend, device=str(device), dtype="fp32", params=count_params(model),
                             length=l, batch=b, tokens_per_batch=tokens, failed=failed, **(measured or dict.fromkeys(
                                 ["ms", "us_per_token", "activation_mib", "activation_kib_per_token"]))))
    print(f"\n4 blocks of width 128, forward + backward, {device} ({torch.get_num_threads()} threads), fp32, "
          f"about {tokens:,} tokens per batch; median of {args.repeats}\n")
    print("| model | backend | params | tokens | batch | time (ms) | us / token | activations (MiB) | KiB / token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['params']:,} | {r['length']:,} | {r['batch']} | "
              + " | ".join(cell(r[k], f, r["failed"]) for k, f in [("ms", ".1f"), ("us_per_token", ".2f"),
                                                                    ("activation_mib", ".1f"),
                                                                    ("activation_kib_per_token", ".1f")]) + " |")
    plot_scaling(rows, stacks, args, device)
    return rows


def plot_scaling(rows, stacks, args, device):
    """The scaling rows as two panels, time and activation memory per token over the length, to args.plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name, backend, _ in stacks:
        mine = [r for r in rows if (r["model"], r["backend"]) == (name, backend) and r["ms"] is not None]
        label = name if backend == "-" else f"{name} ({backend})"
        ax_t.plot([r["length"] for r in mine], [r["us_per_token"] for r in mine], "o-", label=label)
        ax_m.plot([r["length"] for r in mine], [r["activation_kib_per_token"] for r in mine], "o-", label=label)
    for ax, title in ((ax_t, "forward + backward time per token (us)"), (ax_m, "activation memory per token (KiB)")):
        ax.set(xscale="log", xlabel="sequence length (tokens)", title=title)
        ax.set_xticks(args.scaling_lengths, [f"{l:,}" for l in args.scaling_lengths])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"4 blocks of width 128 on {device}, same tokens per batch")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")


SECTIONS = {"models": bench_models, "scaling": bench_scaling, "ssd": bench_ssd, "ops": bench_ops,
            "profile": bench_profile}
# --quick: every section at small sizes, a few minutes on 2 CPU cores (flags given on the command line win)
QUICK = dict(batch_size=32, seq_batch_size=4, repeats=1, scaling_lengths=[49, 196, 784, 3136], tokens=3136,
             lengths=[196], batch=8)


def build_parser():
    count = cli.int_at_least(1)
    p = cli.Parser(prog="bench.py", formatter_class=cli.HelpFormatter,
                   description="Benchmarks, each printing a markdown table: " + ", ".join(SECTIONS) +
                               " (see the top of bench.py for what each measures).")
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"what to run, any of {', '.join(SECTIONS)} (default: all of them; a section this machine "
                        "cannot run, such as ssd without mamba-ssm, is then skipped with the reason)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and one repeat, to see every table in a few minutes on 2 CPU cores: "
                        + ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                    for k, v in QUICK.items()))
    p.add_argument("--device", type=cli.device_name, default="auto",
                   help="models, scaling: auto picks cuda, then mps, then cpu (ssd, ops and profile run on the CPU)")
    p.add_argument("--repeats", type=count, default=5, help="timed repeats per measurement (the median is reported)")
    p.add_argument("--json", help="also write every section's rows, with the machine and the command, to this "
                                  "JSON file")
    p.add_argument("--batch-size", type=count, default=128,
                   help="models: the image models' training batch (inference: twice as many), train.py's default; "
                        "also the batch of ops and profile")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="models, profile: bf16 autocast (default: as train.py, on CUDA only)")
    g = p.add_argument_group("models")
    g.add_argument("--seq-batch-size", type=count, default=32, help="the sequential model's training batch")
    g.add_argument("--compile", action="store_true",
                   help="also time each model through torch.compile, as train.py --compile runs it (after its "
                        "compilation: a minute or more per model)")
    g.add_argument("--compile-mode", choices=steps.COMPILE_MODES, default="default",
                   help="torch.compile's mode for --compile (reduce-overhead: CUDA graphs on a GPU)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: also time each model's training steps replayed from CUDA graphs, as train.py "
                        "--cuda-graphs runs them (inference stays eager)")
    g = p.add_argument_group("scaling")
    g.add_argument("--scaling-lengths", type=count, nargs="+", default=[49, 196, 784, 3136],
                   help="sequence lengths (7x7, 14x14, 28x28, 56x56 token grids)")
    g.add_argument("--tokens", type=count, default=None,
                   help="tokens per batch at every length (default: 8,192; 32,768 on CUDA, where fewer left every "
                        "model waiting on kernel launches on an H100)")
    g.add_argument("--plot", default="scaling.png", help="where to write the plot")
    g = p.add_argument_group("ssd")
    g.add_argument("--lengths", type=count, nargs="+", default=[196, 784], help="sequence lengths")
    g.add_argument("--batch", type=count, default=32, help="sequences per call")
    p.add_argument_group("profile").add_argument("--profile-ops", type=count, default=8,
                                                 help="how many of the rest's largest ops to list")
    return p


def machine():
    cuda = torch.cuda.is_available()
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                torch=torch.__version__, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if cuda else None)


def write_json(args, section, rows):
    """--json: every section's rows so far, written at once (a later failure or timeout keeps what was measured)."""
    args.report["sections"][section] = rows
    if args.json:
        checkpoint.atomic_write(args.json, lambda f: f.write(json.dumps(args.report, indent=2).encode()))


def run(args):
    explicit = bool(args.sections)
    for name in args.sections or SECTIONS:
        try:
            rows = SECTIONS[name](args)
        except Unavailable as e:
            if explicit:
                raise cli.UsageError(f"bench.py {name} cannot run here: {e}") from None
            print(f"\n{name}: skipped, {e}")
            rows = {"skipped": str(e)}
        write_json(args, name, rows)
        sys.stdout.flush()
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if "compile_mode" in cli.given_flags(parser, argv) and not args.compile:
        parser.error("--compile-mode applies only with --compile")
    if args.cuda_graphs:
        try:
            cuda = cli.resolve_device(args.device).type == "cuda"
        except cli.UsageError as e:
            parser.error(str(e))
        if not cuda:
            parser.error("--cuda-graphs needs a CUDA GPU (and --device auto or cuda)")
    if args.quick:
        given = cli.given_flags(parser, argv)
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    # what --json writes: the command, the machine and every section's rows (filled in as they are measured)
    args.report = dict(command=" ".join(["python bench.py", *argv]), quick=args.quick, machine=machine(), sections={})
    return args


def main(argv=None):
    steps.keep_freed_memory_in_process()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sys.exit(cli.exit_status(lambda: run(args)))


if __name__ == "__main__":
    main()

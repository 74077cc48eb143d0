"""
Benchmarks, each printing a markdown table: speed and memory claims live here, never in timed tests.

    python bench.py                                          # every section (the full run is for GPUs)
    python bench.py --quick                                  # every section, small sizes: a few minutes on 2 CPU cores
    python bench.py models scaling --json bench.json        # some sections; all their rows in one JSON file

    models   whole-model training and inference throughput and memory: Vision Mamba 2 (7x7 tokens, and 14x14 as
             train.py --patch-size 2) on the portable backend and on the official kernels (CUDA with mamba-ssm), the CNN
             and ViT baselines of baselines.py, and the
             naive pipeline users start with (the same model scanning one token per step, batch 32,
             per-sample DataLoader)
    scaling  the same 4-block stack, Mamba-2 vs attention, from 49 to 3,136 tokens: time and memory per token
    ssd      our SSD vs mamba_ssm's ssd_minimal_discrete and a sequential scan (needs mamba-ssm; CPU)
    train    train.py's input pipeline and training steps vs a typical per-sample DataLoader
    eval     test_model.py's batched test-set pass vs one image per forward
    ops      aten ops per training step (each at least one kernel launch on a GPU, where these small models wait
             on launches): Vision Mamba 2, the sequential model, CNN and ViT; counted on the CPU, exactly

Every measurement happens in this one process, so ratios compare like with like: medians of several repeats
after a warm-up, timed with CUDA events on a GPU (perf_counter after a synchronize elsewhere).
"""

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
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

import checkpoint
import cli
import data
import steps
import test_model
from baselines import CNN, CNNConfig, ViT, ViTConfig
from mamba2_torch import mamba_chunk_scan_combined, rmsnorm_fn
from steps import keep_freed_memory_in_process
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


def throughput(batches, images, device, step=None):
    """images/s of step(x, y) over the first `images` images of the (x, y) iterable `batches`, after one
    warm-up batch; without a step, of producing the batches alone."""
    it = iter(batches)
    x, y = next(it)
    if step:
        step(x, y)
    sync(device)
    t0, seen = time.perf_counter(), 0
    for x, y in it:
        if step:
            step(x, y)
        seen += len(y)
        if seen >= images:
            break
    sync(device)
    return seen / (time.perf_counter() - t0)


def to_device(loader, device):
    return ((x.to(device), y.to(device)) for x, y in loader)


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


def sequential_ssd(x, dt, A, B, C, chunk_size, *, D, z, dt_bias, dt_softplus, dt_limit):
    """mamba_chunk_scan_combined's signature over sequential_scan: the naive model's SSD (chunk_size unused)."""
    dt = dt + dt_bias
    dt = F.softplus(dt) if dt_softplus else dt
    y = sequential_scan(x, dt.clamp(*dt_limit), A, B, C) + x * D[:, None]
    return y if z is None else y * F.silu(z)


def naive_model():
    """The default Vision Mamba 2 with every mixer scanning one token per step, as Python-loop tutorials do."""
    model = create_vision_mamba2_model(backend="portable")
    for block in model.blocks:
        block.mixer.forward = functools.partial(block.mixer.mix, scan=sequential_ssd, gated_norm=rmsnorm_fn)
    return model


def bench_models(args):
    """Whole models, training (forward + backward + AdamW step) and inference: images/s and memory.

    Vision Mamba 2, CNN and ViT step on one batch already on the device, as train.py's loop does (its input
    pipeline costs little next to the model: see the train section); the naive pipeline pays for its per-sample
    DataLoader too, since that is how it runs."""
    device = cli.resolve_device(args.device)
    cuda = device.type == "cuda"
    amp = "bf16 autocast" if cuda else "fp32"  # train.py's default
    # the default 7x7 token grid, and the 14x14 grid of train.py --patch-size 2 (four times the tokens)
    backends = ["portable"] + (["official"] if cuda and load_official_kernels() is not None else [])
    specs = [(name, backend, functools.partial(create_vision_mamba2_model, backend=backend, patch_size=p))
             for name, p in [("Vision Mamba 2", 4), ("Vision Mamba 2 (--patch-size 2)", 2)] for backend in backends]
    specs += [("CNN (baselines.py)", "-", lambda: CNN(CNNConfig())),
              ("ViT (baselines.py)", "-", lambda: ViT(ViTConfig()))]
    # --compile: each model once more through torch.compile (train.py --compile), timed after its compilation;
    # --cuda-graphs: once more with its training steps replayed from CUDA graphs (train.py --cuda-graphs)
    modes = ["eager"] + (["compiled"] if args.compile else []) + (["CUDA graphs"] if args.cuda_graphs else [])
    specs = [(name, backend, build, mode) for name, backend, build in specs for mode in modes]
    gen = torch.Generator().manual_seed(0)
    b, naive_batch = args.batch_size, 32
    n = max(2 * b, naive_batch)  # inference takes twice the batch, as train.py
    x = torch.randn(n, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    rows = []

    def measure(build, dtype, batch, step_fn, mode="eager"):
        raw_model = build()
        row = dict(params=count_params(raw_model), train_img_s=None, infer_img_s=None, activation_mib=None,
                   peak_mib=None)
        torch.manual_seed(0)
        sync(device)
        if cuda:
            gc.collect()  # a graphed model of an earlier row is a reference cycle: its memory goes only now
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=dtype != "fp32",
                                     cache_enabled=mode != "CUDA graphs")  # as train.py: graphs need it off

        def run():
            raw_model.to(device)
            model = steps.compile_model(raw_model, args.compile_mode) if mode == "compiled" else raw_model
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            train_model = model
            if mode == "CUDA graphs":  # captured for the training batch's shape; inference stays eager
                with autocast():
                    train_model = steps.GraphedTraining(raw_model, x[:batch])

            def step(xb, yb):
                train_model.train()
                with autocast():
                    loss = F.cross_entropy(train_model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            @torch.no_grad()
            def infer(xb):
                model.eval()
                with autocast():
                    return model(xb)

            train_rate, infer_rate = step_fn(model, step, infer, warmup=3 if mode == "compiled" else 1)
            sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
            saved = None
            if mode == "eager":  # what autograd saves in an eager step (compiled or captured graphs: their own)
                raw_model.train()
                with autocast():
                    _, saved = saved_activation_bytes(lambda: F.cross_entropy(raw_model(x[:batch]), y[:batch]))
            return dict(train_img_s=train_rate, infer_img_s=infer_rate, peak_mib=peak,
                        activation_mib=None if saved is None else saved / 2**20)

        failure = {"eager": None, "compiled": "compile", "CUDA graphs": "CUDA graphs"}[mode]
        measured, row["failed"] = attempt(run, device, failure=failure)
        return {**row, **(measured or {})}

    def on_device(model, step, infer, warmup):  # a compiled model's warm-ups also record its CUDA graphs
        t_train = median_time(lambda: step(x[:b], y[:b]), args.repeats, warmup, device=device)
        t_infer = median_time(lambda: infer(x[:2 * b]), args.repeats, warmup, device=device)
        return b / t_train, 2 * b / t_infer

    fastpath = torch.backends.mha.get_fastpath_enabled()
    for name, backend, build, mode in specs:
        rows.append(dict(model=name, backend=backend, mode=mode, device=str(device), dtype=amp, batch=b,
                         **measure(build, amp, b, on_device, mode)))
        torch.backends.mha.set_fastpath_enabled(fastpath)  # compile_model turned it off: eager rows keep it
        write_json(args, "models", rows)  # row by row: a run cut short keeps what it measured

    # the naive pipeline: per-sample ToTensor + Normalize in a DataLoader, batch 32, fp32, one token per step
    _, mean, std = data.DATASETS["mnist"]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    train_set, test_set = data.load_datasets("mnist", args.data_dir, tf)

    def through_loaders(model, step, infer, warmup):  # throughput() warms up on the first batch
        with torch.no_grad():  # the same function as our model, step by step
            ours = create_vision_mamba2_model(backend="portable").to(device).eval()
            ours.load_state_dict(model.state_dict())
            model.eval()
            probe = x[:2]
            assert torch.allclose(model(probe), ours(probe), atol=1e-4, rtol=1e-4), \
                "the naive model's logits differ from ours: its sequential scan is not the same SSD"
        loader = functools.partial(DataLoader, batch_size=naive_batch, shuffle=True)
        return (throughput(to_device(loader(train_set), device), args.naive_images, device, step),
                throughput(to_device(loader(test_set), device), args.naive_images, device, lambda xb, yb: infer(xb)))

    rows.append(dict(model="naive pipeline: Vision Mamba 2, sequential scan, DataLoader", backend="loop",
                     mode="eager", device=str(device), dtype="fp32", batch=naive_batch,
                     **measure(naive_model, "fp32", naive_batch, through_loaders)))

    ref = rows[0]
    print(f"\nWhole models on MNIST-sized images, {device} ({torch.get_num_threads()} threads); training = forward + "
          f"backward + AdamW step (inference: twice the batch, no grad); median of {args.repeats} after a warm-up; "
          f"the naive pipeline over {args.naive_images} images of its DataLoader. Memory: autograd-saved activations "
          f"of one eager training batch (compiled and CUDA-graph rows: -)"
          f"{'; peak = most allocated by the model during the run' if cuda else ''}\n")
    print("| model | backend | mode | params | dtype | batch | train img/s | infer img/s | activations MiB "
          "| peak MiB | train vs ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r["failed"] or ref["failed"] else f"{r['train_img_s'] / ref['train_img_s']:.2f}x"
        print(f"| {r['model']} | {r['backend']} | {r['mode']} | {r['params']:,} | "
              f"{r['dtype']} | {r['batch']} | {cell(r['train_img_s'], ',.1f', r['failed'])} | "
              f"{cell(r['infer_img_s'], ',.1f')} | {cell(r['activation_mib'], ',.1f')} | {cell(r['peak_mib'], ',.0f')} "
              f"| {ratio} |")
    return rows


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


def bench_train(args):
    """train.py's on-device pipeline vs the per-sample DataLoader of typical MNIST scripts (batch 32,
    ToTensor + Normalize in the loader): the pipeline alone, then whole training steps of the default model."""
    device = cli.resolve_device(args.device)
    _, mean, std = data.DATASETS["mnist"]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    train_set, _ = data.load_datasets("mnist", args.data_dir, tf)
    train_set = Subset(train_set, range(min(args.train_samples or len(train_set), len(train_set))))
    ours = data.DeviceSplit(DataLoader(train_set, batch_size=128), device, mean, std)
    typical = DataLoader(train_set, batch_size=32, shuffle=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def our_batches():
        for x, y in ours.batches(gen):
            yield data.random_affine(x, gen, translate=2.0, rotate=10.0, scale=0.1, fill=-mean / std), y

    def our_plain_batches():
        return ours.batches(gen)

    def typical_batches():
        return to_device(typical, device)

    def rate(batches, images, step=None):
        return throughput(batches(), images, device, step)

    model = create_vision_mamba2_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    typical_rate = rate(typical_batches, args.images)
    rows = [("input pipeline, no augmentation", rate(our_plain_batches, args.images), typical_rate),
            ("input pipeline, ours with augmentation", rate(our_batches, args.images), typical_rate),
            ("training steps, default model", rate(our_batches, args.step_images, step),
             rate(typical_batches, args.step_images, step))]
    print(f"\nMNIST training input, {device} ({torch.get_num_threads()} threads); ours: whole split on the device, "
          f"batch 128, random affine augmentation where said; typical: per-sample DataLoader, batch 32, ToTensor + "
          f"Normalize, no augmentation\n")
    print("| what | ours (img/s) | typical (img/s) | ours / typical |")
    print("|---|---|---|---|")
    for what, a, b in rows:
        print(f"| {what} | {a:,.0f} | {b:,.0f} | {a / b:.1f}x |")
    return [dict(what=w, device=str(device), dtype="bf16 autocast" if device.type == "cuda" else "fp32",
                 batch_ours=128, batch_typical=32, ours_img_s=a, typical_img_s=b) for w, a, b in rows]


def bench_eval(args):
    """test_model.py's one batched pass over the whole test set vs the one-image-per-forward loop of typical
    MNIST test scripts (the dataset's per-sample ToTensor + Normalize, then model(image[None])), same model."""
    device = cli.resolve_device(args.device)
    if args.checkpoint:
        ckpt = checkpoint.load_checkpoint(args.checkpoint)
        model = checkpoint.rebuild_model(ckpt, args.checkpoint, device)
        dataset, norm, what = ckpt["dataset"], ckpt["normalization"], args.checkpoint
    else:
        model = create_vision_mamba2_model().to(device).eval()
        dataset, what = "mnist", "the default model (untrained)"
        norm = dict(zip(("mean", "std"), data.DATASETS[dataset][1:]))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((norm["mean"],), (norm["std"],))])
    _, test = data.load_datasets(dataset, args.data_dir, tf)
    timed = Subset(test, range(min(args.eval_images or len(test), len(test))))  # the first images of the test set
    split = data.DeviceSplit(DataLoader(timed, batch_size=args.eval_batch_size), device, norm["mean"], norm["std"])
    single = min(args.single_images, split.num_samples)
    results = {}

    def batched():
        results["batched"] = test_model.predict(model, split)[0]

    @torch.no_grad()
    def one_by_one():
        probs = []
        for i in range(single):
            x, _ = test[i]  # x : (1, H, W)
            probs.append(model(x[None].to(device)).float().softmax(dim=1).cpu())
        results["single"] = torch.cat(probs).numpy()

    with torch.no_grad():  # warm-up: one batch
        model(next(split.batches())[0])
    t_batched = median_time(batched, args.repeats, warmup=0, device=device)
    t_single = median_time(one_by_one, args.repeats, warmup=0, device=device)
    # the same function: one image at a time gives the batched probabilities (on a GPU within the rounding of
    # the TF32 convolutions cuDNN may pick differently for the two batch sizes)
    tol = 1e-4 if device.type == "cpu" else 1e-3
    assert abs(results["single"] - results["batched"][:single]).max() < tol, \
        "one image per forward gave other probabilities than the batched pass"
    rows = [dict(what=f"batched (test_model.py), batch {args.eval_batch_size}", device=str(device), dtype="fp32",
                 batch=args.eval_batch_size, images=split.num_samples,
                 seconds=t_batched, images_per_sec=split.num_samples / t_batched),
            dict(what="one image per forward", device=str(device), dtype="fp32", batch=1, images=single,
                 seconds=t_single, images_per_sec=single / t_single)]
    print(f"\n{dataset} test-set evaluation, {device} ({torch.get_num_threads()} threads), {what}, fp32; "
          f"the first {split.num_samples:,} test images batched, the first {single:,} one per forward; median of "
          f"{args.repeats}\n")
    print("| what | images | time (s) | img/s | vs one image per forward |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['images']:,} | {r['seconds']:.1f} | {r['images_per_sec']:,.1f} | "
              f"{r['images_per_sec'] / rows[1]['images_per_sec']:.1f}x |")
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


def training_step_ops(model, x, y):
    """The aten ops that one training step (forward, cross-entropy, backward, fused AdamW step) launches.

    Counted from torch.profiler's record of the step on the CPU (the second step: the first one creates the
    optimizer's state and the model's caches). An op counts when it is
      - top level: an aten op called from no other aten op (the ops that autograd's backward nodes call count:
        their callers are autograd nodes), and
      - not a view: not a view op (returns_a_view) whose every nested aten call is a view op too. So a reshape
        that has to copy (it calls clone) counts and one that returns a view does not; likewise x.float() counts
        when it casts (it calls _to_copy), not on an fp32 tensor (it returns x itself).
    Each op counted is at least one kernel launch on a GPU. Deterministic: the same model and batch shape give
    the same count on any CPU (and any batch size: no op depends on it). Returns {op name: count}.
    """
    model = model.cpu().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()

    def top_level(e):
        while (e := e.cpu_parent) is not None:
            if e.name.startswith("aten::"):
                return False
        return True

    def view(e):
        return returns_a_view(e.name) and all(view(c) for c in e.cpu_children if c.name.startswith("aten::"))

    counts = {}
    for e in prof.events():
        if e.name.startswith("aten::") and top_level(e) and not view(e):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


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
    print(f"\naten ops per training step (forward, cross-entropy, backward, fused AdamW), fp32, portable backend: "
          f"the top-level ops that are not views, from torch.profiler on the CPU (bench.training_step_ops); on a "
          f"GPU each is at least one kernel launch\n")
    print("| model | params | batch | aten ops per step | vs ViT |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['ops_per_step']:,} | "
              f"{r['ops_per_step'] / rows[-1]['ops_per_step']:.2f}x |")
    return rows


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


def bench_scaling(args):
    """The same 4-block stack (width 128) over 49 to 3,136 tokens: Mamba-2 vs softmax attention.
    Tokens per batch are held constant, so a flat time per token means linear cost in the length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn as nn

    from vision_mamba2 import ResidualMamba2Block

    device = cli.resolve_device(args.device)
    width, depth = 128, 4

    def mamba(backend):
        return nn.Sequential(*(ResidualMamba2Block(dim=width, d_state=32, headdim=32, backend=backend)
                               for _ in range(depth)))

    def attention():  # a ViT block: pre-norm multi-head self-attention + MLP
        return nn.Sequential(*(nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                                          batch_first=True, norm_first=True)
                               for _ in range(depth)))

    stacks = [("Mamba-2", "portable", functools.partial(mamba, "portable"))]
    if device.type == "cuda" and load_official_kernels() is not None:
        stacks.append(("Mamba-2", "official", functools.partial(mamba, "official")))
    stacks.append(("attention", "-", attention))
    # on an H100, 8,192 tokens per batch left every model waiting on kernel launches (all lengths alike); at
    # 32,768 attention's quadratic cost shows, while Mamba-2's steps still cost their launches (README)
    tokens = args.tokens or (32768 if device.type == "cuda" else 8192)
    rows = []
    for name, backend, build in stacks:
        model = build().to(device)
        params = count_params(model)
        for l in args.scaling_lengths:
            b = max(1, tokens // l)
            x = torch.randn(b, l, width, device=device)

            def step():
                model(x).sum().backward()

            def measure():
                t = median_time(step, args.repeats, device=device)
                _, saved = saved_activation_bytes(lambda: model(x).sum())
                return dict(ms=1e3 * t, us_per_token=1e6 * t / (b * l), activation_mib=saved / 2**20,
                            activation_kib_per_token=saved / 2**10 / (b * l))
            measured, failed = attempt(measure, device)
            rows.append(dict(model=name, backend=backend, device=str(device), dtype="fp32", params=params, length=l,
                             batch=b, tokens_per_batch=tokens, failed=failed, **(measured or dict.fromkeys(
                                 ["ms", "us_per_token", "activation_mib", "activation_kib_per_token"]))))
            del x

    print(f"\n{depth} blocks of width {width}, forward + backward, {device} ({torch.get_num_threads()} threads), fp32, "
          f"about {tokens:,} tokens per batch; median of {args.repeats}\n")
    print("| model | backend | params | tokens | batch | time (ms) | us / token | activations (MiB) | KiB / token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['params']:,} | {r['length']:,} | {r['batch']} | "
              + " | ".join(cell(r[k], f, r["failed"]) for k, f in [("ms", ".1f"), ("us_per_token", ".2f"),
                                                                    ("activation_mib", ".1f"),
                                                                    ("activation_kib_per_token", ".1f")]) + " |")

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
    fig.suptitle(f"{depth} blocks of width {width} on {device}, same tokens per batch")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")
    return rows


SECTIONS = {"models": bench_models, "scaling": bench_scaling, "ssd": bench_ssd, "train": bench_train,
            "eval": bench_eval, "ops": bench_ops}
# --quick: every section at small sizes, a few minutes on 2 CPU cores (flags given on the command line win)
QUICK = dict(batch_size=32, naive_images=64, repeats=1, scaling_lengths=[49, 196, 784, 3136], tokens=3136,
             lengths=[196], batch=8, images=2000, step_images=64, train_samples=5000, eval_images=256,
             single_images=32)


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
                   help="models, scaling, train, eval: auto picks cuda, then mps, then cpu (ssd runs on the CPU)")
    p.add_argument("--data-dir", default="./data",
                   help="models, train, eval: torchvision's root for MNIST (downloaded when absent)")
    p.add_argument("--repeats", type=count, default=5, help="timed repeats per measurement (the median is reported)")
    p.add_argument("--json", help="also write every section's rows, with the machine and the command, to this "
                                  "JSON file")
    g = p.add_argument_group("models")
    g.add_argument("--batch-size", type=count, default=128,
                   help="training batch (inference: twice as many), train.py's default; the naive pipeline "
                        "always uses 32; also the ops section's batch")
    g.add_argument("--naive-images", type=count, default=512, help="images timed through the naive pipeline")
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
    g = p.add_argument_group("train")
    g.add_argument("--images", type=count, default=20000, help="images timed for the input pipeline")
    g.add_argument("--step-images", type=count, default=1024, help="images timed for training steps")
    g.add_argument("--train-samples", type=count, default=None,
                   help="training images used (default: all 60,000)")
    g = p.add_argument_group("eval")
    g.add_argument("--checkpoint", help="a train.py checkpoint to time (default: the default model, untrained: "
                                        "the weights don't change the speed)")
    g.add_argument("--eval-batch-size", type=count, default=test_model.build_parser().get_default("batch_size"),
                   help="batch size of the batched pass (default: test_model.py's)")
    g.add_argument("--eval-images", type=count, default=None,
                   help="test images in the batched pass (default: all 10,000)")
    g.add_argument("--single-images", type=count, default=500,
                   help="test images timed one per forward pass (all 10,000 take long on a CPU)")
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
    keep_freed_memory_in_process()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sys.exit(cli.exit_status(lambda: run(args)))


if __name__ == "__main__":
    main()

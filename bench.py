"""
Benchmarks that print a markdown table (speed claims live here, never in timed tests).

    python bench.py ssd            # our SSD vs mamba_ssm's ssd_minimal_discrete and sequential scan, CPU
    python bench.py train --data-dir ../shared/data   # train.py's input pipeline and step vs a per-sample DataLoader
    python bench.py eval --data-dir ../shared/data    # test_model.py's batched test-set pass vs one image per forward

Each row: forward + backward time, median of several repeats after a warm-up, all measured in this
one process, with ratios against our SSD. Shapes are those of the default model's mixer: d_model 128,
expand 2 -> 8 heads of headdim 32, d_state 32, a batch of 16 images read in two directions (32 sequences).
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from mamba2_torch import mamba_chunk_scan_combined
import test_model
import train
from train import keep_freed_memory_in_process


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
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


def bench_ssd(args):
    from vision_mamba2 import load_official_kernels

    if load_official_kernels() is None:
        sys.exit("error: bench.py ssd compares against mamba-ssm's references: install mamba-ssm (README)")
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
            assert (y_ours - y_seq).norm() <= 1e-5 * y_seq.norm()
        t_ours, ours_chunk = min((median_time(lambda: ours(c), args.repeats), c) for c in (32, 64))
        # each gets its fastest chunk size (ssd_minimal_discrete's must divide l)
        chunks = [c for c in (16, 28, 32, 49, 64, 98, 128, 196) if l % c == 0]
        t_min, best_chunk = min((median_time(lambda: minimal(c), args.repeats), c) for c in chunks)
        t_seq = median_time(sequential, max(1, args.repeats // 2))
        rows.append(dict(length=l, batch=b, ours_ms=1e3 * t_ours, ours_chunk=ours_chunk,
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
    device = train.resolve_device(args.device)
    loaders = train.get_mnist_dataloaders(data_dir=args.data_dir, batch_size=128)
    _, mean, std = train.DATASETS["mnist"]
    ours = train.DeviceSplit(loaders[0], device, mean, std)
    typical = torch.utils.data.DataLoader(loaders[0].dataset, batch_size=32, shuffle=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def our_batches():
        for x, y in ours.batches(gen):
            yield train.random_affine(x, gen, translate=2.0, rotate=10.0, scale=0.1, fill=-mean / std), y

    def our_plain_batches():
        return ours.batches(gen)

    def typical_batches():
        for x, y in typical:
            yield x.to(device), y.to(device)

    def rate(batches, images, step=None):
        """images/s over the first `images` images (after one warm-up batch)."""
        it = batches()
        x, y = next(it)
        if step:
            step(x, y)
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        sync()
        t0, seen = time.perf_counter(), 0
        for x, y in it:
            if step:
                step(x, y)
            seen += len(y)
            if seen >= images:
                break
        sync()
        return seen / (time.perf_counter() - t0)

    model = train.create_vision_mamba2_model().to(device)
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
    return [dict(what=w, ours=a, typical=b) for w, a, b in rows]


def bench_eval(args):
    """test_model.py's one batched pass over the whole test set vs the one-image-per-forward loop of typical
    MNIST test scripts (the dataset's per-sample ToTensor + Normalize, then model(image[None])), same model."""
    device = train.resolve_device(args.device)
    if args.checkpoint:
        ckpt = test_model.load_checkpoint(args.checkpoint)
        model = test_model.build_model(ckpt, args.checkpoint, device)
        dataset, norm, what = ckpt["dataset"], ckpt["normalization"], args.checkpoint
    else:
        model = train.create_vision_mamba2_model().to(device).eval()
        dataset, what = "mnist", "the default model (untrained)"
        norm = dict(zip(("mean", "std"), train.DATASETS[dataset][1:]))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((norm["mean"],), (norm["std"],))])
    _, test = train.load_datasets(dataset, args.data_dir, tf)
    split = train.DeviceSplit(DataLoader(test, batch_size=args.eval_batch_size), device, norm["mean"], norm["std"])
    single = min(args.single_images, len(test))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    results = {}

    def batched():
        results["batched"] = test_model.predict(model, split)[0]
        sync()

    @torch.no_grad()
    def one_by_one():
        probs = []
        for i in range(single):
            x, _ = test[i]  # x : (1, H, W)
            probs.append(model(x[None].to(device)).float().softmax(dim=1).cpu())
        results["single"] = torch.cat(probs).numpy()
        sync()

    with torch.no_grad():  # warm-up: one batch
        model(next(split.batches())[0])
    t_batched = median_time(batched, args.repeats, warmup=0)
    t_single = median_time(one_by_one, args.repeats, warmup=0)
    # the same function: one image at a time gives the batched probabilities
    assert abs(results["single"] - results["batched"][:single]).max() < 1e-4
    rows = [dict(what=f"batched (test_model.py), batch {args.eval_batch_size}", images=split.num_samples,
                 seconds=t_batched, images_per_sec=split.num_samples / t_batched),
            dict(what="one image per forward", images=single, seconds=t_single, images_per_sec=single / t_single)]
    print(f"\n{dataset} test-set evaluation, {device} ({torch.get_num_threads()} threads), {what}, fp32; "
          f"the one-image loop runs on the first {single:,} test images; median of {args.repeats}\n")
    print("| what | images | time (s) | img/s | vs one image per forward |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['images']:,} | {r['seconds']:.1f} | {r['images_per_sec']:,.1f} | "
              f"{r['images_per_sec'] / rows[1]['images_per_sec']:.1f}x |")
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

    device = train.resolve_device(args.device)
    width, depth = 128, 4

    def mamba():
        return nn.Sequential(*(ResidualMamba2Block(dim=width, d_state=32, headdim=32) for _ in range(depth)))

    def attention():  # a ViT block: pre-norm multi-head self-attention + MLP
        return nn.Sequential(*(nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                                          batch_first=True, norm_first=True)
                               for _ in range(depth)))

    rows = []
    for name, build in (("Mamba-2", mamba), ("attention", attention)):
        model = build().to(device)
        params = sum(p.numel() for p in model.parameters())
        for l in args.scaling_lengths:
            b = max(1, args.tokens // l)
            x = torch.randn(b, l, width, device=device)
            sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

            def step():
                model(x).sum().backward()
                sync()
            t = median_time(step, args.repeats)
            _, saved = saved_activation_bytes(lambda: model(x).sum())
            rows.append(dict(model=name, params=params, length=l, batch=b, ms=1e3 * t,
                             us_per_token=1e6 * t / (b * l), activation_mb=saved / 2**20,
                             activation_kb_per_token=saved / 2**10 / (b * l)))

    print(f"\n{depth} blocks of width {width}, forward + backward, {device} ({torch.get_num_threads()} threads), fp32, "
          f"about {args.tokens:,} tokens per batch; median of {args.repeats}\n")
    print("| model | params | tokens | batch | time (ms) | us / token | activations (MB) | KB / token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['length']:,} | {r['batch']} | {r['ms']:.1f} | "
              f"{r['us_per_token']:.2f} | {r['activation_mb']:.1f} | {r['activation_kb_per_token']:.1f} |")

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("Mamba-2", "attention"):
        mine = [r for r in rows if r["model"] == name]
        ax_t.plot([r["length"] for r in mine], [r["us_per_token"] for r in mine], "o-", label=name)
        ax_m.plot([r["length"] for r in mine], [r["activation_kb_per_token"] for r in mine], "o-", label=name)
    for ax, title in ((ax_t, "forward + backward time per token (us)"), (ax_m, "activation memory per token (KB)")):
        ax.set(xscale="log", xlabel="sequence length (tokens)", title=title)
        ax.set_xticks(args.scaling_lengths, [f"{l:,}" for l in args.scaling_lengths])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{depth} blocks of width {width} on {device}, same tokens per batch")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")
    return rows


def main():
    keep_freed_memory_in_process()
    parser = argparse.ArgumentParser(description="Benchmarks; each prints a markdown table.")
    parser.add_argument("what", choices=["ssd", "train", "eval", "scaling"],
                        help="ssd: our SSD vs mamba_ssm's references on CPU; train: train.py's input pipeline and "
                             "training step vs a typical per-sample DataLoader; eval: test_model.py's batched "
                             "test-set pass vs one image per forward")
    parser.add_argument("--lengths", type=int, nargs="+", default=[196, 784], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=32, help="sequences per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median reported)")
    parser.add_argument("--data-dir", default="./data", help="train, eval: torchvision's MNIST root")
    parser.add_argument("--device", default="auto", help="train, eval: auto, cpu, cuda, mps")
    parser.add_argument("--images", type=int, default=20000, help="train: images timed for the input pipeline")
    parser.add_argument("--step-images", type=int, default=1024, help="train: images timed for training steps")
    parser.add_argument("--checkpoint", help="eval: a train.py checkpoint to time (default: the default model, "
                                                 "untrained: the weights don't change the speed)")
    parser.add_argument("--eval-batch-size", type=int, default=test_model.build_parser().get_default("batch_size"),
                        help="eval: batch size of the batched pass (default: test_model.py's)")
    parser.add_argument("--single-images", type=int, default=500,
                        help="eval: test images timed one per forward pass (all 10,000 take long on a CPU)")
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[49, 196, 784, 3136],
                        help="scaling: sequence lengths (7x7, 14x14, 28x28, 56x56 token grids)")
    parser.add_argument("--tokens", type=int, default=8192, help="scaling: tokens per batch at every length")
    parser.add_argument("--plot", default="scaling.png", help="scaling: where to write the plot")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    try:
        rows = {"ssd": bench_ssd, "train": bench_train, "eval": bench_eval, "scaling": bench_scaling}[args.what](args)
    except (train.UsageError, train.TrainingError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

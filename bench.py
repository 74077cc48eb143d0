"""
Benchmarks that print a markdown table (speed claims live here, never in timed tests).

    python bench.py ssd            # our SSD vs mamba_ssm's ssd_minimal_discrete and sequential scan, CPU

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
from mamba2_torch import mamba_chunk_scan_combined
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


def main():
    keep_freed_memory_in_process()
    parser = argparse.ArgumentParser(description="Benchmarks; each prints a markdown table.")
    parser.add_argument("what", choices=["ssd"], help="ssd: our SSD vs mamba_ssm's references on CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=[196, 784], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=32, help="sequences per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median reported)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = bench_ssd(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Benchmark of the fused read pass (tch_fabric::unscale_sumsq_) against libtorch's native
unscale alone and native unscale followed by _foreach_norm, on 126 M gradients in 64 tensors,
for float32, bfloat16 and float16. Medians of several repetitions, ratios side by side.

    cargo build && .venv/bin/python scripts/bench_op.py target/debug/build/tch-fabric-*/out/libtch_fabric_ops.so
"""
import glob
import statistics
import sys
import time

import torch

lib = sys.argv[1] if len(sys.argv) > 1 else sorted(glob.glob("target/*/build/tch-fabric-*/out/libtch_fabric_ops.so"))[-1]
torch.ops.load_library(lib)
N, T, REPS = 126_000_000, 64, 7


def timed(fn):
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {N // 1_000_000} M elements in {T} tensors\n")
print("| dtype | native unscale ms | native unscale + _foreach_norm ms | fused pass ms | fused / unscale | fused / (unscale + norm) |")
print("|---|---|---|---|---|---|")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    grads = [torch.randn(N // T).to(dtype) for _ in range(T)]
    inv = torch.full((), 1.0 / 1024)
    found = torch.zeros(())
    native = timed(lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv))
    both = timed(lambda: (torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv),
                          torch._foreach_norm(grads, 2.0)))
    fused = timed(lambda: torch.ops.tch_fabric.unscale_sumsq_(grads, found, inv, True))
    print(f"| {str(dtype).replace('torch.', '')} | {native:.1f} | {both:.1f} | {fused:.1f} | "
          f"{fused / native:.2f} | {fused / both:.2f} |", flush=True)
    del grads

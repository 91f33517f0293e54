"""Benchmark of the fused read pass (tch_fabric::unscale_sumsq_) against libtorch's native
unscale alone and native unscale followed by _foreach_norm, on 126 M gradients in 64 tensors,
for float32, bfloat16 and float16. Medians of several repetitions, ratios side by side.

    cargo build && .venv/bin/python scripts/bench_op.py

(the newest target/*/build/tch-fabric-*/out/libtch_fabric_ops.so, or the path given as argument;
a glob on the command line may expand to a stale build first).

Each repetition first restores the gradients from a pristine copy (untimed), so every timed
call unscales the same realistic values (randn * 1024, unscaled by 1/1024): without that the
repeated unscales would shrink them to subnormals and zeros, which are not what a step sees and
not what costs the same. The candidates are timed in turn within each repetition, so load from
other processes on the machine hits them alike. The last column is the fused op without the
unscale (gradients only read, the sum over float(v) * inv_scale). A second table gives the
best of the repetitions: on a shared machine, the native kernels (one OpenMP region per
tensor) suffer far more from preemption than the fused op (one region per call), so the
medians flatter the fused op when the machine is busy and the minima are the fairer ratio.
"""
import glob
import os
import statistics
import sys
import time

import torch

args = [a for a in sys.argv[1:] if a != "-v"]
lib = args[0] if args else max(glob.glob("target/*/build/tch-fabric-*/out/libtch_fabric_ops.so"), key=os.path.getmtime)
torch.ops.load_library(lib)
N, T, REPS = 126_000_000, 64, 9


def bench(cases, pristine, grads):
    times = {name: [] for name in cases}
    for _ in range(REPS):
        for name, fn in cases.items():
            torch._foreach_copy_(grads, pristine)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if "-v" in sys.argv:
        print({name: [round(x * 1e3) for x in t] for name, t in times.items()})
    return ({name: statistics.median(t) * 1e3 for name, t in times.items()},
            {name: min(t) * 1e3 for name, t in times.items()})


print(lib)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {N // 1_000_000} M elements in {T} tensors, "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
HEAD = ("| dtype | native unscale ms | native unscale + _foreach_norm ms | fused pass ms | fused / unscale "
        "| fused / (unscale + norm) | fused, unscale=false ms |\n|---|---|---|---|---|---|---|")


def row(dtype, t):
    return (f"| {str(dtype).replace('torch.', '')} | {t['native']:.1f} | {t['both']:.1f} | {t['fused']:.1f} | "
            f"{t['fused'] / t['native']:.2f} | {t['fused'] / t['both']:.2f} | {t['sum_only']:.1f} |")


rows_median, rows_min = [], []
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    pristine = [(torch.randn(N // T) * 1024).to(dtype) for _ in range(T)]
    grads = [t.clone() for t in pristine]
    inv = torch.full((), 1.0 / 1024)
    found = torch.zeros(())
    median, best = bench({
        "native": lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv),
        "both": lambda: (torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv),
                         torch._foreach_norm(grads, 2.0)),
        "fused": lambda: torch.ops.tch_fabric.unscale_sumsq_(grads, found, inv, True),
        "sum_only": lambda: torch.ops.tch_fabric.unscale_sumsq_(grads, found, inv, False),
    }, pristine, grads)
    assert found.item() == 0.0
    rows_median.append(row(dtype, median))
    rows_min.append(row(dtype, best))
    del grads, pristine
print(f"Median of {REPS}:\n")
print(HEAD)
print("\n".join(rows_median))
print(f"\nBest of {REPS}:\n")
print(HEAD)
print("\n".join(rows_min))

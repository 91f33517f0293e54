"""Profiles one training step of scripts/bench.py's models on both sides: the libtorch ops
tch-fabric and the raw tch loop call (`tch_fabric::count_ops`, libtorch's RecordFunction
observers, from Rust), against those plain PyTorch and Lightning Fabric call
(`torch.profiler`, the same observers, from Python), with each op's self time. Where a
benchmark ratio is real, this says whether the two sides do different work (other ops, more
casts or copies) or the same work at a different speed.

    scripts/bench.sh --models mlp --repeats 3        # builds target/release/examples/bench
    .venv/bin/python scripts/profile_step.py --model transformer --precisions 32-true,bf16-true

Every configuration runs in a fresh process: warm-up steps, then one profiled step.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the models, the steps and the Rust binary's path)

SIDES = [("tch-fabric", "fabric"), ("raw tch", "raw"), ("PyTorch", "torch"), ("Lightning", "lightning")]


def aten_only(ops):
    """The dispatcher's ops (`aten::`, `tch_fabric::`): the RecordFunction scopes both sides
    see alike (autograd's per-node scopes are named differently from Rust and Python)."""
    return {n: v for n, v in ops.items() if n.startswith(("aten::", "tch_fabric::"))}


def profile(kind, model, precision, steps):
    if kind in ("fabric", "raw"):
        cmd = [bench.RUST_BENCH, "--model", model, "--precision", precision, "--mode", kind,
               "--steps", str(steps), "--warmup", "3", "--profile"]
    else:
        cmd = [sys.executable, bench.__file__, "--worker", kind, "--model", model, "--precision", precision,
               "--profile"]
    run = bench.run_json(cmd)
    run["ops"] = aten_only(run["ops"])
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="transformer", choices=["mlp", "transformer"])
    ap.add_argument("--precisions", default=",".join(bench.PRECISIONS))
    ap.add_argument("--top", type=int, default=8, help="ops listed by self time")
    a = ap.parse_args()
    if not os.path.exists(bench.RUST_BENCH):
        raise SystemExit(f"{bench.RUST_BENCH} is missing: run scripts/bench.sh (it builds it)")
    steps = bench.STEPS[a.model][0]
    print(f"Machine: {bench.machine()}; model {a.model}; one profiled step after warm-up.\n")
    for p in a.precisions.split(","):
        runs = {name: profile(kind, a.model, p, steps) for name, kind in SIDES}
        print(f"### {p}\n")
        print("| | " + " | ".join(runs) + " |")
        print("|---" * (len(runs) + 1) + "|")
        rows = [
            ("step, median ms (unprofiled)", lambda r: f"{r['median_ms']:.2f}"),
            ("op calls", lambda r: str(sum(v[0] for v in r["ops"].values()))),
            ("top-level op calls", lambda r: str(sum(v[1] for v in r["ops"].values()))),
            ("self time in ops, ms", lambda r: f"{sum(v[2] for v in r['ops'].values()) / 1e3:.2f}"),
        ]
        for label, cell in rows:
            print(f"| {label} | " + " | ".join(cell(r) for r in runs.values()) + " |")
        ours, theirs = runs["tch-fabric"]["ops"], runs["PyTorch"]["ops"]
        diff = sorted(n for n in set(ours) | set(theirs)
                      if ours.get(n, [0])[0] != theirs.get(n, [0])[0])
        print(f"\nOps called a different number of times (tch-fabric vs PyTorch): "
              + (", ".join(f"`{n}` {ours.get(n, [0])[0]} vs {theirs.get(n, [0])[0]}" for n in diff)
                 or "none") + "\n")
        print(f"Top {a.top} ops by self time, microseconds (tch-fabric | PyTorch):\n")
        print("| op | tch-fabric calls | tch-fabric us | PyTorch calls | PyTorch us |")
        print("|---|---|---|---|---|")
        names = sorted(set(ours) | set(theirs),
                       key=lambda n: -max(ours.get(n, [0, 0, 0])[2], theirs.get(n, [0, 0, 0])[2]))
        for n in names[:a.top]:
            o, t = ours.get(n, [0, 0, 0]), theirs.get(n, [0, 0, 0])
            print(f"| `{n}` | {o[0]} | {o[2]:.0f} | {t[0]} | {t[2]:.0f} |")
        print(flush=True)


if __name__ == "__main__":
    main()

"""Training-step benchmark: tch-fabric, a raw tch loop, Lightning Fabric and plain PyTorch,
side by side on this machine, for a dispatch-bound MLP and the demo's transformer, in every
precision; plus peak memory of a ~50 M-parameter MLP with AdamW.

    scripts/bench.sh                        # builds the Rust side in release mode, then runs this
    scripts/bench.sh --models mlp           # only the MLP
    scripts/bench.sh --repeats 5            # fewer runs (quicker, wider intervals)

Every configuration runs in a fresh process, `--repeats` times (default 15), the four
implementations interleaved in a rotating order (so none always runs first after a
cool-down): one "round" is the four implementations back to back, which on a shared machine
see the same background load. Each run reports the median and the fastest of its step times
after a warm-up. The tables give, per implementation, the median of the runs' medians with
their min-max, and the ratio tch-fabric / (the faster of Lightning and plain PyTorch) with a
90% bootstrap interval of that ratio of medians, resampling whole rounds (a paired
bootstrap: the load a round saw cancels in its ratio instead of widening the interval). A
target is "met" when the whole interval is at or under it, "missed" when the whole interval
is above, and "open" when it straddles it: noise as large as the differences is the usual
case on a shared 2-core VM, and the interval says so instead of a single number. A second
table gives the same ratios and intervals of each run's fastest step, which preemption can
only make slower; `--report FILE` prints both tables again from a stored `--json` run.

All four use AdamW with PyTorch's fused kernel (`torch.optim.AdamW(fused=True)` in Python,
`FusedAdamW` in Rust) and the same model, data, conversions and loss, so the differences are
the frameworks' own overhead.
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

PRECISIONS = ["64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
# (timed steps, warm-up steps) per model; a precision listed in SLOW_STEPS uses those instead:
# the transformer's float16 step takes about 0.6 s on a CPU without float16 matrix units, and
# ten of them already give a stable median (the rounds give the spread).
STEPS = {"mlp": (500, 50), "transformer": (30, 5), "mlp50m": (3, 1)}
SLOW_STEPS = {("transformer", "16-true"): (10, 2)}
# Each configuration runs this many times by default (--repeats), the four implementations
# interleaved: 15 rounds take about 70 minutes on 2 cores (intervals of about +-10% there).
REPEATS = 15
KINDS = ["fabric", "raw", "lightning", "torch"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUST_BENCH = os.path.join(ROOT, "target", "release", "examples", "bench")


def build_python(model_name, torch):
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    if model_name in ("mlp", "mlp50m"):
        w = 64 if model_name == "mlp" else 4096
        model = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w))
        x, y = torch.randn(32, w), torch.randn(32, w)
        return model, x, y, lambda out, y: F.mse_loss(out, y)

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.heads = heads

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
            return x + self.fc2(F.gelu(self.fc(self.ln2(x))))

    class Gpt(nn.Module):
        def __init__(self, vocab=64, block=96, d=96, layers=3, heads=4):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

        def forward(self, ids):
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            for blk in self.blocks:
                h = blk(h)
            return self.head(self.ln_f(h))

    x = torch.randint(64, (16, 96))
    y = torch.randint(64, (16, 96))
    return Gpt(), x, y, lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def rss_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_step(kind, model_name, precision, torch):
    """One training step of `kind` ("lightning" or "torch") as a function."""
    model, x, y, loss_fn = build_python(model_name, torch)
    if kind == "lightning":
        import warnings
        from lightning.fabric import Fabric

        warnings.filterwarnings("ignore")
        fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        model, opt = fabric.setup(model, opt)

        def step():
            opt.zero_grad()
            out = model(x)
            with fabric.autocast():
                loss = loss_fn(out, y)
            fabric.backward(loss)
            opt.step()

        return step
    # A plain PyTorch AMP loop. On a CPU, 16-mixed runs as bf16-mixed, as in Lightning.
    eff = "bf16-mixed" if precision == "16-mixed" else precision
    dtype = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}.get(eff)
    if dtype is not None:
        model = model.to(dtype)
        if x.is_floating_point():
            x = x.to(dtype)
    mixed = eff.endswith("-mixed")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out = model(x)
            loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()

    return step


def profiled_ops(step, torch):
    """The ATen and tch_fabric ops of one step: {name: [calls, top-level calls, self us]}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {}
    for ev in prof.events():
        if not ev.name.startswith(("aten::", "tch_fabric::")):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "tch_fabric::")):
            parent = parent.cpu_parent
        entry = ops.setdefault(ev.name, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += parent is None
        entry[2] += ev.self_cpu_time_total
    return ops


def steps_of(model_name, precision):
    return SLOW_STEPS.get((model_name, precision), STEPS[model_name])


def worker(kind, model_name, precision, with_profile=False):
    """One configuration in this (fresh) process; prints one JSON line."""
    import torch

    for k in ("LT_PRECISION", "LT_ACCELERATOR", "LT_DEVICES", "LT_CLI_USED"):
        os.environ.pop(k, None)
    base = rss_mib("VmRSS:")
    step = make_step(kind, model_name, precision, torch)
    steps, warmup = steps_of(model_name, precision)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {"median_ms": times[len(times) // 2] * 1e3, "min_ms": times[0] * 1e3, "peak_rss_mib": rss_mib("VmHWM:"), "base_rss_mib": base}
    if with_profile:
        out["ops"] = profiled_ops(step, torch)
    print(json.dumps(out))


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rust(model_name, precision, mode):
    steps, warmup = steps_of(model_name, precision)
    return run_json([RUST_BENCH, "--model", model_name, "--precision", precision, "--mode", mode,
                     "--steps", str(steps), "--warmup", str(warmup)])


def python(kind, model_name, precision):
    return run_json([sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", model_name,
                     "--precision", precision])


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()} {platform.release()}"


def bootstrap_ratio(runs, num, dens, n=2000, seed=0):
    """90% paired bootstrap interval of median(runs[num]) / the smallest median(runs[d]) of
    `dens`. runs[k][r] is implementation k's run in round r; a resample draws rounds with
    replacement and takes every implementation's run from the drawn rounds, so what a round's
    background load did to all four stays together."""
    rng = random.Random(seed)
    rounds = len(runs[num])
    ratios = []
    for _ in range(n):
        pick = [rng.randrange(rounds) for _ in range(rounds)]
        med = lambda k: statistics.median(runs[k][r] for r in pick)
        ratios.append(med(num) / min(med(d) for d in dens))
    ratios.sort()
    return ratios[int(0.05 * n)], ratios[int(0.95 * n) - 1]


def verdict(lo, hi, target):
    return "met" if hi <= target else "missed" if lo > target else "open"


def spread(v):
    return f"{statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]"


def ratios(runs):
    """tch-fabric / the faster Python loop and tch-fabric / Lightning for one configuration's
    runs ({kind: [ms per round]}): (ratio of medians, interval lo, interval hi) each."""
    out = {}
    for name, dens in (("best", ["lightning", "torch"]), ("lightning", ["lightning"])):
        med = {k: statistics.median(runs[k]) for k in ["fabric"] + dens}
        lo, hi = bootstrap_ratio(runs, "fabric", dens)
        out[name] = (med["fabric"] / min(med[d] for d in dens), lo, hi)
    return out


def cell(r, target=None):
    text = f"{r[0]:.2f} [{r[1]:.2f}-{r[2]:.2f}]"
    return text if target is None else f"{text} {verdict(r[1], r[2], target)}"


def lightning_target(model_name):
    """The MLP's second target: at most 0.4x Lightning (the transformer has none)."""
    return 0.4 if model_name == "mlp" else None


def median_row(rec):
    runs, m = rec["runs_ms"], rec["model"]
    r = ratios(runs)
    return (f"| {m} | {rec['precision']} | {spread(runs['fabric'])} | {spread(runs['raw'])} | "
            f"{spread(runs['lightning'])} | {spread(runs['torch'])} | {cell(r['best'], 1.0)} | "
            f"{cell(r['lightning'], lightning_target(m))} |")


def fastest_row(rec):
    """The same ratios of each run's fastest step: a step is only ever slowed by preemption,
    so the fastest of a run's steps is what the step costs when nothing else runs."""
    fast, m = rec["fastest_ms"], rec["model"]
    r = ratios(fast)
    floor = ratios({"fabric": fast["raw"], "lightning": fast["lightning"], "torch": fast["torch"]})
    return (f"| {m} | {rec['precision']} | {spread(fast['fabric'])} | {spread(fast['lightning'])} | "
            f"{spread(fast['torch'])} | {cell(r['best'], 1.0)} | {cell(r['lightning'], lightning_target(m))} | "
            f"{cell(floor['lightning'])} |")


MEDIAN_HEAD = """Step time in ms: median of {n} fresh-process runs' median steps [min-max]. Ratios: \
tch-fabric / the faster of Lightning and plain PyTorch, and tch-fabric / Lightning, as the ratio \
of medians with its 90% paired bootstrap interval and the verdict on the target.

| model | precision | tch-fabric | raw tch | Lightning | PyTorch | fabric / best Python (target 1.0) \
| fabric / Lightning (MLP target 0.4) |
|---|---|---|---|---|---|---|---|"""

FASTEST_HEAD = """Fastest step of each run, in ms: median of the {n} runs [min-max], the same ratios \
and intervals, and the raw tch loop / Lightning (what the step's libtorch calls alone cost \
against Lightning: no facade can be faster than that).

| model | precision | tch-fabric | Lightning | PyTorch | fabric / best Python (target 1.0) \
| fabric / Lightning (MLP target 0.4) | raw tch / Lightning |
|---|---|---|---|---|---|---|---|"""


def memory_table(mem):
    print("\nPeak memory of training a 50 M-parameter MLP (3 x 4096^2) with AdamW, tch-fabric, "
          "above the process's RSS before the model was built:\n")
    print("| precision | MiB | vs 32-true |")
    print("|---|---|---|")
    for p, m in mem.items():
        print(f"| {p} | {m:.0f} | {m / mem['32-true']:.2f} |")


def report(path):
    """Prints the tables of a stored run (`--json`) again, without running anything."""
    with open(path) as f:
        run = json.load(f)
    print(f"Machine: {run['machine']}\n")
    print(MEDIAN_HEAD.format(n=run["repeats"]))
    for rec in run["steps"]:
        print(median_row(rec))
    print("\n" + FASTEST_HEAD.format(n=run["repeats"]))
    for rec in run["steps"]:
        print(fastest_row(rec))
    memory_table(run["memory_mib"])
    print(f"\nReproduce: {run.get('command', 'scripts/bench.sh')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--precision")
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--json", help="also write every run's numbers to this file")
    ap.add_argument("--report", metavar="JSON", help="print the tables of a stored run (--json) and exit")
    ap.add_argument("--profile", action="store_true", help="(--worker) add one profiled step's ops")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.model, a.precision, a.profile)
    if a.report:
        return report(a.report)
    if not os.path.exists(RUST_BENCH):
        raise SystemExit(f"{RUST_BENCH} is missing: run scripts/bench.sh (it builds it)")
    if a.repeats < 3:
        raise SystemExit("--repeats must be at least 3: fewer runs give no interval")

    run_one = {
        "fabric": lambda m, p: rust(m, p, "fabric"),
        "raw": lambda m, p: rust(m, p, "raw"),
        "lightning": lambda m, p: python("lightning", m, p),
        "torch": lambda m, p: python("torch", m, p),
    }
    only = "" if a.precisions == ",".join(PRECISIONS) else f" --precisions {a.precisions}"
    command = f"scripts/bench.sh --models {a.models}{only} --repeats {a.repeats}"
    print(f"Machine: {machine()}\n")
    print(MEDIAN_HEAD.format(n=a.repeats))
    record = []
    for model_name in a.models.split(","):
        for p in a.precisions.split(","):
            runs = {k: [] for k in KINDS}
            fastest = {k: [] for k in KINDS}
            for r in range(a.repeats):
                order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
                for k in order:
                    out = run_one[k](model_name, p)
                    runs[k].append(out["median_ms"])
                    fastest[k].append(out["min_ms"])
            record.append({"model": model_name, "precision": p, "runs_ms": runs, "fastest_ms": fastest})
            print(median_row(record[-1]), flush=True)
    print("\n" + FASTEST_HEAD.format(n=a.repeats))
    for rec in record:
        print(fastest_row(rec))

    mem = {}
    for p in ["32-true", "bf16-mixed", "16-true", "bf16-true"]:
        r = rust("mlp50m", p, "fabric")
        mem[p] = r["peak_rss_mib"] - r["base_rss_mib"]
    memory_table(mem)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "repeats": a.repeats, "command": command, "steps": record,
                       "memory_mib": mem}, f, indent=1)
    print(f"\nReproduce: {command}")


if __name__ == "__main__":
    main()

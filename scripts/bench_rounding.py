"""bf16-true with stochastic rounding and with Kahan summation, against 32-true and plain
bf16-true, on the demo's model and data; and torchao's bf16 stochastic-rounding AdamW on a
Python twin of the same model and data, to show that the method is the same.

    scripts/bench_rounding.sh                          # builds the demo (release), then runs this
    scripts/bench_rounding.sh --steps 250 1000 --seeds 1 2 3

For each step count and seed, in one process each, interleaved (a round is every run of one
seed back to back, so the runs of a round see the same machine load):
  - the Rust demo (`--precision P [--stochastic-rounding | --kahan]`): 32-true, bf16-true,
    bf16-true + stochastic rounding, bf16-true + Kahan; FusedAdamW, its report gives the
    validation loss, the median step time and the tensor memory (libtorch's CPU allocator,
    counted by tch-fabric);
  - Python, eager: the same GPT (scripts/bench.py's twin of the demo's model) in bfloat16 with
    `torchao.optim._AdamW(bf16_stochastic_round=True)` (eagerly: torch.compile replaced by
    the identity, torchao compiles its step otherwise) and with `torch.optim.AdamW(fused=True)` (plain bf16-true).
Both sides train on the same text (written here, passed to the demo with --data) with the same
batch sequence (the demo's generator, reimplemented below) and the same validation batches;
their initial weights come from different generators, which is why the comparison is
statistical: the spread over seeds is printed beside each median.

The table gives, per run kind, the median validation loss over seeds (min-max), its gap to
32-true's median, the median step time and its ratio to plain bf16-true's (the ratio of the
medians of per-round ratios, so machine load cancels within a round), and the tensor memory.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MASK = (1 << 64) - 1


class Rng:
    """The demo's SplitMix64 (cli/src/bin/demo/corpus.rs)."""

    def __init__(self, seed):
        self.s = seed & MASK

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return self.next_u64() % max(n, 1)


def corpus_text(nbytes=200_000):
    """A text of the demo's generated kind (sentences and sums)."""
    adj = "quick lazy small bright quiet brave old young clever gentle".split()
    noun = "fox dog cat bird robot river teacher farmer engine garden".split()
    verb = "sees follows helps finds watches builds paints carries greets".split()
    rng, out, n = Rng(0x7C4FAB1C), [], 0
    while n < nbytes:
        if rng.below(3) == 0:
            a, b = rng.below(50), rng.below(50)
            s = f"{a}+{b}={a + b}. "
        else:
            w = [rng.below(len(adj)), rng.below(len(noun)), rng.below(len(verb)), rng.below(len(adj)),
                 rng.below(len(noun))]
            s = f"the {adj[w[0]]} {noun[w[1]]} {verb[w[2]]} the {adj[w[3]]} {noun[w[4]]}. "
        if rng.below(8) == 0:
            s += "\n"
        out.append(s)
        n += len(s)
    return "".join(out)


def batch(torch, ids, n_train, batch_size, block, seed, step):
    """The demo's batch `step` (main.rs `batch`): starts drawn by SplitMix64."""
    rng = Rng(seed ^ ((step * 0x2545F4914F6CDD1D) & MASK))
    starts = torch.tensor([rng.below(n_train - block - 1) for _ in range(batch_size)])
    idx = starts[:, None] + torch.arange(block)
    return ids[idx], ids[idx + 1]


def python_run(mode, text, cfg, eval_at, seed):
    """One Python run of max(eval_at) steps: `torchao` (torchao's _AdamW with bf16 stochastic
    rounding) or `fused` (torch.optim.AdamW(fused=True)), the model in bfloat16, gradients
    clipped to norm 1 as the demo clips them; the validation loss after each step of
    `eval_at`."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import build_python

    # torchao compiles its per-parameter step (`torch.compile(single_param_adam, fullgraph=True)`
    # on every call); the identity instead runs it eagerly, op by op.
    torch.compile = lambda fn, *a, **k: fn
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    n = len(ids)
    n_train = n * 9 // 10
    torch.manual_seed(seed)
    model_cls = build_python("gpt", torch)[0].__class__
    model = model_cls(vocab=len(vocab), block=cfg["block"], d=cfg["d_model"], layers=cfg["layers"],
                      heads=cfg["heads"])
    # tch's nn::linear draws its weights from Kaiming-uniform with ReLU's gain, U(+-sqrt(6 /
    # fan_in)), where PyTorch's nn.Linear uses U(+-1 / sqrt(fan_in)); biases and embeddings are
    # drawn alike. The twin draws as the demo does, so both start from the same distribution.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                bound = (6.0 / m.in_features) ** 0.5
                m.weight.uniform_(-bound, bound)
    model = model.bfloat16()
    if mode == "torchao":
        from torchao.optim import _AdamW

        opt = _AdamW(model.parameters(), lr=cfg["lr"], eps=1e-8, weight_decay=0.01,
                     bf16_stochastic_round=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], eps=1e-8, weight_decay=0.01, fused=True)

    def loss_of(x, y):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def validate():
        with torch.no_grad():
            val_ids, count = ids[n_train:], n - n_train
            vb = min(cfg["batch"], max(count - cfg["block"] - 2, 1))
            return statistics.fmean(
                loss_of(*batch(torch, val_ids, count, vb, cfg["block"], 0xABCD + k, 0)).float().item()
                for k in range(4))

    times, val_at = [], {}
    for step in range(max(eval_at)):
        x, y = batch(torch, ids, n_train, cfg["batch"], cfg["block"], seed, step)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_of(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        if step + 1 in eval_at:
            val_at[step + 1] = validate()
    return {"val_at": val_at, "ms_per_step": statistics.median(times[3:] or times) * 1e3}


RUST_RUNS = [
    ("32-true", "32-true", []),
    ("bf16-true", "bf16-true", []),
    ("bf16-true + stochastic rounding", "bf16-true", ["--stochastic-rounding"]),
    ("bf16-true + Kahan", "bf16-true", ["--kahan"]),
]
PYTHON_RUNS = [("torchao _AdamW bf16 SR (Python)", "torchao"), ("torch AdamW fused bf16 (Python)", "fused")]


def rust_run(demo, precision, extra, data, cfg, eval_at, seed, out):
    report = os.path.join(out, "report.json")
    steps = max(eval_at)
    cmd = [demo, "--precision", precision, *extra, "--steps", str(steps), "--seed", str(seed),
           "--eval-at", ",".join(map(str, eval_at)),
           "--data", data, "--out", out, "--report", report, "--checkpoint-every", str(steps),
           "--batch", str(cfg["batch"]), "--block", str(cfg["block"]), "--d-model", str(cfg["d_model"]),
           "--layers", str(cfg["layers"]), "--heads", str(cfg["heads"]), "--lr", str(cfg["lr"])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(report) as f:
        r = json.load(f)
    out = {k: r[k] for k in ("ms_per_step", "peak_mib", "params_mib", "optimizer_mib")}
    out["val_at"] = {s: v for s, v in r["val_at"]}
    return out


def kernel_times(lib, n=1 << 22, reps=15):
    """The optimizer step alone on n bfloat16 parameters: libtorch's _fused_adamw_ (round to
    nearest) against tch-fabric's adamw_rounded_ with stochastic rounding and with Kahan
    summation, medians of `reps` steps (ms)."""
    import torch

    torch.ops.load_library(lib)
    g = torch.Generator().manual_seed(0)

    def state():
        t = [torch.randn(n, generator=g).bfloat16() for _ in range(3)]
        return t + [torch.rand(n, generator=g).bfloat16(), torch.zeros(n, dtype=torch.bfloat16)]

    def timed(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    p, grad, m, v, comp = state()
    step = torch.tensor(10.0)
    out = {"_fused_adamw_ (nearest)": timed(lambda: torch._fused_adamw_(
        [p], [grad], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8,
        amsgrad=False, maximize=False))}
    for name, mode, comps in (("adamw_rounded_ stochastic", 1, []), ("adamw_rounded_ Kahan", 2, [comp])):
        out[name] = timed(lambda: torch.ops.tch_fabric.adamw_rounded_(
            [p], [grad], [m], [v], [], comps, [step], [0], 1e-3, 0.9, 0.999, 0.01, 1e-8, False, mode, 1,
            None, None))
    return out


def machine():
    cpu, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = [f for f in ("amx_bf16", "avx512_bf16", "avx512_fp16") if f in flags] or ["no 16-bit matrix units"]
    return f"{cpu}, {os.cpu_count()} cores, {' '.join(units)}"


def spread(v):
    return f"{statistics.median(v):.4f} ({min(v):.4f}-{max(v):.4f})" if len(v) > 1 else f"{v[0]:.4f}"


def table(steps, runs, seeds):
    """runs: name -> list (per seed) of result dicts; the validation loss after `steps`."""
    print(f"\n### {steps} steps, seeds {' '.join(map(str, seeds))}\n")
    print("| run | val loss, median (min-max) | vs 32-true | ms/step | vs bf16-true | peak MiB | optimizer state MiB |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(r["val_at"][steps] for r in runs["32-true"])
    plain = runs["bf16-true"]
    for name, rs in runs.items():
        vals = [r["val_at"][steps] for r in rs]
        ms = statistics.median(r["ms_per_step"] for r in rs)
        ratio = statistics.median(r["ms_per_step"] / p["ms_per_step"] for r, p in zip(rs, plain))
        mem = rs[0].get("peak_mib")
        print(f"| {name} | {spread(vals)} | {100 * (statistics.median(vals) / base - 1):+.2f}% | {ms:.1f} | "
              f"{ratio:.3f}x | {'-' if mem is None else f'{mem:.2f}'} | "
              f"{'-' if mem is None else '{:.2f}'.format(rs[0]['optimizer_mib'])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="target/release/demo")
    ap.add_argument("--steps", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--python", nargs="*", default=["torchao", "fused"], choices=["torchao", "fused"],
                    help="the Python runs (none: only Rust)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=96)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--json", help="also write every run's numbers here")
    ap.add_argument("--kernel-only", action="store_true", help="only time the optimizer step alone")
    ap.add_argument("--lib", help="the ops library (default: the release build's)")
    args = ap.parse_args()
    cfg = {"batch": args.batch, "block": args.block, "d_model": args.d_model, "layers": args.layers,
           "heads": args.heads, "lr": args.lr}
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    import glob

    lib = args.lib or max(glob.glob("target/release/build/tch-fabric-*/out/libtch_fabric_ops.so"),
                          key=os.path.getmtime)
    times = kernel_times(lib)
    base = times["_fused_adamw_ (nearest)"]
    print(f"\nThe AdamW step alone, 4 M bfloat16 parameters, median of 15 ({torch.get_num_threads()} threads):\n")
    print("| kernel | ms | vs _fused_adamw_ |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x |")
    if args.kernel_only:
        return 0
    print(f"\nmodel: the demo's GPT, d_model {args.d_model}, {args.layers} layers, {args.heads} heads, "
          f"batch {args.batch} x {args.block} tokens, AdamW lr {args.lr}, weight decay 0.01")
    all_runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "corpus.txt")
        text = corpus_text()
        with open(data, "w") as f:
            f.write(text)
        # One run per kind and seed, as long as the longest step count; the shorter ones are
        # read off the same run (validation after each count).
        eval_at = sorted(args.steps)
        python_runs = [r for r in PYTHON_RUNS if r[1] in args.python]
        runs = {name: [] for name, _, _ in RUST_RUNS}
        runs.update({name: [] for name, _ in python_runs})
        for seed in args.seeds:
            for name, precision, extra in RUST_RUNS:
                out = os.path.join(tmp, "out")
                runs[name].append(rust_run(args.demo, precision, extra, data, cfg, eval_at, seed, out))
                print(f"  seed {seed}, {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
            for name, mode in python_runs:
                runs[name].append(python_run(mode, text, cfg, eval_at, seed))
                print(f"  seed {seed}, {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
        for steps in eval_at:
            table(steps, runs, args.seeds)
        all_runs = runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "config": cfg, "runs": all_runs}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

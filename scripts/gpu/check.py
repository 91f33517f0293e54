"""GPU check of tch_fabric's ops library: correctness against PyTorch's own kernels, no host
synchronisation, CUDA-graph capture, and the bandwidth of the one read pass.

Runs where the bundle from scripts/gpu/prepare.sh lands (a GPU machine with its own PyTorch,
no Rust, no package registry):

    python3 check.py                      # the .so next to this file; CUDA when available
    python3 check.py --cpu                # the same correctness checks on the CPU kernel, small
    python3 check.py --lib path/to/libtch_fabric_ops.so --no-bench
    compute-sanitizer --tool memcheck python3 check.py --small --no-bench

Exits non-zero when any check fails. The bandwidth numbers are reported, not enforced (the
target, >= 80% of a device copy, is printed next to them).
"""
import argparse
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

results = []  # (name, status, detail): status is PASS, FAIL, SKIP or NOTE


def check(name, cuda_only=False):
    def wrap(fn):
        def run(ctx):
            if cuda_only and ctx.dev.type != "cuda":
                results.append((name, "SKIP", "needs CUDA"))
                return
            t0 = time.perf_counter()
            try:
                detail = fn(ctx)
                results.append((name, "PASS", f"{detail or ''} ({time.perf_counter() - t0:.1f} s)".strip()))
            except Exception as e:  # every failure is reported, the other checks still run
                results.append((name, "FAIL", f"{type(e).__name__}: {e}"))
                traceback.print_exc()
            print(f"[{results[-1][1]}] {name}: {results[-1][2]}", flush=True)

        run.__name__ = name
        run.fn = fn
        CHECKS.append(run)
        return run

    return wrap


CHECKS = []


class Ctx:
    def __init__(self, dev, small):
        self.dev = dev
        self.small = small
        self.gen = torch.Generator(device="cpu").manual_seed(1234)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def randn(self, n, dtype, spread=1.0):
        # Drawn on the CPU for reproducibility across devices, then moved.
        return (torch.randn(n, generator=self.gen) * spread).to(dtype).to(self.dev)

    def sizes(self):
        # Around the vector widths (4 and 8 elements), the 32768-element chunk and its multiples.
        s = [1, 3, 7, 8, 9, 15, 16, 17, 1000, 32767, 32768, 32769, 65536 + 5, 100_003]
        return s if self.small else s + [1 << 20, (1 << 22) + 3]


def op(grads, found, inv, unscale):
    return torch.ops.tch_fabric.unscale_sumsq_(grads, found, inv, unscale)


def scalar(v, dev):
    return torch.full((), v, dtype=torch.float32, device=dev)


def inv_of(scale, dev):
    # GradScaler's reciprocal: in float64, rounded once to float32.
    return torch.full((), scale, dtype=torch.float64).reciprocal().float().to(dev)


def bits(t):
    return t.contiguous().view(INT_VIEW[t.dtype])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def reference_unscale(grads, inv):
    """PyTorch's result for the unscaled gradients: the native kernel where it exists (CUDA
    lacks bfloat16), else the same math as a composition."""
    out = [g.clone() for g in grads]
    found = torch.zeros((), device=inv.device)
    for dtype in FLOATS:
        group = [g for g in out if g.dtype == dtype]
        if not group:
            continue
        if dtype == torch.bfloat16 and inv.device.type == "cuda":
            for g in group:
                found.fill_(torch.maximum(found, (~torch.isfinite(g.float())).any().float()))
                g.copy_((g.float() * inv).bfloat16())  # v * 1 == v, so no inv == 1 case
        else:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
    return out, found


def sumsq64(grads, inv=None):
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        v = g.float() * inv if inv is not None else g.float()
        total += v.double().pow(2).sum().cpu()
    return total.item()


def close(got, want, rtol=1e-5):
    return abs(got - want) <= rtol * abs(want) + 1e-30


@check("op registered for this device")
def registered(ctx):
    keys = {k: torch._C._dispatch_has_kernel_for_dispatch_key("tch_fabric::unscale_sumsq_", k)
            for k in ("CPU", "CUDA")}
    assert keys["CPU"], "no CPU kernel"
    if ctx.dev.type == "cuda" or ctx.expect_cuda:
        assert keys["CUDA"], "the library has no CUDA kernel (built without ops_cuda.cu?)"
    return ", ".join(k for k, v in keys.items() if v)


@check("unscale is bit-exact with PyTorch (f32/f16 native kernel, bf16 composition)")
def unscale_bits(ctx):
    n = 0
    for dtype in FLOATS:
        for scale in (65536.0, 1000.0, 3.0, 1.0, 0.125):
            # Scaled gradients as a GradScaler produces them (float16 must not overflow).
            grads = [ctx.randn(s, dtype, spread=scale * 1e-2) for s in ctx.sizes()]
            # Edge values: +-0, subnormals, near the maximum of the dtype; their float32 squares
            # may overflow (as in PyTorch's norm), so they go through a call of their own.
            fi = torch.finfo(dtype)
            edge = [torch.tensor([0.0, -0.0, fi.tiny / 4, -fi.tiny, fi.max / 2, -fi.max / 2, 1.0],
                                 dtype=torch.float32).to(dtype).to(ctx.dev)]
            inv = inv_of(scale, ctx.dev)
            want, _ = reference_unscale(grads + edge, inv)
            found = torch.zeros((), device=ctx.dev)
            s = op(grads, found, inv, True)
            op(edge, found, inv, True)
            assert s.dim() == 0 and s.dtype == torch.float32 and s.device == ctx.dev, s
            assert found.item() == 0.0, "found_inf set on finite gradients"
            for g, w in zip(grads + edge, want):
                assert same_bits(g, w), f"{dtype} scale {scale} size {g.numel()}: bits differ"
            # The sum of squares is over the stored (rounded) values.
            want_s = sumsq64(grads)
            assert close(s.item(), want_s), f"{dtype} scale {scale}: sumsq {s.item()} vs float64 {want_s}"
            s2 = op(grads, found, scalar(1.0, ctx.dev), False).item()
            assert close(s2, want_s), f"{dtype} scale {scale}: sumsq {s2} (inv 1) vs float64 {want_s}"
            n += len(grads) + 1
    return f"{n} tensors"


def same_or_both_nan(a, b):
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(bits(a)[~nan], bits(b)[~nan])


@check("degenerate inv_scale (inf from a scale of 0, 0, NaN): as PyTorch, NaN bits aside")
def degenerate(ctx):
    for dtype in FLOATS:
        for inv_value in (float("inf"), 0.0, float("nan")):
            grads = [ctx.randn(s, dtype) for s in (1, 17, 32769)]
            grads[1][3] = 0.0  # 0 * inf = NaN after the check passed: not "found"
            inv = scalar(inv_value, ctx.dev)
            want, want_found = reference_unscale(grads, inv)
            found = torch.zeros((), device=ctx.dev)
            op(grads, found, inv, True)
            assert found.item() == want_found.item() == 0.0, f"{dtype} inv {inv_value}: found_inf"
            for g, w in zip(grads, want):
                assert same_or_both_nan(g, w), f"{dtype} inv {inv_value} size {g.numel()}"
            s = op(grads, found, scalar(1.0, ctx.dev), False).item()
            assert (s != s) == any(bool(g.isnan().any()) for g in grads), f"{dtype} inv {inv_value}: sum {s}"
    return None


@check("unscale=false: gradients untouched, sum of squares of float(v) * inv")
def no_unscale(ctx):
    for dtype in FLOATS:
        for scale in (65536.0, 3.0, 1.0):
            grads = [ctx.randn(s, dtype, spread=scale * 1e-2) for s in ctx.sizes()]
            before = [g.clone() for g in grads]
            inv = inv_of(scale, ctx.dev)
            s = op(grads, torch.zeros((), device=ctx.dev), inv, False).item()
            for g, b in zip(grads, before):
                assert same_bits(g, b), "unscale=false wrote a gradient"
            want = sumsq64(grads, inv)
            assert close(s, want), f"{dtype} scale {scale}: sumsq {s} vs float64 {want}"
    return None


@check("sum of squares is deterministic (same bits, 5 runs)")
def deterministic(ctx):
    grads = [ctx.randn(s, d) for s in ctx.sizes() for d in FLOATS]
    inv = inv_of(1024.0, ctx.dev)
    first = None
    for _ in range(5):
        s = op(grads, torch.zeros((), device=ctx.dev), inv, False)
        first = s if first is None else first
        assert same_bits(s, first), f"{s.item()} vs {first.item()}"
    ref = None
    for _ in range(3):
        g = [x.clone() for x in grads]
        s = op(g, torch.zeros((), device=ctx.dev), inv, True)
        ref = s if ref is None else ref
        assert same_bits(s, ref), f"unscale: {s.item()} vs {ref.item()}"
    return f"{first.item():.6e}"


@check("found_inf: inf/-inf/NaN anywhere, checked before the multiply, never reset")
def found_inf(ctx):
    cases = 0
    sizes = [1, 9, 32768, 32769] + ([] if ctx.small else [100_003])
    for dtype in FLOATS:
        for bad in (float("inf"), float("-inf"), float("nan")):
            for size in sizes:
                for pos in {0, size // 2, size - 1}:
                    for unscale in (True, False):
                        grads = [ctx.randn(s, dtype) for s in sizes]
                        grads[sizes.index(size)][pos] = bad
                        want, want_found = reference_unscale(grads, inv_of(512.0, ctx.dev))
                        found = torch.zeros((), device=ctx.dev)
                        op(grads, found, inv_of(512.0, ctx.dev), unscale)
                        assert found.item() == 1.0, f"{dtype} {bad} at {pos} of {size}: not found"
                        assert want_found.item() == 1.0
                        if unscale:
                            for g, w in zip(grads, want):
                                assert same_or_both_nan(g, w), "non-finite unscale differs"
                        cases += 1
    # A huge finite value times a large inv overflows after the check passed: not found (the
    # native kernel's quirk), but the stored value is inf.
    g = [torch.tensor([3e38], device=ctx.dev)]
    found = torch.zeros((), device=ctx.dev)
    op(g, found, scalar(4.0, ctx.dev), True)
    assert found.item() == 0.0 and g[0].isinf().all(), "overflow after the check"
    # found_inf already 1 stays 1 on finite gradients.
    found = torch.ones((), device=ctx.dev)
    op([ctx.randn(100, torch.float32)], found, scalar(0.5, ctx.dev), True)
    assert found.item() == 1.0, "found_inf was reset"
    return f"{cases} cases"


@check("empty list, empty tensors, views and non-contiguous gradients")
def shapes(ctx):
    found = torch.zeros((), device=ctx.dev)
    s = op([], found, scalar(2.0, ctx.dev), True)
    assert s.item() == 0.0 and found.item() == 0.0 and s.device == ctx.dev
    empties = [torch.empty(0, dtype=d, device=ctx.dev) for d in FLOATS] + [torch.empty(3, 0, device=ctx.dev)]
    s = op(empties, found, scalar(2.0, ctx.dev), True)
    assert s.item() == 0.0 and found.item() == 0.0
    inv = inv_of(3.0, ctx.dev)
    for dtype in FLOATS:
        base = ctx.randn(3 * 40_001, dtype).view(3, 40_001)
        grads = [
            base[:, 1:],  # rows start one element off: unaligned, non-contiguous
            ctx.randn(100_001, dtype)[1:],  # contiguous but unaligned
            ctx.randn(256 * 300, dtype).view(256, 300).t(),  # transposed
            ctx.randn(50_000, dtype)[::2],  # strided
        ] + empties
        want, _ = reference_unscale(grads, inv)
        s = op(grads, found, inv, True)
        for g, w in zip(grads, want):
            assert same_bits(g, w), f"{dtype} view {tuple(g.shape)} {g.stride()}: bits differ"
        assert close(s.item(), sumsq64(grads)), f"{dtype}: sumsq"
        assert found.item() == 0.0
        for g in grads[:4]:  # a NaN at the end of each view is found too
            g[(-1,) * g.dim()] = float("nan")
            f = torch.zeros((), device=ctx.dev)
            op([g], f, inv, False)
            assert f.item() == 1.0, f"{dtype} view {tuple(g.shape)} {g.stride()}: NaN not found"
    return None


@check("mixed dtypes and many tensors in one call (several launches)")
def mixed(ctx):
    gen_sizes = [1 + (i * 7919) % (5_000 if ctx.small else 70_000) for i in range(300)]
    grads = [ctx.randn(s, FLOATS[i % 3], spread=100.0) for i, s in enumerate(gen_sizes)]
    inv = inv_of(100.0, ctx.dev)
    want, _ = reference_unscale(grads, inv)
    found = torch.zeros((), device=ctx.dev)
    s = op(grads, found, inv, True)
    for g, w in zip(grads, want):
        assert same_bits(g, w), f"{g.dtype} {g.numel()}: bits differ"
    assert close(s.item(), sumsq64(grads)), f"sumsq {s.item()} vs {sumsq64(grads)}"
    s2 = op([x.clone() for x in want], found, scalar(1.0, ctx.dev), False).item()
    assert close(s2, sumsq64(want)), f"unscale=false: {s2} vs {sumsq64(want)}"
    return f"{len(grads)} tensors"


@check("bad arguments are errors")
def errors(ctx):
    g = [ctx.randn(10, torch.float32)]
    for found, inv in ((torch.zeros(2, device=ctx.dev), scalar(1.0, ctx.dev)),
                       (torch.zeros((), device=ctx.dev), torch.ones((), dtype=torch.float64, device=ctx.dev))):
        try:
            op(g, found, inv, True)
        except RuntimeError:
            continue
        raise AssertionError("accepted a bad found_inf / inv_scale")
    if ctx.dev.type == "cuda":
        for grads, what in (([torch.zeros(4, device="cpu")], "a CPU gradient"),
                            ([torch.zeros(4, dtype=torch.float64, device=ctx.dev)], "a float64 gradient")):
            try:
                op(grads, torch.zeros((), device=ctx.dev), scalar(1.0, ctx.dev), True)
            except RuntimeError:
                continue
            raise AssertionError(f"accepted {what}")
    return None


def adamw_state(ctx, dtypes, n=4):
    """A few parameters per dtype with AdamW state, grads scaled by 2**16 (one group per dtype,
    since the fused kernel wants one dtype per call)."""
    groups = []
    for dtype in dtypes:
        p = [ctx.randn(s, dtype) for s in (1000, 32768 + 3, 70_000, 5)[:n]]
        groups.append(dict(
            params=p,
            grads=[ctx.randn(x.numel(), dtype, spread=65536.0 * 1e-2) for x in p],
            exp_avgs=[torch.zeros_like(x) for x in p],
            exp_avg_sqs=[torch.zeros_like(x) for x in p],
            steps=[torch.zeros((), device=ctx.dev) for _ in p],
        ))
    return groups


def sync_free_step(groups, found, scale, inv, max_norm=1.0):
    """The 2R+1W AMP step: one read pass (inf check + norm of the unscaled gradients), the clip
    coefficient folded into the divisor, and the fused AdamW that unscales, clips and skips."""
    found.zero_()
    grads = [g for grp in groups for g in grp["grads"]]
    sumsq = op(grads, found, inv, False)
    _norm, divisor = torch.ops.tch_fabric.clip_divisor(sumsq, scale, max_norm)
    for grp in groups:
        torch._foreach_add_(grp["steps"], 1)
        torch._fused_adamw_(grp["params"], grp["grads"], grp["exp_avgs"], grp["exp_avg_sqs"], [],
                            grp["steps"], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8,
                            amsgrad=False, maximize=False, grad_scale=divisor, found_inf=found)
        torch._foreach_sub_(grp["steps"], [found] * len(grp["steps"]))
    return sumsq


def snapshot(groups):
    return [[t.clone() for k in ("params", "exp_avgs", "exp_avg_sqs", "steps") for t in grp[k]] for grp in groups]


def same_snapshot(a, b):
    return all(same_bits(x, y) if x.dtype in INT_VIEW else torch.equal(x, y)
               for ga, gb in zip(a, b) for x, y in zip(ga, gb))


@check("no host sync: op + clip_divisor + _fused_adamw_ under set_sync_debug_mode('error')", cuda_only=True)
def sync_free(ctx):
    groups = adamw_state(ctx, FLOATS)
    # A non-contiguous gradient takes the copy path; it must not sync either (unscale=true).
    nc = ctx.randn(300 * 200, torch.float16).view(300, 200).t()
    scale, inv = scalar(65536.0, ctx.dev), inv_of(65536.0, ctx.dev)
    found = torch.zeros((), device=ctx.dev)
    ctx.sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sync_free_step(groups, found, scale, inv)
            op([nc] + groups[0]["grads"][:1], found, scalar(1.0, ctx.dev), True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ctx.sync()
    return None


def philox4x32(counter, key):
    """Philox 4x32-10 (Random123's definition), in Python: the specification the kernels'
    generator is checked against."""
    c, (k0, k1), m = list(counter), key, 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & m, p1 & m, ((p0 >> 32) ^ c[3] ^ k1) & m, p0 & m]
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c


def expected_rounding(x, seed, position, step):
    """stochastic_round's result by its specification (csrc/rounding.h): element i takes the 16
    random bits j = i % 8 of Philox(counter (i // 8 low, high, step, position), key (seed low,
    high)), word j // 2, half j % 2; the float32 bits plus those 16 bits, truncated."""
    out = []
    for i, u in enumerate(x.view(torch.int32).tolist()):
        u &= 0xFFFFFFFF
        block = i // 8
        words = philox4x32([block & 0xFFFFFFFF, block >> 32, step, position],
                           (seed & 0xFFFFFFFF, seed >> 32))
        r = (words[(i % 8) >> 1] >> (16 * (i % 2))) & 0xFFFF
        out.append(((u + r) & 0xFFFFFFFF) >> 16)
    return out


def rounded_state(dev, mode, n, gen_seed):
    """The bfloat16 state of one tch_fabric::adamw_rounded_ step, drawn on the CPU and moved to
    `dev`: [param, grad, exp_avg, exp_avg_sq] and the Kahan buffers (mode 2)."""
    g = torch.Generator().manual_seed(gen_seed)
    t = [torch.randn(n, generator=g).bfloat16().to(dev) for _ in range(3)]
    t.append(torch.rand(n, generator=g).bfloat16().to(dev))
    comp = [(torch.randn(n, generator=g) * 1e-3).bfloat16().to(dev)] if mode == 2 else []
    return t, comp, torch.tensor(7.0, device=dev)


def rounded_step(state, mode, scale=None, found=None, max_v=()):
    (p, grad, m, v), comp, step = state
    torch.ops.tch_fabric.adamw_rounded_([p], [grad], [m], [v], list(max_v), comp, [step], [3], 1e-3,
                                        0.9, 0.999, 0.01, 1e-8, False, mode, 99, scale, found)


@check("rounded steps (stochastic rounding, Kahan): the device draws the CPU kernel's bits")
def rounding(ctx):
    # stochastic_round: the same bits on every device (Philox keyed by seed, position, step and
    # element index, rounding.h shared by both kernels).
    x = torch.randn(100_003, generator=ctx.gen) * 3
    want = torch.ops.tch_fabric.stochastic_round(x, 7, 3, 11)
    got = torch.ops.tch_fabric.stochastic_round(x.to(ctx.dev), 7, 3, 11).cpu()
    assert same_bits(got, want), "stochastic_round differs from the CPU kernel's bits"
    assert philox4x32([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    spec = expected_rounding(x[:203], 7 + (5 << 32), 3, 11)
    head = torch.ops.tch_fabric.stochastic_round(x[:203].to(ctx.dev), 7 + (5 << 32), 3, 11).cpu()
    assert [v & 0xFFFF for v in bits(head).tolist()] == spec, "the kernel's bits are not Philox's"
    # Unbiased: 1 + 1/512 is a quarter of the way to the next bfloat16.
    ups = torch.ops.tch_fabric.stochastic_round(torch.full((1 << 16,), 1 + 1 / 512).to(ctx.dev), 1, 0, 1)
    frac = (ups.float() > 1).float().mean().item()
    assert abs(frac - 0.25) < 0.01, f"{frac} rounded up, expected 0.25"
    details = []
    for mode in (1, 2):
        cpu, dev = (rounded_state(d, mode, 100_003, mode) for d in (torch.device("cpu"), ctx.dev))
        rounded_step(cpu, mode)
        rounded_step(dev, mode)
        names = ("param", "grad", "exp_avg", "exp_avg_sq", "kahan_comp")
        for name, a, b in zip(names, dev[0] + dev[1], cpu[0] + cpu[1]):
            a = a.cpu()
            assert same_bits(a, b), f"mode {mode}: {name}: {int((bits(a) != bits(b)).sum())} elements differ"
        details.append(f"mode {mode} equal")
        # The CPU kernel's vectorised loop against its element-by-element one (which AMSGrad
        # takes; with a zero running maximum AMSGrad computes what AdamW does).
        tile, scalar = (rounded_state(torch.device("cpu"), mode, 100_003, mode) for _ in range(2))
        rounded_step(tile, mode)
        rounded_step(scalar, mode, max_v=[torch.zeros(100_003, dtype=torch.bfloat16)])
        for a, b in zip(tile[0] + tile[1], scalar[0] + scalar[1]):
            assert same_bits(a, b), f"mode {mode}: the vectorised CPU loop differs from the scalar one"
    if ctx.dev.type == "cuda":
        # No host read: grad_scale, found_inf and the step count stay on the device.
        scale, found = scalar(2.0, ctx.dev), torch.zeros((), device=ctx.dev)
        state = rounded_state(ctx.dev, 1, 4096, 5)
        ctx.sync()
        torch.cuda.set_sync_debug_mode("error")
        try:
            rounded_step(state, 1, scale, found)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        details.append("sync-free")
    return ", ".join(details)


@check("eager step: taken on finite gradients, a skipped step changes nothing")
def eager_skip(ctx):
    groups = adamw_state(ctx, FLOATS)
    scale, inv = scalar(65536.0, ctx.dev), inv_of(65536.0, ctx.dev)
    found = torch.zeros((), device=ctx.dev)
    before = snapshot(groups)
    sync_free_step(groups, found, scale, inv)
    assert found.item() == 0.0 and not same_snapshot(before, snapshot(groups)), "no step taken"
    groups[1]["grads"][2][-1] = float("nan")
    before = snapshot(groups)
    sync_free_step(groups, found, scale, inv)
    assert found.item() == 1.0 and same_snapshot(before, snapshot(groups)), "a skipped step changed the state"
    return None


@check("the step matches PyTorch's composition (unscale, clip_grad_norm_, fused AdamW)")
def composition(ctx):
    ours = adamw_state(ctx, (torch.float32,))
    ref = [{k: [t.clone() for t in v] for k, v in grp.items()} for grp in ours]
    scale, inv = scalar(65536.0, ctx.dev), inv_of(65536.0, ctx.dev)
    found = torch.zeros((), device=ctx.dev)
    s = sync_free_step(ours, found, scale, inv, max_norm=1.0)
    g = ref[0]
    f2 = torch.zeros((), device=ctx.dev)
    torch._amp_foreach_non_finite_check_and_unscale_(g["grads"], f2, inv)
    # clip_grad_norm_'s own steps (torch/nn/utils/clip_grad.py), on plain gradient tensors.
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g["grads"], 2.0)), 2.0)
    max_norm = 1.0
    torch._foreach_mul_(g["grads"], (max_norm / (norm + 1e-6)).clamp(max=1.0))
    torch._foreach_add_(g["steps"], 1)
    torch._fused_adamw_(g["params"], g["grads"], g["exp_avgs"], g["exp_avg_sqs"], [], g["steps"], lr=1e-3,
                        beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)
    assert close(s.sqrt().item(), norm.item(), 1e-5), f"norm {s.sqrt().item()} vs {norm.item()}"
    for a, b in zip(ours[0]["params"], g["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    return f"norm {norm.item():.4g}"


@check("CUDA graph: capture and replay the step; skipped steps change nothing", cuda_only=True)
def graph(ctx):
    groups = adamw_state(ctx, FLOATS)
    eager = [{k: [t.clone() for t in v] for k, v in grp.items()} for grp in groups]
    scale, inv = scalar(65536.0, ctx.dev), inv_of(65536.0, ctx.dev)
    found = torch.zeros((), device=ctx.dev)
    found_e = torch.zeros((), device=ctx.dev)
    new_grads = [[ctx.randn(g.numel(), g.dtype, spread=655.36) for g in grp["grads"]] for grp in groups]

    # Warm up on a side stream, as torch.cuda.graphs asks, on copies so state stays equal.
    warm = [{k: [t.clone() for t in v] for k, v in grp.items()} for grp in groups]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sync_free_step(warm, torch.zeros((), device=ctx.dev), scale, inv)
    torch.cuda.current_stream().wait_stream(s)

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sumsq = sync_free_step(groups, found, scale, inv)
    # Capture ran nothing: replay twice with fresh gradients, eager alongside.
    for step in range(3):
        for grp, grp_e, new in zip(groups, eager, new_grads):
            for t, te, n in zip(grp["grads"], grp_e["grads"], new):
                t.copy_(n * (step + 1))
                te.copy_(n * (step + 1))
        if step == 2:  # an overflow in one bfloat16 gradient: the step must be skipped
            groups[2]["grads"][1][7] = float("inf")
            eager[2]["grads"][1][7] = float("inf")
        before = snapshot(groups)
        g.replay()
        se = sync_free_step(eager, found_e, scale, inv)
        ctx.sync()
        assert same_bits(sumsq, se) or (step == 2 and sumsq.isinf() and se.isinf()), \
            f"step {step}: graph sumsq {sumsq.item()} vs eager {se.item()}"
        assert same_snapshot(snapshot(groups), snapshot(eager)), f"step {step}: graph and eager differ"
        if step < 2:
            assert found.item() == 0.0 and not same_snapshot(before, snapshot(groups)), "no step taken"
        else:
            assert found.item() == 1.0, "overflow not found in the graph"
            assert same_snapshot(before, snapshot(groups)), "a skipped step changed the state"
    return "3 replays, the last skipped"


@check("NCCL: a 1-rank process group all-reduces a CUDA tensor (what strategy('ddp') on CUDA builds)", cuda_only=True)
def nccl_all_reduce(ctx):
    import torch.distributed as dist
    if not dist.is_nccl_available():
        raise AssertionError("this PyTorch has no NCCL")
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        t = torch.arange(1024, dtype=torch.float32, device=ctx.dev)
        dist.all_reduce(t)  # sum over one rank: unchanged
        ctx.sync()
        assert torch.equal(t, torch.arange(1024, dtype=torch.float32, device=ctx.dev)), "changed"
        version = ".".join(map(str, torch.cuda.nccl.version()))
    finally:
        dist.destroy_process_group()
    return f"NCCL {version}"


def bench(ctx, n_total, n_tensors, reps):
    """Times one pass over n_total elements in n_tensors tensors per dtype, against the native
    unscale, native unscale + _foreach_norm, and a device copy of the same bytes."""
    cuda = ctx.dev.type == "cuda"

    def timed(fn):
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = []
    per = n_total // n_tensors
    for dtype in FLOATS:
        grads = [torch.randn(per, device=ctx.dev).to(dtype) for _ in range(n_tensors)]
        nbytes = per * n_tensors * grads[0].element_size()
        src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.dev)
        dst = torch.empty_like(src)
        found = torch.zeros((), device=ctx.dev)
        inv = scalar(1.0 / 1024, ctx.dev)
        t_copy = timed(lambda: dst.copy_(src))
        copy_bw = 2 * nbytes / t_copy
        row = {"dtype": str(dtype).replace("torch.", ""), "copy": (t_copy, 2 * nbytes)}
        row["ours unscale"] = (timed(lambda: op(grads, found, inv, True)), 2 * nbytes)
        row["ours norm only"] = (timed(lambda: op(grads, found, inv, False)), nbytes)
        if not (cuda and dtype == torch.bfloat16):  # PyTorch's CUDA unscale lacks bfloat16
            row["native unscale"] = (timed(lambda: torch._amp_foreach_non_finite_check_and_unscale_(
                grads, found, inv)), 2 * nbytes)
            row["native unscale + norm"] = (timed(lambda: (
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv),
                torch._foreach_norm(grads, 2.0))), 3 * nbytes)
        rows.append((row, copy_bw))
        del grads, src, dst
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(HERE, "libtch_fabric_ops.so"))
    ap.add_argument("--cpu", action="store_true", help="check the CPU kernel even when CUDA is available")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--small", action="store_true",
                    help="small sizes on CUDA too (e.g. under compute-sanitizer, which is slow)")
    ap.add_argument("--expect-cuda-kernel", action="store_true",
                    help="in CPU mode, fail unless the library also registers the CUDA kernel")
    args = ap.parse_args()

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    info = os.path.join(os.path.dirname(os.path.abspath(args.lib)), "BUILD_INFO")
    if os.path.exists(info):
        print(open(info).read().strip())
    try:
        torch.ops.load_library(args.lib)
    except OSError as e:
        print(f"FAIL: cannot load {args.lib}: {e}\n(the library must be built against this machine's "
              f"torch {torch.__version__}: scripts/gpu/prepare.sh <venv with that torch>)")
        return 1

    use_cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda") if use_cuda else torch.device("cpu")
    ctx = Ctx(dev, small=not use_cuda or args.small)
    ctx.expect_cuda = args.expect_cuda_kernel
    if use_cuda:
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
              f"{p.multi_processor_count} SMs")
    else:
        print("device: CPU (no CUDA device, or --cpu): small sizes, CUDA-only checks skipped")
    print()
    for c in CHECKS:
        c(ctx)

    if not args.no_bench:
        n_total, n_tensors, reps = (126_000_000, 64, 20) if use_cuda else (1_000_000, 64, 3)
        print(f"\nbandwidth: {n_total / 1e6:.0f} M elements in {n_tensors} tensors per dtype, median of "
              f"{reps} ({'CUDA events' if use_cuda else 'wall clock, CPU'}); GB/s counts the bytes each "
              "pass must move (unscale: read + write; norm only: read; + norm: 2 reads + write)")
        try:
            rows = bench(ctx, n_total, n_tensors, reps)
            print("| dtype | pass | ms | GB/s | of copy GB/s |")
            print("|---|---|---|---|---|")
            for row, copy_bw in rows:
                for name, v in row.items():
                    if name == "dtype":
                        continue
                    t, traffic = v
                    print(f"| {row['dtype']} | {name} | {t * 1e3:.3f} | {traffic / t / 1e9:.0f} | "
                          f"{traffic / t / copy_bw:.0%} |")
            if use_cuda:
                worst = min(min(r["ours unscale"][1] / r["ours unscale"][0],
                                r["ours norm only"][1] / r["ours norm only"][0]) / bw for r, bw in rows)
                verdict = "met" if worst >= 0.8 else "NOT met"
                print(f"\ntarget >= 80% of copy bandwidth: {verdict} (worst pass {worst:.0%})")
                results.append(("bandwidth target (reported, not enforced)", "NOTE", f"{verdict}, worst {worst:.0%}"))
        except Exception as e:
            results.append(("bandwidth benchmark", "FAIL", f"{type(e).__name__}: {e}"))
            traceback.print_exc()

    print("\nsummary:")
    for name, status, detail in results:
        print(f"  [{status}] {name}{': ' if name else ''}{detail}")
    failed = [r for r in results if r[1] == "FAIL"]
    passed = sum(r[1] == "PASS" for r in results)
    print(f"\n{'FAILED' if failed else 'OK'}: {passed} passed, {len(failed)} failed, "
          f"{sum(r[1] == 'SKIP' for r in results)} skipped on {dev.type}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

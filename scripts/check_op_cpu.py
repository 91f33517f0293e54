"""Exactness checks of the CPU kernel of tch_fabric::unscale_sumsq_ against libtorch's native
`_amp_foreach_non_finite_check_and_unscale_`, on every SIMD path the CPU has (scalar, AVX2,
AVX-512, forced in turn with TCH_FABRIC_OPS_ISA).

    .venv/bin/python scripts/check_op_cpu.py [path of libtch_fabric_ops.so]

(default: the newest target/*/build/tch-fabric-*/out/libtch_fabric_ops.so; tests/ops.rs passes
tch_fabric::ops::OPS_LIBRARY).

Exits non-zero (and says what) on any failure. Checked:
- unscale=true: bits equal to the native kernel's for float32, bfloat16 and float16 (and
  float64), over all 65536 bit patterns of the 16-bit dtypes and a random sweep of float32 bit
  patterns, times many inv_scale values (1, powers of two, 1/3, random ones); the same for edge
  values (+-0, subnormals, near the maxima, inf, NaN); NaNs compared as NaNs, and their bits
  checked against the op's own rule (float16/float32 keep sign and payload, bfloat16 -> 0xFFFF);
- found_inf: set for an inf/NaN at any position (tails, chunk boundaries), checked on the
  original value (overflow by the multiply is not "found"), never reset to 0;
- every size from 0 to 130 and around the chunk size, storage offsets (unaligned views),
  non-contiguous tensors (transposes, strides), neighbours of a view left untouched;
- the sum: over the stored values with unscale=true, over float32 float(v) * inv (unrounded)
  with unscale=false, against a float64 reference to 1e-5 relative; unscale=false leaves the
  gradients' bits alone;
- determinism: the same sum bits run to run, with 1, 2 and 3 threads, and on every SIMD path;
- an empty list, empty tensors, bad arguments.
"""
import glob
import math
import os
import sys
import time

import torch

lib = sys.argv[1] if len(sys.argv) > 1 else max(glob.glob("target/*/build/tch-fabric-*/out/libtch_fabric_ops.so"),
                                                key=os.path.getmtime)
print(lib, flush=True)
torch.ops.load_library(lib)
op = torch.ops.tch_fabric.unscale_sumsq_

failures = []
started = time.perf_counter()


def section(name):
    print(f"{time.perf_counter() - started:7.1f}s {name}", flush=True)


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)


def int_view(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


cpu = flags()
isas = ["scalar"]
if {"avx2", "fma", "f16c"} <= cpu:
    isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu:
        isas.append("avx512")


def native(grads, inv):
    """The native kernel on clones of `grads`: (results, found)."""
    out = [g.clone() for g in grads]
    found = torch.zeros(())
    for dt in {g.dtype for g in out}:
        group = [g for g in out if g.dtype == dt and g.numel() > 0]
        if group:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
    return out, found.item()


def nan_rule(orig, ours, inv):
    """The op's own NaN bits for NaN results: bfloat16 0xFFFF; float16/float32 keep the sign and
    payload of a NaN input, quietened (float32 with inv_scale 1 is not multiplied: unchanged)."""
    nan = ours.isnan()
    if not bool(nan.any()):
        return True
    got = int_view(ours)[nan]
    src = int_view(orig)[nan]
    if ours.dtype == torch.bfloat16:
        return bool((got == -1).all())  # 0xFFFF
    if ours.dtype == torch.float16:
        from_nan = orig[nan].isnan()
        return bool((got[from_nan] == (src[from_nan] | 0x200)).all())
    if ours.dtype == torch.float32:
        from_nan = orig[nan].isnan()
        quiet = 0x400000 if inv != 1.0 else 0
        return bool((got[from_nan] == (src[from_nan] | quiet)).all())
    return True


def same(ours, ref, orig, what, inv):
    """Bits equal where the native result is not NaN; NaN where it is NaN; NaN bits by the rule."""
    a, b = int_view(ours), int_view(ref)
    rn = ref.isnan()
    ok = bool((a[~rn] == b[~rn]).all()) and bool(ours[rn].isnan().all()) and nan_rule(orig, ours, inv)
    if not ok:
        bad = ((a != b) & ~rn).nonzero().flatten()[:5].tolist()
        what += " first differences (index, input, ours, native): " + str(
            [(i, hex(int(int_view(orig)[i])), hex(int(a[i])), hex(int(b[i]))) for i in bad])
    check(ok, what)


def ref_sum(values):
    """float64 sum of squares of the finite float32 values."""
    s = 0.0
    for v in values:
        v = v.double()
        s += float((v[v.isfinite()] ** 2).sum())
    return s


def close(got, want, what, tol=1e-5):
    """Relative tolerance; squares below float32's range may flush (absolute 1e-30), a sum past
    float32's maximum is inf."""
    if want > 3.4028234663852886e38 * (1 + tol):
        ok = got == math.inf
    else:
        ok = (got == want) or (math.isfinite(got) and abs(got - want) <= tol * abs(want) + 1e-30)
    check(ok, f"{what}: sum {got!r} vs float64 {want!r}")


def run(grads, inv, what, exact_nan=False):
    """Runs the op (unscale=true and false) on copies of grads and checks everything."""
    inv_t = torch.tensor(inv, dtype=torch.float32)
    ours = [g.clone() for g in grads]
    found = torch.zeros(())
    s = op(ours, found, inv_t, True).item()
    ref, ref_found = native(grads, inv_t)
    for o, r, g in zip(ours, ref, grads):
        same(o, r, g, f"{what} {g.dtype} {tuple(g.shape)} inv={inv!r}", inv)
        if exact_nan:
            check(torch.equal(int_view(o), int_view(r)), f"{what} {g.dtype}: NaN bits differ from the native loop")
    check(found.item() == ref_found, f"{what}: found_inf {found.item()} vs native {ref_found}")
    finite = [o for o in ours if o.numel() == 0 or bool(o.isfinite().all())]
    if len(finite) == len(ours) and ref_found == 0:
        close(s, ref_sum([o.float() for o in ours]), f"{what} inv={inv!r}")
    # unscale=false: untouched, sum over float32 float(v) * inv
    keep = [g.clone() for g in grads]
    found2 = torch.zeros(())
    s2 = op(keep, found2, inv_t, False).item()
    for k, g in zip(keep, grads):
        check(torch.equal(int_view(k), int_view(g)), f"{what}: unscale=false wrote the gradients")
    check(found2.item() == ref_found, f"{what}: unscale=false found_inf {found2.item()} vs {ref_found}")
    if ref_found == 0:
        vals = [g.float() if inv == 1.0 else g.float() * inv_t for g in grads]
        if all(bool(v.isfinite().all()) for v in vals):
            close(s2, ref_sum(vals), f"{what} unscale=false inv={inv!r}")
    return s, s2


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    invs = [1.0, 0.5, 2.0, 1 / 1024, 1 / 65536, 65536.0, 2.0 ** -24, 2.0 ** -126, 1 / 3, 3.0, 0.9999999, 1e-4, 1e-38]
    invs += [float(10 ** (torch.rand((), generator=g) * 12 - 8)) for _ in range(20)]
    # Negative, zero and non-finite inv_scale values too (degenerate, but the native kernel
    # defines them); |inv_scale| > 1 takes the paths that track inf/NaN per element.
    invs += [-1.0, -1 / 1024, 0.0, math.inf, -math.inf]
    invs = [float(torch.tensor(i, dtype=torch.float32)) for i in invs]

    for isa in isas:
        os.environ["TCH_FABRIC_OPS_ISA"] = isa
        tag = f"[{isa}]"
        torch.set_num_threads(1)
        section(f"{tag} all 16-bit patterns")
        # All 16-bit patterns; 65536 is a multiple of the native loop's 64-element step, so with
        # one thread it writes every element in its vectorised loop and the NaN bits match too.
        allbits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        for dt in (torch.float16, torch.bfloat16):
            x = allbits.view(dt)
            for inv in invs:
                run([x], inv, f"{tag} all {dt} bits", exact_nan=True)
        section(f"{tag} random float32 bits, edge values")
        # Random float32 bit patterns (NaN, inf, subnormals included) and edge values.
        r = torch.randint(-2 ** 31, 2 ** 31, (1 << 20,), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)
        edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, -1.1754942e-38, 1e-40, 3.4028235e38,
                              -3.4028235e38, 3.3e38, 1.0, -1.0, 65504.0, 65520.0, 6.0e-8, 2.9e-8, 3.0e-8,
                              3.3895314e38, 3.3961775e38, 1.5e-39, math.inf, -math.inf, math.nan], dtype=torch.float32)
        for inv in invs:
            run([r], inv, f"{tag} random float32 bits")
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                run([edges.to(dt)], inv, f"{tag} edges")
                run([edges[:-3].to(dt)], inv, f"{tag} finite edges")
        torch.set_num_threads(2)
        section(f"{tag} randn")
        # Random values of realistic sizes, sums checked too.
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = (torch.randn(200_003, generator=g) * 1000).to(dt)
            for inv in (1.0, 1 / 1024, 1 / 3):
                run([x], inv, f"{tag} randn")

        section(f"{tag} sizes, offsets, inf/NaN positions")
        # Sizes, offsets, inf/NaN at every tail position, untouched neighbours.
        sizes = list(range(0, 131)) + [16383, 16384, 16385, 32767, 32768, 32769, 49153, 70001]
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            base = (torch.randn(70001 + 8, generator=g) * 100).to(dt)
            for n in sizes:
                for off in (0, 1, 3) if n <= 130 else (0, 1):
                    grads = [base[off:off + n]]
                    s, _ = run(grads, 1 / 1024, f"{tag} n={n} off={off}")
                    # The op writes the view only.
                    b2 = base.clone()
                    op([b2[off:off + n]], torch.zeros(()), torch.tensor(0.5), True)
                    check(torch.equal(int_view(b2[:off]), int_view(base[:off])) and
                          torch.equal(int_view(b2[off + n:]), int_view(base[off + n:])),
                          f"{tag} {dt} n={n} off={off}: wrote outside the view")
                    if n > 0 and off == 1 and (n <= 130 or n % 2):
                        for pos in sorted({0, n // 2, n - 1, max(0, n - 2), max(0, n - 33)}):
                            for bad in (math.inf, -math.inf, math.nan):
                                b3 = base[off:off + n].clone()
                                b3[pos] = bad
                                f = torch.zeros(())
                                op([b3], f, torch.tensor(0.5), False)
                                check(f.item() == 1.0, f"{tag} {dt} n={n}: {bad} at {pos} not found (unscale=false)")
                                for inv in (0.5, 2.0):  # |inv| > 1 tracks per element
                                    b4 = b3.clone()
                                    f = torch.zeros(())
                                    op([b4], f, torch.tensor(inv), True)
                                    check(f.item() == 1.0, f"{tag} {dt} n={n}: {bad} at {pos} not found (inv {inv})")
                                    check(bool(b4[pos].isnan()) if math.isnan(bad) else b4[pos].item() == bad,
                                          f"{tag} {dt} n={n}: {bad} at {pos} not kept")

        section(f"{tag} non-contiguous")
        # Non-contiguous gradients.
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            m = (torch.randn(301, 77, generator=g) * 50).to(dt)
            views = [m.t(), m[::2], m[:, 1::3], m.t()[5:40, ::7]]
            ours = [v for v in (m.clone().t(), m.clone()[::2], m.clone()[:, 1::3], m.clone().t()[5:40, ::7])]
            ref, _ = native([v.contiguous() for v in views], torch.tensor(1 / 3))
            for v, o, r in zip(views, ours, ref):
                check(not o.is_contiguous(), "the view is not contiguous")
            s = op(ours, torch.zeros(()), torch.tensor(1 / 3), True).item()
            for v, o, r in zip(views, ours, ref):
                same(o.contiguous(), r, v.contiguous(), f"{tag} non-contiguous {dt} {tuple(v.stride())}", 1 / 3)
            close(s, ref_sum([o.float() for o in ours]), f"{tag} non-contiguous {dt}")
            keep = [m.clone().t()]
            check(not keep[0].is_contiguous(), "the view is not contiguous")
            before = int_view(keep[0]).clone()
            s2 = op(keep, torch.zeros(()), torch.tensor(1 / 3), False).item()
            check(torch.equal(int_view(keep[0]), before), f"{tag} non-contiguous unscale=false wrote")
            close(s2, ref_sum([m.float() * torch.tensor(1 / 3)]), f"{tag} non-contiguous unscale=false {dt}")

        # Empty list, empty tensors, found_inf never reset, overflow by the multiply not found.
        f = torch.zeros(())
        s = op([], f, torch.tensor(2.0), True)
        check(s.dtype == torch.float32 and s.dim() == 0 and s.item() == 0.0 and f.item() == 0.0, f"{tag} empty list")
        f = torch.ones(())
        s = op([torch.zeros(0), torch.zeros(0, 5).half(), torch.ones(3).bfloat16()], f, torch.tensor(2.0), True)
        check(s.item() == 12.0 and f.item() == 1.0, f"{tag} empty tensors / found_inf kept at 1")
        for dt, big in ((torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float16, 60000.0)):
            t = torch.full((5,), big).to(dt)
            f = torch.zeros(())
            op([t], f, torch.tensor(4.0), True)
            check(f.item() == 0.0 and bool(t.isinf().all()), f"{tag} {dt}: overflow by the multiply is not found_inf")

    section("determinism")
    # Determinism: the same bits with 1 and 2 threads, run to run, and on every path.
    sizes = [int(s) for s in torch.randint(1, 300_000, (40,), generator=g)] + [1_000_003, 16384 * 7]
    dts = (torch.float32, torch.bfloat16, torch.float16)
    grads = [(torch.randn(n, generator=g) * 10).to(dts[i % 3]) for i, n in enumerate(sizes)]
    results = {}
    for isa in isas:
        os.environ["TCH_FABRIC_OPS_ISA"] = isa
        for threads in (1, 2, 3, 1, 2):
            torch.set_num_threads(threads)
            for unscale in (True, False):
                for inv in (1.0, 1 / 1024):
                    work = [t.clone() for t in grads]
                    s = op(work, torch.zeros(()), torch.tensor(inv), unscale)
                    results.setdefault((unscale, inv), set()).add(int(s.view(torch.int32)))
                    if unscale:
                        results.setdefault(("bits", inv), set()).add(
                            sum(int(int_view(w).long().sum()) for w in work))
    for key, bits in results.items():
        check(len(bits) == 1, f"sum not deterministic over threads/paths for {key}: {bits}")
    torch.set_num_threads(2)
    os.environ.pop("TCH_FABRIC_OPS_ISA", None)

    # Bad arguments are errors.
    for found, inv in ((torch.zeros(2), torch.tensor(1.0)), (torch.zeros((), dtype=torch.float64), torch.tensor(1.0)),
                       (torch.zeros(()), torch.tensor(1.0, dtype=torch.float64)), (torch.zeros(()), torch.ones(2))):
        try:
            op([torch.ones(3)], found, inv, True)
            check(False, f"bad arguments accepted: found {found.shape} {found.dtype}, inv {inv.shape} {inv.dtype}")
        except RuntimeError:
            pass
    try:
        op([torch.ones(3, dtype=torch.int32)], torch.zeros(()), torch.tensor(1.0), True)
        check(False, "an int32 gradient was accepted")
    except RuntimeError:
        pass

    print(f"paths checked: {', '.join(isas)}")
    if failures:
        print(f"{len(failures)} FAILURES")
        sys.exit(1)
    print("all checks passed")


main()

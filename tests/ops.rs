//! The `tch_fabric::unscale_sumsq_` op against PyTorch's own kernels, from Rust and from Python
//! (which loads the very same compiled library with `torch.ops.load_library`).
mod common;

use tch::{Device, Kind, Tensor};
use tch_fabric::ops::{clip_divisor, unscale_sumsq, OPS_LIBRARY};
use tch_fabric::{GradScaler, GradScalerConfig};

fn grads() -> Vec<Tensor> {
    tch::manual_seed(21);
    let mut v = vec![
        Tensor::randn([1000, 37], (Kind::Float, Device::Cpu)) * 1e3,
        Tensor::randn([70_001], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16),
        (Tensor::randn([513], (Kind::Float, Device::Cpu)) * 1e-3).to_kind(Kind::Half),
        Tensor::zeros([0], (Kind::Float, Device::Cpu)),
    ];
    // Values at the edges: +-0, subnormals, near the maxima.
    v.push(Tensor::from_slice(&[
        0.0f32, -0.0, 1e-45, -1e-40, 3.3e38, -3.3e38, 1.0,
    ]));
    v
}

fn bits(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float => t.view_dtype(Kind::Int),
        _ => t.view_dtype(Kind::Int16),
    }
}

fn inv(scale: f64) -> Tensor {
    Tensor::full([], scale, (Kind::Float, Device::Cpu))
        .to_kind(Kind::Double)
        .reciprocal()
        .to_kind(Kind::Float)
}

#[test]
fn unscale_matches_the_native_kernel_bit_for_bit() {
    for scale in [65536.0, 1000.0, 3.0, 1.0] {
        let ours = grads();
        let native = grads();
        let found = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let sumsq = unscale_sumsq(&ours, &found, &inv(scale), true).unwrap();
        let mut scaler = GradScaler::new(
            GradScalerConfig::default()
                .init_scale(scale)
                .allow_fp16_grads(true),
        )
        .unwrap();
        let _ = scaler
            .scale(&Tensor::ones([], (Kind::Float, Device::Cpu)))
            .unwrap();
        scaler.unscale_grads(&native).unwrap();
        for (a, b) in ours.iter().zip(&native) {
            assert!(bits(a).equal(&bits(b)), "scale {scale}: {:?}", a.kind());
        }
        assert_eq!(found.double_value(&[]), 0.0);
        assert!(!scaler.found_inf().unwrap());
        // Squares of values near float32's maximum overflow a float32 sum, as in PyTorch's norm.
        assert!(sumsq.double_value(&[]).is_infinite());
        // Without them, the sum of squares agrees with a float64 reference to float32 rounding.
        let finite = &ours[..ours.len() - 1];
        let sumsq = unscale_sumsq(finite, &found, &inv(1.0), false).unwrap();
        let got = sumsq.double_value(&[]);
        let want = sumsq_f64(finite, &inv(1.0));
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "scale {scale}: {got} vs {want}"
        );
        // unscale=false on the scaled gradients: nothing written, the sum is over the float32
        // values v * inv_scale (not rounded to the storage dtype), i.e. the unscaled norm.
        let scaled = grads();
        let scaled = &scaled[..scaled.len() - 1];
        let before: Vec<Tensor> = scaled.iter().map(|g| bits(g).copy()).collect();
        let sumsq = unscale_sumsq(scaled, &found, &inv(scale), false).unwrap();
        for (g, b) in scaled.iter().zip(&before) {
            assert!(
                bits(g).equal(b),
                "unscale=false wrote a {:?} gradient",
                g.kind()
            );
        }
        let got = sumsq.double_value(&[]);
        let want = sumsq_f64(scaled, &inv(scale));
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "unscale=false, scale {scale}: {got} vs {want}"
        );
        assert_eq!(found.double_value(&[]), 0.0);
    }
}

/// float64 sum of squares of `float32(g) * inv` over the gradients.
fn sumsq_f64(grads: &[Tensor], inv: &Tensor) -> f64 {
    grads
        .iter()
        .map(|g| {
            (g.to_kind(Kind::Float) * inv)
                .to_kind(Kind::Double)
                .pow_tensor_scalar(2)
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum()
}

#[test]
fn sum_is_deterministic_and_overflow_is_found() {
    let a = unscale_sumsq(
        &grads(),
        &Tensor::zeros([], (Kind::Float, Device::Cpu)),
        &inv(1.0),
        false,
    )
    .unwrap();
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        let b = unscale_sumsq(
            &grads(),
            &Tensor::zeros([], (Kind::Float, Device::Cpu)),
            &inv(1.0),
            false,
        )
        .unwrap();
        assert!(
            bits(&a).equal(&bits(&b)),
            "same bits with {threads} threads"
        );
    }
    let mut g = grads();
    g.push(Tensor::from_slice(&[1.0f32, f32::NAN]).to_kind(Kind::BFloat16));
    let found = Tensor::zeros([], (Kind::Float, Device::Cpu));
    let before = bits(&g[0]).copy();
    let _ = unscale_sumsq(&g, &found, &inv(4.0), false).unwrap();
    assert_eq!(found.double_value(&[]), 1.0);
    assert!(
        bits(&g[0]).equal(&before),
        "unscale=false leaves the gradients alone"
    );
    // Empty list: nothing found, zero sum.
    let found = Tensor::zeros([], (Kind::Float, Device::Cpu));
    let s = unscale_sumsq(&[], &found, &inv(2.0), true).unwrap();
    assert_eq!((s.double_value(&[]), found.double_value(&[])), (0.0, 0.0));
    // Bad arguments are errors, not crashes.
    let bad = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    assert!(unscale_sumsq(&grads(), &bad, &inv(2.0), true).is_err());
}

#[test]
fn clip_divisor_folds_pytorchs_clip_coefficient_into_the_scale() {
    let sumsq = Tensor::full([], 36.0, (Kind::Float, Device::Cpu)); // norm 6
    let scale = Tensor::full([], 1024.0, (Kind::Float, Device::Cpu));
    let (norm, d) = clip_divisor(&sumsq, &scale, 1.0).unwrap();
    assert_eq!(
        norm.double_value(&[]),
        6.0,
        "the norm comes with the divisor"
    );
    let coef = (Tensor::full([], 6.0, (Kind::Float, Device::Cpu)) + 1e-6).reciprocal() * 1.0;
    let want = &scale / coef;
    assert!(
        d.equal(&want),
        "{} vs {}",
        d.double_value(&[]),
        want.double_value(&[])
    );
    // No clipping needed: the divisor is the scale itself.
    let (_, d) = clip_divisor(&sumsq, &scale, 100.0).unwrap();
    assert_eq!(d.double_value(&[]), 1024.0);
}

/// Python loads the same library and checks the op against torch's kernels.
#[test]
fn python_loads_the_same_op() {
    let out = common::run_python(
        r#"
import sys, torch
torch.ops.load_library(sys.stdin.read().strip())
torch.manual_seed(0)
g = [torch.randn(4096) * 100, torch.randn(333).bfloat16(), torch.randn(77).half()]
orig = [t.clone() for t in g]
ref = [t.clone() for t in g]
found, ref_found = torch.zeros(()), torch.zeros(())
inv = torch.full((), 1000.0).double().reciprocal().float()
s = torch.ops.tch_fabric.unscale_sumsq_(g, found, inv, True)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    group = [t for t in ref if t.dtype == dt]
    torch._amp_foreach_non_finite_check_and_unscale_(group, ref_found, inv)
bits = lambda t: t.view(torch.int16 if t.element_size() == 2 else torch.int32)
same = all(torch.equal(bits(a), bits(b)) for a, b in zip(g, ref))
want = sum(float((t.double() ** 2).sum()) for t in ref)
# unscale=false on the scaled gradients: untouched, sum over float32 v * inv (unrounded).
keep = [t.clone() for t in orig]
s2 = torch.ops.tch_fabric.unscale_sumsq_(keep, torch.zeros(()), inv, False)
untouched = all(torch.equal(bits(a), bits(b)) for a, b in zip(keep, orig))
want2 = sum(float(((t.float() * inv).double() ** 2).sum()) for t in orig)
print(same, found.item() == ref_found.item(), abs(s.item() - want) / want < 1e-5,
      untouched, abs(s2.item() - want2) / want2 < 1e-5)
"#,
        OPS_LIBRARY,
    );
    assert_eq!(out.trim(), "True True True True True", "{out}");
}

/// scripts/check_op_cpu.py on the crate's library: bits against the native kernel over all
/// 16-bit patterns and many scales, tails, offsets, strides, NaN/inf anywhere, determinism with
/// 1 and 2 threads, on every SIMD path the CPU has.
#[test]
fn python_exhaustive_checks_pass() {
    let script = common::repo().join("scripts/check_op_cpu.py");
    let out = std::process::Command::new(common::python())
        .arg(&script)
        .arg(OPS_LIBRARY)
        .output()
        .expect("start python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}", text);
    assert!(text.contains("all checks passed"), "{}", text);
}

/// `tch_fabric::adamw_folded_` (the folded step's AdamW, which does not write the gradients
/// back) against `torch._fused_adamw_` given the same divisor, from Python: agreement within
/// 1e-6 relative over several steps, a found_inf step changes nothing, the gradients stay as they were.
#[test]
fn adamw_folded_matches_pytorchs_fused_adamw() {
    let out = common::run_python(
        r#"
import sys, torch
torch.ops.load_library(sys.stdin.read().strip())
torch.manual_seed(0)
shapes = [(1000, 37), (70_001,), (3,)]
p1 = [torch.randn(s) for s in shapes]
p2 = [t.clone() for t in p1]
m1, v1 = [torch.zeros_like(t) for t in p1], [torch.zeros_like(t) for t in p1]
m2, v2 = [torch.zeros_like(t) for t in p1], [torch.zeros_like(t) for t in p1]
s1, s2 = [torch.zeros(()) for _ in p1], [torch.zeros(()) for _ in p1]
worst, grads_kept, skip_ok = 0.0, True, True
for step in range(6):
    g = [torch.randn(s) * 512 for s in shapes]
    div = torch.full((), 512.0 / (0.5 + step / 4))
    found = torch.full((), 1.0 if step == 3 else 0.0)
    before = [t.clone() for t in p1]
    kept = [t.clone() for t in g]
    for s in s1: s.add_(1)
    torch.ops.tch_fabric.adamw_folded_(p1, g, m1, v1, s1, 1e-2, 0.9, 0.999, 0.01, 1e-8, False, div, found)
    for s in s1: s.sub_(found)
    grads_kept &= all(torch.equal(a, b) for a, b in zip(g, kept))
    if step == 3:
        skip_ok &= all(torch.equal(a, b) for a, b in zip(p1, before))
    g2 = [t.clone() for t in kept]
    for s in s2: s.add_(1)  # as torch.optim.AdamW does around the kernel
    torch._fused_adamw_(p2, g2, m2, v2, [], s2, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01,
                        eps=1e-8, amsgrad=False, maximize=False, grad_scale=div, found_inf=found)
    for s in s2: s.sub_(found)
    # Relative to the weights: the division rounds differently in float32's last bits.
    worst = max(worst, max(float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) for a, b in zip(p1, p2)))
print(worst < 1e-6, grads_kept, skip_ok, all(torch.equal(a, b) for a, b in zip(s1, s2)))
"#,
        OPS_LIBRARY,
    );
    assert_eq!(out.trim(), "True True True True", "{out}");
}

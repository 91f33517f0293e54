//! The Fabric facade: setup per precision, the forward's conversions, the autocast scope,
//! backward, clipping, stepping with a scaler, several optimizers, schedules, bad input.
mod common;

use common::cpu;
use std::cell::RefCell;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{
    default_dtype::default_dtype, lr_scheduler::ClosureLR, Clip, Error, Fabric, GradScalerConfig,
    Precision, StepOutcome, TchOptimizer,
};

/// Lightning's message when a mixed-precision step sees no `fabric.backward` call.
const BACKWARD_MESSAGE: &str = "The current strategy and precision selection requires you to call `fabric.backward(loss)` instead of `loss.backward()`.";

fn cpu_fp16(init_scale: f64) -> Fabric {
    common::cpu_fp16(
        GradScalerConfig::default()
            .init_scale(init_scale)
            .growth_interval(5),
    )
}

/// The default dtype is process-wide: tests that switch it (the opt-in default-dtype scope of
/// `-true` precisions) or look at it take this lock so parallel tests do not see each other's
/// value.
static DEFAULT_DTYPE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn dtype_lock() -> std::sync::MutexGuard<'static, ()> {
    DEFAULT_DTYPE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A linear layer that records what its forward saw.
#[derive(Debug)]
struct Probe {
    w: Tensor,
    seen: RefCell<Vec<(Kind, Kind, Kind)>>, // (input, matmul output, default dtype)
}

impl Probe {
    fn new(vs: &nn::VarStore) -> Self {
        Probe {
            w: vs.root().randn("w", &[4, 3], 0.0, 1.0),
            seen: RefCell::new(Vec::new()),
        }
    }
}

impl Module for Probe {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let y = xs.matmul(&self.w);
        self.seen
            .borrow_mut()
            .push((xs.kind(), y.kind(), default_dtype().unwrap()));
        y
    }
}

fn x() -> Tensor {
    Tensor::randn([2, 4], (Kind::Float, Device::Cpu))
}

#[test]
fn setup_and_forward_follow_lightning_for_every_precision() {
    let _lock = dtype_lock();
    use Kind::*;
    // precision, parameter kind, (input seen, matmul kind, default dtype inside), output kind.
    // The default dtype stays float32: the -true precisions change no process-wide state.
    let table = [
        ("64-true", Double, (Double, Double, Float), Float),
        ("32-true", Float, (Float, Float, Float), Float),
        ("bf16-mixed", Float, (BFloat16, BFloat16, Float), Float),
        ("16-true", Half, (Half, Half, Float), Float),
        ("bf16-true", BFloat16, (BFloat16, BFloat16, Float), Float),
    ];
    for (p, param, seen, out) in table {
        let fabric = cpu(p);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = Probe::new(&vs);
        let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
        let (model, _opt) = fabric.setup(model, &mut vs, opt).unwrap();
        assert_eq!(vs.variables()["w"].kind(), param, "{p}: parameters");
        let y = model.forward(&x());
        assert_eq!(y.kind(), out, "{p}: output");
        assert_eq!(
            model.module().seen.borrow()[0],
            seen,
            "{p}: inside the forward"
        );
        assert_eq!(
            default_dtype().unwrap(),
            Float,
            "{p}: default dtype restored"
        );
    }
}

/// Lightning's default-dtype switch around `-true` forwards, when asked for, is process-wide:
/// another thread sees it while the forward runs, and it is restored afterwards.
#[test]
fn the_opt_in_default_dtype_scope_is_lightnings_and_process_wide() {
    let _lock = dtype_lock();
    for (p, dtype) in [("64-true", Kind::Double), ("bf16-true", Kind::BFloat16)] {
        let fabric = Fabric::builder()
            .precision(p)
            .accelerator("cpu")
            .process_wide_default_dtype(true)
            .build()
            .unwrap();
        assert!(fabric.to_string().contains("process-wide"), "{fabric}");
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = Probe::new(&vs);
        let model = fabric.setup_module(model, &mut vs).unwrap();
        let _ = model.forward(&x());
        assert_eq!(model.module().seen.borrow()[0].2, dtype, "{p}: inside");
        {
            let _scope = fabric.autocast().unwrap();
            let elsewhere = std::thread::spawn(|| default_dtype().unwrap())
                .join()
                .unwrap();
            assert_eq!(elsewhere, dtype, "{p}: another thread sees the switch");
        }
        assert_eq!(default_dtype().unwrap(), Kind::Float, "{p}: restored");
    }
}

#[test]
fn input_conversion_can_be_turned_off() {
    let _lock = dtype_lock();
    let fabric = cpu("bf16-mixed");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Probe::new(&vs);
    let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    let (model, _opt) = fabric.setup(model, &mut vs, opt).unwrap();
    let model = model.convert_inputs(false);
    let y = model.try_forward(&x()).unwrap();
    assert_eq!(y.kind(), Kind::Float);
    assert_eq!(
        model.module().seen.borrow()[0],
        (Kind::Float, Kind::BFloat16, Kind::Float),
        "float32 input, bfloat16 compute under autocast"
    );
    // Non-floating inputs are never converted.
    let fabric = cpu("64-true");
    let vs = nn::VarStore::new(Device::Cpu);
    let emb = nn::embedding(vs.root() / "e", 10, 3, Default::default());
    let mut vs = vs;
    let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    let (emb, _opt) = fabric.setup(emb, &mut vs, opt).unwrap();
    let out = emb.forward(&Tensor::from_slice(&[1i64, 2]));
    assert_eq!(out.kind(), Kind::Float);
}

#[test]
fn fabric_autocast_is_the_precisions_scope() {
    let _lock = dtype_lock();
    let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
    {
        let fabric = cpu("bf16-mixed");
        let _ac = fabric.autocast().unwrap();
        assert_eq!(a.mm(&a).kind(), Kind::BFloat16);
    }
    {
        let fabric = cpu("64-true");
        let _ac = fabric.autocast().unwrap();
        assert_eq!(
            default_dtype().unwrap(),
            Kind::Float,
            "nothing process-wide by default"
        );
    }
    {
        let fabric = cpu("32-true");
        let _ac = fabric.autocast().unwrap();
        assert_eq!(a.mm(&a).kind(), Kind::Float);
    }
    assert_eq!(a.mm(&a).kind(), Kind::Float);
    assert_eq!(default_dtype().unwrap(), Kind::Float);
}

#[test]
fn precision_values_as_lightning_accepts_them() {
    assert_eq!(
        Fabric::new(Precision::F64True).unwrap().precision(),
        Precision::F64True
    );
    let f = Fabric::builder()
        .precision(64)
        .accelerator("cpu")
        .build()
        .unwrap();
    assert_eq!(f.precision(), Precision::F64True);
    let f = Fabric::builder()
        .precision("bf16")
        .accelerator("cpu")
        .build()
        .unwrap();
    assert_eq!(f.precision(), Precision::Bf16Mixed);
    // 16-mixed on CPU: Lightning's fallback to bf16-mixed, or real float16 when asked.
    let f = Fabric::builder()
        .precision(16)
        .accelerator("cpu")
        .build()
        .unwrap();
    assert_eq!(f.precision(), Precision::Bf16Mixed);
    assert_eq!(f.loss_scale().unwrap(), 1.0);
    let f = cpu_fp16(65536.0);
    assert_eq!(f.precision(), Precision::F16Mixed);
    assert_eq!(f.loss_scale().unwrap(), 65536.0);
    assert_eq!(
        Fabric::new("32-true").unwrap().precision(),
        Precision::F32True
    );
    assert_eq!(
        Fabric::builder().build().unwrap().precision(),
        Precision::F32True
    );
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let e = Fabric::new("fp16").unwrap_err();
    assert!(matches!(e, Error::InvalidPrecision { .. }), "{e}");
    let e = Fabric::builder().accelerator("tpu").build().unwrap_err();
    assert!(
        e.to_string()
            .contains("one of 'cpu', 'cuda', 'gpu', 'auto'"),
        "{e}"
    );
    if !tch::Cuda::is_available() {
        let e = Fabric::builder().accelerator("cuda").build().unwrap_err();
        assert!(e.to_string().contains("no CUDA device"), "{e}");
    }
    // Several devices need one process each: without a launcher that is an error naming it.
    let e = Fabric::builder()
        .devices(2)
        .accelerator("cpu")
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, Error::Distributed(m) if m.contains("fabric run --devices 2")),
        "{e}"
    );
    let e = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(GradScalerConfig::default().backoff_factor(2.0))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "backoff_factor",
                ..
            }
        ),
        "{e}"
    );
}

fn linear_setup(
    fabric: &Fabric,
    prefix: &str,
) -> (
    tch_fabric::FabricModule<nn::Linear>,
    tch_fabric::FabricOptimizer,
    nn::VarStore,
) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / prefix, 4, 2, Default::default());
    let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    let (m, o) = fabric.setup(model, &mut vs, opt).unwrap();
    (m, o, vs)
}

fn loss_of(fabric: &Fabric, m: &tch_fabric::FabricModule<nn::Linear>) -> Tensor {
    let out = m.forward(&x());
    let _ac = fabric.autocast().unwrap();
    out.pow_tensor_scalar(2).mean(Kind::Float)
}

#[test]
fn plain_backward_under_a_mixed_precision_is_refused_at_the_step() {
    for p in ["bf16-mixed", "16-mixed"] {
        let fabric = if p == "16-mixed" {
            cpu_fp16(1024.0)
        } else {
            cpu(p)
        };
        let (m, mut opt, vs) = linear_setup(&fabric, "fc");
        let before = vs.variables()["fc.weight"].copy();
        loss_of(&fabric, &m).backward();
        let e = opt.step().unwrap_err();
        assert_eq!(e.to_string(), BACKWARD_MESSAGE, "{p}");
        assert!(
            vs.variables()["fc.weight"].equal(&before),
            "{p}: no step was taken"
        );
        opt.zero_grad().unwrap();
        fabric.backward(&loss_of(&fabric, &m)).unwrap();
        opt.step().unwrap();
        assert!(!vs.variables()["fc.weight"].equal(&before), "{p}");
    }
    // 32-true has no scaler and accepts a plain backward, as Lightning does.
    let fabric = cpu("32-true");
    let (m, mut opt, _vs) = linear_setup(&fabric, "fc");
    loss_of(&fabric, &m).backward();
    assert_eq!(opt.step().unwrap(), StepOutcome::Stepped);
}

#[test]
fn overflow_steps_are_skipped_reported_and_change_nothing() {
    let fabric = cpu_fp16(2f64.powi(40));
    let (m, mut opt, vs) = linear_setup(&fabric, "fc");
    let mut skipped = 0;
    for _ in 0..30 {
        opt.zero_grad().unwrap();
        let x = Tensor::full([2, 4], 1000.0, (Kind::Float, Device::Cpu));
        let out = m.forward(&x);
        let loss = {
            let _ac = fabric.autocast().unwrap();
            out.mse_loss(
                &Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
                Reduction::Mean,
            )
        };
        fabric.backward(&loss).unwrap();
        let before = vs.variables()["fc.weight"].copy();
        let scale = fabric.loss_scale().unwrap();
        match opt.step().unwrap() {
            StepOutcome::Skipped {
                scale_before,
                scale_after,
                ..
            } => {
                skipped += 1;
                assert_eq!(scale_before, scale);
                assert_eq!(scale_after, scale / 2.0);
                assert_eq!(
                    fabric.loss_scale().unwrap(),
                    scale / 2.0,
                    "updated at once: one optimizer"
                );
                assert!(vs.variables()["fc.weight"].equal(&before));
            }
            StepOutcome::Stepped => assert!(!vs.variables()["fc.weight"].equal(&before)),
            StepOutcome::Queued => panic!("tch's optimizers step on the host's decision"),
        }
    }
    assert!(
        skipped > 3,
        "a 2^40 scale overflows float16 at first: {skipped}"
    );
    assert_eq!(fabric.skipped_steps().unwrap(), skipped);
}

#[test]
fn several_optimizers_update_the_scale_once_per_iteration() {
    let fabric = cpu_fp16(2f64.powi(40));
    let (m1, mut o1, _v1) = linear_setup(&fabric, "a");
    let (m2, mut o2, _v2) = linear_setup(&fabric, "b");
    let big = Tensor::full([2, 4], 1000.0, (Kind::Float, Device::Cpu));
    let loss = {
        let out = m1.forward(&big) + m2.forward(&big);
        let _ac = fabric.autocast().unwrap();
        out.pow_tensor_scalar(2).mean(Kind::Float)
    };
    fabric.backward(&loss).unwrap();
    assert!(o1.step().unwrap().is_skipped());
    assert_eq!(
        fabric.loss_scale().unwrap(),
        2f64.powi(40),
        "not updated before every optimizer stepped"
    );
    assert!(o2.step().unwrap().is_skipped());
    assert_eq!(
        fabric.loss_scale().unwrap(),
        2f64.powi(39),
        "one back-off for the iteration (Lightning would back off twice)"
    );
}

#[test]
fn clipping_unscales_once_and_survives_an_overflow_step() {
    let fabric = cpu_fp16(2f64.powi(40));
    let (m, mut opt, vs) = linear_setup(&fabric, "fc");
    let big = Tensor::full([2, 4], 1000.0, (Kind::Float, Device::Cpu));
    opt.zero_grad().unwrap();
    let loss = {
        let out = m.forward(&big);
        let _ac = fabric.autocast().unwrap();
        out.pow_tensor_scalar(2).mean(Kind::Float)
    };
    fabric.backward(&loss).unwrap();
    let norm = fabric
        .clip_gradients(&mut opt, Clip::norm(1.0))
        .unwrap()
        .value()
        .unwrap();
    assert!(
        !norm.is_finite(),
        "the overflow is reported as a non-finite norm: {norm}"
    );
    // Clipping again in the same iteration does not hit "unscale_() has already been called".
    fabric.clip_gradients(&mut opt, Clip::norm(1.0)).unwrap();
    let e = fabric
        .clip_gradients(&mut opt, Clip::norm(1.0).error_if_nonfinite(true))
        .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "The total norm of order 2.0 for gradients from `parameters` is non-finite"
        ),
        "{e}"
    );
    let before = vs.variables()["fc.weight"].copy();
    assert!(opt.step().unwrap().is_skipped());
    assert!(vs.variables()["fc.weight"].equal(&before));

    // A clean step: norm clipping scales the gradients to max_norm.
    let fabric = cpu("32-true");
    let (m, mut opt, _vs) = linear_setup(&fabric, "fc");
    fabric.backward(&loss_of(&fabric, &m)).unwrap();
    let norm = fabric
        .clip_gradients(&mut opt, Clip::norm(1e-3))
        .unwrap()
        .value()
        .unwrap();
    let grads: Vec<Tensor> = opt
        .gradients()
        .unwrap()
        .into_iter()
        .map(|(_, g)| g)
        .collect();
    let after = tch_fabric::clip::total_norm(&grads, 2.0)
        .unwrap()
        .double_value(&[]);
    assert!(
        norm > 1e-3 && (after - 1e-3).abs() < 1e-6,
        "{norm} -> {after}"
    );
    // Value clipping clamps every element.
    let norm = fabric
        .clip_gradients(&mut opt, Clip::value(1e-5))
        .unwrap()
        .value()
        .unwrap();
    assert!((norm - after).abs() < 1e-9);
    for g in &grads {
        assert!(g.abs().max().double_value(&[]) <= 1e-5 + 1e-12);
    }
    for bad in [
        Clip::norm(-1.0),
        Clip::norm(f64::NAN),
        Clip::value(-0.5),
        Clip::value(f64::INFINITY),
    ] {
        let e = fabric.clip_gradients(&mut opt, bad).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{bad:?}: {e}");
    }
}

#[test]
fn lr_schedule_does_not_advance_on_skipped_steps() {
    let fabric = cpu_fp16(2f64.powi(40));
    let (m, mut opt, _vs) = linear_setup(&fabric, "fc");
    let mut sched = ClosureLR::new(|n| 0.1 / (1.0 + n as f64));
    let mut taken = 0;
    for _ in 0..20 {
        opt.zero_grad().unwrap();
        let big = Tensor::full([2, 4], 100.0, (Kind::Float, Device::Cpu));
        let loss = {
            let out = m.forward(&big);
            let _ac = fabric.autocast().unwrap();
            out.pow_tensor_scalar(2).mean(Kind::Float)
        };
        fabric.backward(&loss).unwrap();
        let outcome = opt.step().unwrap();
        if !outcome.is_skipped() {
            taken += 1;
        }
        sched.step(&outcome, &mut opt).unwrap();
    }
    assert_eq!(sched.steps(), taken);
    assert_eq!(sched.steps() + fabric.skipped_steps().unwrap(), 20);
    assert!(fabric.skipped_steps().unwrap() > 0);
}

#[test]
fn setting_up_the_same_names_twice_is_refused() {
    let fabric = cpu("32-true");
    let (_m, _o, _vs) = linear_setup(&fabric, "fc");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    let e = fabric.setup(model, &mut vs, opt).unwrap_err();
    assert!(e.to_string().contains("already set up"), "{e}");
}

#[test]
fn memory_stats_on_cpu() {
    let fabric = cpu("32-true");
    let m = fabric.memory_stats().unwrap();
    assert!(m.peak_bytes >= m.current_bytes, "{m:?}");
    // A Fabric on the CPU counts tensor bytes (tests/memory.rs checks them to the byte).
    assert_eq!(m.source, tch_fabric::memory::MemorySource::CpuTensors);
    assert_eq!((m.reserved_bytes, m.peak_reserved_bytes), (None, None));
    let t = Tensor::ones([64 << 20], (Kind::Float, Device::Cpu));
    assert!(fabric.memory_stats().unwrap().current_bytes >= 256 << 20);
    drop(t);
    let before = fabric.memory_stats().unwrap();
    assert!(before.peak_bytes >= 256 << 20, "{before:?}");
    tch_fabric::reset_peak_memory_stats(Device::Cpu).unwrap();
    let after = fabric.memory_stats().unwrap();
    assert!(
        after.peak_bytes < before.peak_bytes - (200 << 20),
        "{before:?} -> {after:?}"
    );
}

#[test]
fn process_rss_is_the_resident_set() {
    let m = tch_fabric::memory::process_rss().unwrap();
    assert!(
        m.current_bytes > 0 && m.peak_bytes >= m.current_bytes,
        "{m:?}"
    );
    assert_eq!(m.source, tch_fabric::memory::MemorySource::ProcessRss);
    // 256 MiB touched and freed raises the peak; a reset brings it back near the current RSS.
    drop(Tensor::ones([64 << 20], (Kind::Float, Device::Cpu)));
    let before = tch_fabric::memory::process_rss().unwrap();
    assert!(
        before.peak_bytes >= before.current_bytes + (200 << 20),
        "{before:?}"
    );
    tch_fabric::memory::reset_process_rss_peak().unwrap();
    let after = tch_fabric::memory::process_rss().unwrap();
    assert!(
        after.peak_bytes < before.peak_bytes - (200 << 20),
        "{before:?} -> {after:?}"
    );
}

#[test]
fn memory_stats_refuse_a_cuda_device_this_process_does_not_see() {
    let count = tch::Cuda::device_count();
    let index = usize::try_from(count).unwrap();
    for e in [
        tch_fabric::memory_stats(Device::Cuda(index)).unwrap_err(),
        tch_fabric::reset_peak_memory_stats(Device::Cuda(index)).unwrap_err(),
    ] {
        assert!(matches!(e, tch_fabric::Error::Usage(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("no CUDA device {index}"))
                && msg.contains(&format!("sees {count} CUDA")),
            "{msg}"
        );
    }
    assert!(tch_fabric::memory_stats(Device::Mps).is_err());
}

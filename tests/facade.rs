//! The facade as tch code uses it: `FabricModule` is a tch `Module`; models with several
//! outputs and other methods run under the precision through `run`; models without an
//! optimizer; two models whose variables share names; misuse refused; what a Fabric decided
//! and a run of skipped steps made visible.
mod common;

use common::cpu;

use std::cell::RefCell;
use tch::{nn, nn::Module, nn::ModuleT, Device, Kind, Reduction, Tensor};
use tch_fabric::{
    Clip, Error, Fabric, FusedAdamW, FusedSgd, GradScalerConfig, Precision, StepOutcome,
};

fn cpu_fp16(init_scale: f64, warn_after: u64) -> Fabric {
    common::cpu_fp16(
        GradScalerConfig::default()
            .init_scale(init_scale)
            .warn_after_skips(warn_after),
    )
}

#[test]
fn a_fabric_module_is_a_tch_module() {
    let fabric = cpu("bf16-mixed");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::seq()
        .add(nn::linear(vs.root() / "l1", 4, 8, Default::default()))
        .add_fn(|x| x.relu());
    let model = fabric.setup_module(model, &mut vs).unwrap();
    let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    let applied = x.apply(&model);
    let forward = model.forward(&x);
    let tried = model.try_forward(&x).unwrap();
    assert_eq!(applied.kind(), Kind::Float, "outputs come back as float32");
    assert!(applied.equal(&forward) && applied.equal(&tried));
    // A FabricModule composes like any tch module.
    let seq = nn::seq().add(model).add_fn(|x| x.sum(Kind::Float));
    assert_eq!(x.apply(&seq).kind(), Kind::Float);
}

/// A model whose forward records what it saw and returns several tensors.
#[derive(Debug)]
struct Vae {
    enc: nn::Linear,
    dec: nn::Linear,
    seen: RefCell<Vec<(Kind, bool)>>,
}

impl Vae {
    fn new(vs: &nn::VarStore) -> Self {
        Vae {
            enc: nn::linear(vs.root() / "enc", 8, 4, Default::default()),
            dec: nn::linear(vs.root() / "dec", 2, 8, Default::default()),
            seen: RefCell::new(Vec::new()),
        }
    }

    fn forward3(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        self.seen.borrow_mut().push((x.kind(), train));
        let h = x.apply(&self.enc);
        let (mu, logvar) = (h.narrow(1, 0, 2), h.narrow(1, 2, 2));
        let recon = self.decode(&mu);
        (recon, mu, logvar)
    }

    fn decode(&self, z: &Tensor) -> Tensor {
        z.apply(&self.dec)
    }
}

#[test]
fn several_outputs_and_other_methods_run_under_the_precision() {
    let fabric = cpu("bf16-mixed");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = fabric.setup_module(Vae::new(&vs), &mut vs).unwrap();
    let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
    let (recon, mu, logvar) = vae.run(&x, |m, x| m.forward3(&x, true)).unwrap();
    assert_eq!(
        vae.module().seen.borrow()[0],
        (Kind::BFloat16, true),
        "input converted"
    );
    for t in [&recon, &mu, &logvar] {
        assert_eq!(t.kind(), Kind::Float, "every output converted back");
    }
    // The computation ran under bfloat16 autocast: the result has bfloat16's rounding.
    let plain = x.apply(&vae.module().enc);
    assert!(!plain.narrow(1, 0, 2).equal(&mu));
    // Another method, several inputs (a tuple), a non-tensor passed through.
    let z = Tensor::randn([5, 2], (Kind::Float, Device::Cpu));
    let (img, scale) = vae
        .run((&z, 2.0f64), |m, (z, k)| (m.decode(&z) * k, k))
        .unwrap();
    assert_eq!((img.kind(), scale), (Kind::Float, 2.0));
    // Under 32-true nothing is converted.
    let fabric = cpu("32-true");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = fabric.setup_module(Vae::new(&vs), &mut vs).unwrap();
    let _ = vae.run(&x, |m, x| m.forward3(&x, false)).unwrap();
    assert_eq!(vae.module().seen.borrow()[0], (Kind::Float, false));
}

/// Records the training flag its forward was given.
#[derive(Debug)]
struct Mode {
    lin: nn::Linear,
    flags: RefCell<Vec<bool>>,
}

impl ModuleT for Mode {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.flags.borrow_mut().push(train);
        xs.apply(&self.lin)
    }
}

#[test]
fn inference_needs_no_optimizer_and_optimizers_come_later() {
    let fabric = cpu("bf16-true");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Mode {
        lin: nn::linear(vs.root() / "lin", 3, 2, Default::default()),
        flags: RefCell::new(Vec::new()),
    };
    let model = fabric.setup_module(model, &mut vs).unwrap();
    assert_eq!(vs.variables()["lin.weight"].kind(), Kind::BFloat16);
    model.eval();
    let x = Tensor::ones([1, 3], (Kind::Float, Device::Cpu));
    let _ = model.try_forward(&x).unwrap();
    model.train();
    let _ = model.try_forward(&x).unwrap();
    assert_eq!(*model.module().flags.borrow(), [false, true]);

    // Lightning's setup_optimizers, after setup_module: built before or after the conversion.
    let mut opt = fabric
        .setup_optimizers(FusedSgd::new(&vs, 0.1).unwrap())
        .unwrap();
    let before = vs.variables()["lin.weight"].copy();
    fabric
        .backward(&model.try_forward(&x).unwrap().sum(Kind::Float))
        .unwrap();
    assert_eq!(opt.step().unwrap(), StepOutcome::Stepped);
    assert!(!vs.variables()["lin.weight"].equal(&before));

    // An optimizer over a VarStore this Fabric never set up is refused.
    let other = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(other.root() / "x", 2, 2, Default::default());
    let e = fabric
        .setup_optimizers(FusedSgd::new(&other, 0.1).unwrap())
        .unwrap_err();
    assert!(
        matches!(&e, Error::Usage(m) if m.contains("'x.weight'") && m.contains("setup_module")),
        "{e}"
    );
}

/// A GAN's two halves, each with its own VarStore and batch norm: their variable names clash.
fn half(vs: &nn::VarStore) -> nn::SequentialT {
    nn::seq_t()
        .add(nn::linear(vs.root() / "fc", 4, 4, Default::default()))
        .add(nn::batch_norm1d(vs.root() / "bn4", 4, Default::default()))
}

#[test]
fn two_models_with_clashing_names_set_up_under_names() {
    let path =
        std::env::temp_dir().join(format!("tch-fabric-gan-{}.safetensors", std::process::id()));
    let train = |fabric: &Fabric| {
        let mut gvs = nn::VarStore::new(Device::Cpu);
        let mut dvs = nn::VarStore::new(Device::Cpu);
        let (g, gopt) = {
            let (model, opt) = (half(&gvs), FusedAdamW::new(&gvs, 1e-2).unwrap());
            fabric
                .setup_named("generator", model, &mut gvs, opt)
                .unwrap()
        };
        let (d, dopt) = {
            let (model, opt) = (half(&dvs), FusedAdamW::new(&dvs, 1e-2).unwrap());
            fabric
                .setup_named("discriminator", model, &mut dvs, opt)
                .unwrap()
        };
        (g, gopt, gvs, d, dopt, dvs)
    };
    let fabric = cpu("32-true");
    let (g, mut gopt, gvs, d, mut dopt, dvs) = train(&fabric);
    let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    for _ in 0..3 {
        fabric.backward(&x.apply(&d).sum(Kind::Float)).unwrap();
        dopt.step().unwrap();
        fabric.backward(&x.apply(&g).sum(Kind::Float)).unwrap();
        gopt.step().unwrap();
    }
    fabric.save(&path, &3u32).unwrap();
    let keys: Vec<String> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for key in [
        "generator.bn4.running_var",
        "discriminator.bn4.running_var",
        "generator.fc.weight",
        "optimizer.0.fc.weight.exp_avg",
        "optimizer.1.fc.weight.exp_avg",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
    }
    // A fresh run with the same names restores both halves and both optimizers.
    let fresh = cpu("32-true");
    let (_g2, gopt2, gvs2, _d2, _dopt2, dvs2) = train(&fresh);
    let step: u32 = fresh.load(&path).unwrap();
    assert_eq!(step, 3);
    for (vs, vs2) in [(&gvs, &gvs2), (&dvs, &dvs2)] {
        for (name, t) in vs.variables() {
            assert!(t.equal(&vs2.variables()[&name]), "{name}");
        }
    }
    assert_eq!(
        gopt2.state_tensors().unwrap().len(),
        gopt.state_tensors().unwrap().len()
    );
    std::fs::remove_file(&path).ok();

    // Without names the second model is refused, with the way out in the message.
    let fabric = cpu("32-true");
    let mut a = nn::VarStore::new(Device::Cpu);
    let mut b = nn::VarStore::new(Device::Cpu);
    fabric.setup_module(half(&a), &mut a).unwrap();
    let e = fabric
        .setup_module(half(&b), &mut b)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already set up") && e.contains("setup_named"),
        "{e}"
    );
    for bad in ["", "a.b", "optimizer"] {
        let mut c = nn::VarStore::new(Device::Cpu);
        let e = fabric
            .setup_module_named(bad, half(&c), &mut c)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    field: "model name",
                    ..
                }
            ),
            "{bad}: {e}"
        );
    }
}

#[test]
fn an_optimizer_of_another_fabric_is_refused() {
    let a = cpu_fp16(1024.0, 10);
    let b = cpu("32-true");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    let opt = FusedAdamW::new(&vs, 1e-3).unwrap();
    let (model, mut opt) = a.setup(model, &mut vs, opt).unwrap();
    let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    a.backward(&x.apply(&model).sum(Kind::Float)).unwrap();
    let e = b.clip_gradients(&mut opt, Clip::norm(1.0)).unwrap_err();
    assert!(
        matches!(&e, Error::Usage(m) if m.contains("another Fabric")),
        "{e}"
    );
    // Its own Fabric clips it, and the norm is the unscaled one.
    let norm = a
        .clip_gradients(&mut opt, Clip::norm(1e9))
        .unwrap()
        .value()
        .unwrap();
    // The folded clip leaves the gradients scaled (by 1024): unscale them to compare.
    let unscaled: Vec<Tensor> = ["fc.weight", "fc.bias"]
        .iter()
        .map(|n| vs.variables()[*n].grad() / 1024.0)
        .collect();
    let want = tch_fabric::clip::total_norm(&unscaled, 2.0)
        .unwrap()
        .double_value(&[]);
    assert!(
        (norm - want).abs() <= 1e-5 * want,
        "{norm} vs the unscaled norm {want}"
    );
}

#[test]
fn a_var_store_of_another_fabric_is_refused() {
    let a = cpu("bf16-true");
    let b = cpu("32-true");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    let model = a.setup_module(model, &mut vs).unwrap();
    let e = b
        .setup_module(
            nn::linear(vs.root() / "fc2", 4, 2, Default::default()),
            &mut vs,
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::Usage(m) if m.contains("another Fabric")),
        "{e}"
    );
    assert_eq!(
        vs.variables()["fc.weight"].kind(),
        Kind::BFloat16,
        "left as `a` set it up"
    );
    // Once `a` is gone, the VarStore is free.
    drop(model);
    drop(a);
    b.setup_module((), &mut vs).unwrap();
}

#[test]
fn what_a_fabric_decided_is_one_call_away() {
    let fallback = cpu("16-mixed");
    let d = fallback.describe().unwrap();
    assert_eq!(
        (d.requested, d.precision, d.autocast, d.loss_scale),
        (
            Precision::F16Mixed,
            Precision::Bf16Mixed,
            Some(Kind::BFloat16),
            None
        )
    );
    let text = fallback.to_string();
    assert!(
        text.contains("precision bf16-mixed (requested 16-mixed") && text.contains("no GradScaler"),
        "{text}"
    );
    let fp16 = cpu_fp16(1024.0, 10);
    let d = fp16.describe().unwrap();
    assert_eq!(
        (d.precision, d.autocast, d.loss_scale),
        (Precision::F16Mixed, Some(Kind::Half), Some(1024.0))
    );
    assert!(
        fp16.to_string().contains("GradScaler on (scale 1024)"),
        "{fp16}"
    );
    let d = cpu("bf16-true").describe().unwrap();
    assert_eq!((d.param_dtype, d.autocast), (Kind::BFloat16, None));
}

#[test]
fn a_run_of_skipped_steps_warns_and_can_be_read() {
    // A scale that overflows float16 every step: every step is skipped.
    let fabric = cpu_fp16(2f64.powi(100), 3);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    let opt = FusedAdamW::new(&vs, 1e-3).unwrap();
    let (model, mut opt) = fabric.setup(model, &mut vs, opt).unwrap();
    let x = Tensor::full([2, 4], 3.0, (Kind::Float, Device::Cpu));
    let (consecutive, warnings) = common::warnings_of(|| {
        let mut seen = Vec::new();
        for _ in 0..7 {
            opt.zero_grad().unwrap();
            let loss = x
                .apply(&model)
                .mse_loss(&x.narrow(1, 0, 2), Reduction::Mean);
            fabric.backward(&loss).unwrap();
            match opt.step().unwrap() {
                StepOutcome::Skipped { consecutive, .. } => seen.push(consecutive),
                other => panic!("expected a skip, got {other:?}"),
            }
            assert_eq!(
                fabric.consecutive_skipped_steps().unwrap(),
                *seen.last().unwrap()
            );
        }
        seen
    });
    assert_eq!(consecutive, [1, 2, 3, 4, 5, 6, 7]);
    let runs: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("optimizer steps in a row were skipped"))
        .collect();
    assert_eq!(runs.len(), 2, "warned at 3 and 6 skips: {warnings:?}");
    assert!(runs[0].starts_with("3 optimizer steps"), "{}", runs[0]);
    assert!(fabric.loss_scale().unwrap() < 2f64.powi(100));
    assert_eq!(fabric.skipped_steps().unwrap(), 7);
}

#[test]
fn a_loop_that_skips_an_optimizer_updates_the_scale_itself() {
    let fabric = cpu_fp16(1024.0, 10);
    let mut va = nn::VarStore::new(Device::Cpu);
    let mut vb = nn::VarStore::new(Device::Cpu);
    let a = nn::linear(va.root() / "a", 4, 2, Default::default());
    let b = nn::linear(vb.root() / "b", 4, 2, Default::default());
    let opt = FusedSgd::new(&va, 0.1).unwrap();
    let (a, mut oa) = fabric.setup(a, &mut va, opt).unwrap();
    let opt = FusedSgd::new(&vb, 0.1).unwrap();
    let (_b, _ob) = fabric.setup(b, &mut vb, opt).unwrap();
    let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    let iteration = |oa: &mut tch_fabric::FabricOptimizer| -> tch_fabric::Result<StepOutcome> {
        oa.zero_grad()?;
        fabric.backward(&x.apply(&a).sum(Kind::Float))?;
        oa.step()
    };
    iteration(&mut oa).unwrap();
    // The second optimizer never steps, so the iteration's update never came by itself: a
    // second step of the first one is refused rather than computed on a stale scale.
    let e = iteration(&mut oa).unwrap_err().to_string();
    assert!(e.contains("fabric.update_scale()"), "{e}");
    fabric.update_scale().unwrap();
    iteration(&mut oa).unwrap();
    fabric.update_scale().unwrap();
    fabric.update_scale().unwrap(); // nothing pending: nothing happens
    iteration(&mut oa).unwrap();
    fabric.update_scale().unwrap();
    assert_eq!(
        fabric.scaler_state().unwrap().growth_tracker,
        Some(3),
        "three clean updates, one per iteration"
    );
}

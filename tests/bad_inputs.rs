//! Bad input reaches every public entry point as a typed error, never a panic: undefined
//! tensors, integer and sparse gradients, refused values, calls in the wrong order, files that
//! are not checkpoints. (Each call below would have panicked inside tch in the first wave where
//! it used tch's panicking accessors; the test fails on any panic.)
use tch::{nn, Device, Kind, Tensor};
use tch_fabric::{
    autocast,
    clip::{clip_grad_norm, clip_grad_value, total_norm},
    default_dtype::set_default_dtype,
    dist::DistributedSampler,
    memory_stats, ops,
    optim::{GradBatch, Params},
    profile::count_ops,
    Autocast, Clip, Error, Fabric, FusedAdamW, FusedSgd, GradScaler, GradScalerConfig, Optimizer,
    TchOptimizer,
};

fn f32s(n: i64) -> Tensor {
    Tensor::ones([n], (Kind::Float, Device::Cpu))
}

fn ints(n: i64) -> Tensor {
    Tensor::ones([n], (Kind::Int64, Device::Cpu))
}

fn fp16_fabric() -> Fabric {
    Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .build()
        .unwrap()
}

#[test]
fn tensors_the_kernels_cannot_take() {
    let found = Tensor::zeros([], (Kind::Float, Device::Cpu));
    let one = Tensor::ones([], (Kind::Float, Device::Cpu));
    assert!(ops::unscale_sumsq(&[ints(3)], &found, &one, false).is_err());
    assert!(ops::unscale_sumsq(&[Tensor::new()], &found, &one, false).is_err());
    assert!(ops::unscale_sumsq(&[f32s(3)], &f32s(2), &one, false).is_err());
    assert!(ops::unscale_sumsq(&[f32s(3)], &found, &Tensor::new(), false).is_err());
    assert!(ops::clip_divisor(&Tensor::new(), &one, 1.0).is_err());
    assert!(clip_grad_norm(&[ints(3)], 1.0, 2.0, false).is_err());
    assert!(clip_grad_value(&[f32s(3)], -1.0).is_err());
    assert!(clip_grad_norm(&[f32s(3)], f64::NAN, 2.0, false).is_err());
    // Undefined gradients are parameters without one: left out, not an error.
    assert_eq!(
        total_norm(&[Tensor::new()], 2.0).unwrap().double_value(&[]),
        0.0
    );
    let batch = GradBatch::from_tensors(&[Tensor::new(), f32s(2)]).unwrap();
    assert_eq!((batch.len(), batch.defined().count()), (2, 1));
    let e = Params::new(vec![("x".into(), Tensor::new())]).unwrap_err();
    assert!(e.to_string().contains("'x' is an undefined tensor"), "{e}");
    let twice = vec![("x".into(), f32s(1)), ("x".into(), f32s(1))];
    assert!(Params::new(twice).is_err());
}

#[test]
fn scopes_and_globals_refuse_what_they_cannot_do() {
    assert!(autocast(Device::Cpu, Kind::Float).is_err());
    assert!(Autocast::new(Device::Cuda(99), Kind::Half).enter().is_err());
    assert!(set_default_dtype(Kind::Int64).is_err());
    let nested = count_ops(|| count_ops(|| ()).map(|_| ())).unwrap().0;
    assert!(matches!(nested, Err(Error::Usage(_))), "{nested:?}");
    assert!(memory_stats(Device::Cuda(0)).is_err());
    assert!(DistributedSampler::new(10, 0, 0).is_err());
}

#[test]
fn optimizers_refuse_bad_values_and_gradients() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("w", &[3]);
    for lr in [f64::NAN, -1.0, f64::INFINITY] {
        assert!(FusedAdamW::new(&vs, lr).is_err(), "{lr}");
        assert!(FusedSgd::new(&vs, lr).is_err(), "{lr}");
        assert!(
            TchOptimizer::new(&vs, nn::Sgd::default(), lr).is_err(),
            "{lr}"
        );
    }
    for (opt, field) in [
        (
            FusedAdamW::new(&vs, 1e-3).unwrap().betas(1.5, 0.999),
            "beta1",
        ),
        (FusedAdamW::new(&vs, 1e-3).unwrap().betas(0.9, 1.0), "beta2"),
        (FusedAdamW::new(&vs, 1e-3).unwrap().eps(-1.0), "eps"),
        (
            FusedAdamW::new(&vs, 1e-3).unwrap().weight_decay(f64::NAN),
            "weight_decay",
        ),
    ] {
        let e = opt.validate().unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { field: f, .. } if f == field),
            "{e}"
        );
    }
    let mut opt = FusedAdamW::new(&vs, 1e-3).unwrap();
    assert!(opt.set_lr(f64::NAN).is_err());
    assert_eq!(opt.lr(), 1e-3, "a refused rate leaves the old one");
    // Sparse gradients (an embedding with sparse=true) are refused by every step.
    let vs = nn::VarStore::new(Device::Cpu);
    let emb = nn::embedding(
        vs.root() / "e",
        10,
        4,
        nn::EmbeddingConfig {
            sparse: true,
            ..Default::default()
        },
    );
    use tch::nn::Module;
    emb.forward(&Tensor::from_slice(&[1i64, 2]))
        .sum(Kind::Float)
        .backward();
    let e = FusedAdamW::new(&vs, 1e-3).unwrap().step().unwrap_err();
    assert!(e.to_string().contains("sparse"), "{e}");
    let e = FusedSgd::new(&vs, 1e-3).unwrap().step().unwrap_err();
    assert!(e.to_string().contains("sparse"), "{e}");
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    let _ = scaler.scale(&f32s(1)).unwrap();
    let mut sgd = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    let e = scaler.step(&mut sgd).unwrap_err();
    assert!(e.to_string().contains("sparse"), "{e}");
}

#[test]
fn the_scaler_refuses_bad_tensors_and_order() {
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    assert!(scaler.update().is_err(), "update before scale");
    assert!(scaler.scale(&Tensor::new()).is_err());
    let _ = scaler.scale(&f32s(1)).unwrap();
    assert!(scaler.unscale_grads(&[ints(2)]).is_err());
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("w", &[2]);
    let mut opt = FusedSgd::new(&vs, 0.1).unwrap();
    let e = scaler.step(&mut opt).unwrap_err();
    assert!(e.to_string().contains("No inf checks"), "no gradients: {e}");
}

#[test]
fn the_fabric_refuses_bad_tensors_files_and_settings() {
    let e = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(GradScalerConfig::default().enabled(false))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "grad_scaler",
                ..
            }
        ),
        "{e}"
    );
    let fabric = fp16_fabric();
    assert!(fabric.to_device(&Tensor::new()).is_err());
    assert!(fabric.backward(&Tensor::new()).is_err());
    assert!(
        fabric.backward(&f32s(1).sum(Kind::Float)).is_err(),
        "a loss that needs no gradient"
    );
    assert!(
        fabric.broadcast(&f32s(1), 1).is_err(),
        "root outside a group of one"
    );

    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 3, 2, Default::default());
    let model = fabric.setup_module(model, &mut vs).unwrap();
    assert!(model.try_forward(&Tensor::new()).is_err());
    assert!(model.run(Tensor::new(), |_, x| x).is_err());
    let mut opt = fabric
        .setup_optimizers(FusedAdamW::new(&vs, 1e-3).unwrap())
        .unwrap();
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.lr(), 1e-3);
    let e = opt.step().unwrap_err();
    assert_eq!(
        e.to_string(),
        "The current strategy and precision selection requires you to call \
         `fabric.backward(loss)` instead of `loss.backward()`."
    );
    assert!(fabric
        .clip_gradients(&mut opt, Clip::value(f64::NAN))
        .is_err());

    // A variable under the name checkpoints reserve for optimizer state.
    let mut odd = nn::VarStore::new(Device::Cpu);
    let _ = odd.root().sub("optimizer").zeros("w", &[1]);
    let e = fabric.setup_module((), &mut odd).unwrap_err();
    assert!(e.to_string().contains("reserve for optimizer state"), "{e}");

    // Files that are not checkpoints: a folder, an empty file, a missing one.
    let dir = std::env::temp_dir();
    assert!(fabric.load::<u32>(&dir).is_err());
    assert!(
        fabric.save(&dir, &1u32).is_err(),
        "a folder is not a file to replace"
    );
    let empty = dir.join(format!("tch-fabric-empty-{}", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        fabric.load::<u32>(&empty),
        Err(Error::Checkpoint { .. })
    ));
    std::fs::remove_file(&empty).unwrap();
    assert!(matches!(
        fabric.load::<u32>(dir.join("no-such-checkpoint")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn param_groups_that_do_not_fit_are_errors_that_change_nothing() {
    use tch_fabric::lr_scheduler::{Scheduler, StepLR};
    use tch_fabric::optim::{Group, OptimizerState};
    use tch_fabric::{AdamW, Sgd};
    let mut vs = nn::VarStore::new(Device::Cpu);
    let layer = nn::linear(vs.root() / "fc", 3, 2, Default::default());
    let err = |r: tch_fabric::Result<AdamW>| r.unwrap_err().to_string();
    let adamw = || AdamW::new(&vs, 1e-3).unwrap();
    // A parameter in two groups, in none, a name that is not a parameter, rest not last.
    let e = err(adamw().param_groups([
        Group::names(["fc.weight"]),
        Group::names(["fc.weight", "fc.bias"]),
    ]));
    assert!(e.contains("'fc.weight' appears in groups 0 and 1"), "{e}");
    let e = err(adamw().param_groups([Group::names(["fc.weight"])]));
    assert!(e.contains("[\"fc.bias\"] are in no group"), "{e}");
    let e = err(adamw().param_groups([Group::names(["fc.w"]), Group::rest()]));
    assert!(
        e.contains("'fc.w', which is not one of the optimizer's"),
        "{e}"
    );
    let e = err(adamw().param_groups([Group::rest(), Group::names(["fc.bias"])]));
    assert!(e.contains("not the last group"), "{e}");
    let e = err(adamw().param_groups([]));
    assert!(e.contains("no groups"), "{e}");
    // Options the algorithm does not have, and refused values.
    let e = err(adamw().param_groups([Group::rest().momentum(0.9)]));
    assert!(e.contains("momentum (for AdamW)"), "{e}");
    let e = Sgd::new(&vs, 0.1)
        .unwrap()
        .param_groups([Group::rest().betas(0.9, 0.9)])
        .unwrap_err();
    assert!(e.to_string().contains("betas (for SGD)"), "{e}");
    let e = err(adamw().param_groups([Group::rest().lr(-1.0)]));
    assert!(e.contains("Invalid learning rate"), "{e}");
    let e = err(adamw().param_groups([Group::rest().betas(1.5, 0.9)]));
    assert!(e.contains("beta1"), "{e}");

    // Per-group rates: one group's, and a group that does not exist.
    let fabric = Fabric::new("32-true").unwrap();
    let opt = adamw()
        .param_groups([Group::matching(|_, t| t.dim() >= 2), Group::rest().lr(0.5)])
        .unwrap();
    assert_eq!(opt.params().names(), ["fc.weight", "fc.bias"]);
    let (_model, mut opt) = fabric.setup(layer, &mut vs, opt).unwrap();
    assert_eq!(opt.group_lrs(), [1e-3, 0.5]);
    opt.set_group_lr(1, 0.25).unwrap();
    assert!(opt.set_group_lr(2, 0.1).is_err());
    assert!(opt.set_group_lr(0, f64::NAN).is_err());
    assert_eq!(opt.group_lrs(), [1e-3, 0.25]);

    // A scheduler state for another number of groups is refused.
    let mut sched = StepLR::new(&mut opt, 10, 0.5).unwrap();
    let mut state = sched.state_dict();
    state.base_lrs.pop();
    state.last_lrs.pop();
    let e = sched.load_state_dict(&state).unwrap_err();
    assert!(
        e.to_string()
            .contains("1 param groups, the optimizer has 2"),
        "{e}"
    );

    // Groups are set before the first step; after it, refused.
    let vs2 = nn::VarStore::new(Device::Cpu);
    let p = vs2.root().ones("p", &[2]);
    let mut stepped = AdamW::new(&vs2, 1e-3).unwrap();
    p.sum(Kind::Float).backward();
    stepped.step().unwrap();
    assert!(!stepped.state_tensors().unwrap().is_empty());
    let e = stepped.param_groups([Group::rest()]).unwrap_err();
    assert!(e.to_string().contains("before its first step"), "{e}");
}

/// An input the model's own layer cannot take (integer, bool, wrong width: tch's `nn::Linear`
/// panics on each) comes back from `try_forward` as an error in every precision, and the model
/// and the autocast state are as before: the 12 panics of #28's red team.
#[test]
fn try_forward_returns_the_models_panics_as_errors() {
    for precision in ["32-true", "bf16-mixed", "16-mixed", "bf16-true"] {
        let fabric = Fabric::builder()
            .precision(precision)
            .accelerator("cpu")
            .cpu_fp16_autocast(true)
            .build()
            .unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let model = fabric.setup_module(model, &mut vs).unwrap();
        let bad = [
            Tensor::ones([2, 3], (Kind::Int64, Device::Cpu)),
            Tensor::ones([2, 3], (Kind::Bool, Device::Cpu)),
            Tensor::ones([2, 5], (Kind::Float, Device::Cpu)),
        ];
        let before = tch_fabric::autocast::autocast_state(Device::Cpu).unwrap();
        for x in &bad {
            let e = model.try_forward(x).unwrap_err();
            assert!(
                matches!(e, Error::Native { op: "forward", .. }),
                "{precision}: {e}"
            );
            assert!(e.to_string().contains("panicked"), "{precision}: {e}");
            assert_eq!(
                tch_fabric::autocast::autocast_state(Device::Cpu).unwrap(),
                before,
                "{precision}"
            );
        }
        // The model still works.
        let ok = model.try_forward(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu)));
        assert_eq!(ok.unwrap().size(), [2, 2], "{precision}");
    }
}

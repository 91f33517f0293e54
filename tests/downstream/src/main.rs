//! A user's program: it depends on tch-fabric by path, without default features and without a
//! build script, and exercises what needs the crate's native parts. `.ci/run` builds and runs
//! it (README, "Use it from your crate"); it exits non-zero when any check fails.
//!
//!     cd tests/downstream
//!     LD_LIBRARY_PATH=$(realpath ../../.libtorch/lib) cargo run
//!     LD_LIBRARY_PATH=... cargo run --features cuda     # also: the CUDA kernel is registered
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::lr_scheduler::{
    CosineAnnealingLR, LinearLR, Scheduler, SchedulerState, SequentialLR,
};
use tch_fabric::{
    AdamW, Clip, Fabric, FabricModule, FabricOptimizer, FusedAdamW, FusedSgd, GradScalerConfig,
    StepOutcome,
};

fn main() -> Result<()> {
    tch::manual_seed(0);
    ops_are_registered()?;
    fp16_adamw_with_clipping()?;
    sgd_step()?;
    bf16_true_rounded_steps()?;
    default_adamw_with_schedule()?;
    checkpoint_round_trip()?;
    println!("downstream: all checks passed");
    Ok(())
}

/// The `tch_fabric::` ops reach this binary through the rlib: no build script here links them.
fn ops_are_registered() -> Result<()> {
    ensure!(
        tch_fabric::ops::has_kernel(Device::Cpu)?,
        "tch_fabric::unscale_sumsq_ has no CPU kernel in this binary"
    );
    let cuda = tch_fabric::ops::has_kernel(Device::Cuda(0))?;
    ensure!(
        cuda == cfg!(feature = "cuda"),
        "CUDA kernel registered: {cuda}, but the cuda feature is {}",
        if cfg!(feature = "cuda") { "on" } else { "off" }
    );
    println!("ops registered: cpu, cuda={cuda}");
    Ok(())
}

fn mlp(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "l1", 8, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "l2", 16, 4, Default::default()))
}

fn batch() -> (Tensor, Tensor) {
    (
        Tensor::randn([32, 8], (Kind::Float, Device::Cpu)),
        Tensor::randn([32, 4], (Kind::Float, Device::Cpu)),
    )
}

/// `16-mixed` as real float16 on CPU, `FusedAdamW`, 2-norm clipping: the folded step runs
/// `tch_fabric::unscale_sumsq_` and `tch_fabric::clip_divisor`.
fn fp16_adamw_with_clipping() -> Result<()> {
    let fabric = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(GradScalerConfig::default().init_scale(1024.0))
        .build()?;
    println!("{fabric}");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs);
    let opt = FusedAdamW::new(&vs, 1e-2)?;
    let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    let (x, y) = batch();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..20 {
        opt.zero_grad()?;
        let out = x.apply(&model);
        let loss = {
            let _autocast = fabric.autocast()?;
            out.mse_loss(&y, Reduction::Mean)
        };
        fabric.backward(&loss)?;
        let norm = fabric.clip_gradients(&mut opt, Clip::norm(1.0))?;
        ensure!(norm.value()?.is_finite(), "a finite gradient norm");
        ensure!(opt.step()? == StepOutcome::Stepped, "every step is taken");
        last = loss.f_double_value(&[])?;
        first.get_or_insert(last);
    }
    let first = first.context("trained")?;
    ensure!(last < first, "16-mixed FusedAdamW: loss {first} -> {last}");
    println!("16-mixed FusedAdamW + clipping: loss {first:.4} -> {last:.4}");
    Ok(())
}

fn sgd_step() -> Result<()> {
    let fabric = Fabric::builder().accelerator("cpu").build()?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs);
    let opt = FusedSgd::new(&vs, 0.1)?.momentum(0.9);
    let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    let (x, y) = batch();
    let before = vs.variables()["l1.weight"].copy();
    fabric.backward(&model.forward(&x).mse_loss(&y, Reduction::Mean))?;
    opt.step()?;
    ensure!(
        !vs.variables()["l1.weight"].equal(&before),
        "FusedSgd changed the weights"
    );
    ensure!(
        opt.state_tensors()?.len() == 4,
        "one momentum buffer per parameter"
    );
    println!("FusedSgd step: ok");
    Ok(())
}

/// bf16-true with stochastic rounding (FusedAdamW) and Kahan summation (FusedSgd): the rounded
/// step ops (`tch_fabric::adamw_rounded_`, `sgd_rounded_`) reach this binary too.
fn bf16_true_rounded_steps() -> Result<()> {
    for kahan in [false, true] {
        let fabric = Fabric::builder()
            .precision("bf16-true")
            .accelerator("cpu")
            .build()?;
        let mut vs = fabric.init_module()?;
        let model = mlp(&vs);
        let before = vs.variables()["l1.weight"].copy();
        let (x, y) = batch();
        let state = if kahan {
            let opt = FusedSgd::new(&vs, 0.1)?.momentum(0.9).kahan_summation(true);
            let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
            fabric.backward(&model.forward(&x).mse_loss(&y, Reduction::Mean))?;
            opt.step()?;
            opt.state_tensors()?.len()
        } else {
            let opt = FusedAdamW::new(&vs, 1e-2)?.stochastic_rounding(7);
            let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
            fabric.backward(&model.forward(&x).mse_loss(&y, Reduction::Mean))?;
            opt.step()?;
            opt.state_tensors()?.len()
        };
        ensure!(
            !vs.variables()["l1.weight"].equal(&before),
            "the rounded step changed no weight"
        );
        // Kahan SGD: momentum and compensation buffers; stochastic AdamW: two moments, a step.
        ensure!(state == if kahan { 8 } else { 12 }, "{state} state tensors");
    }
    // A quarter of the way to the next bfloat16: about a quarter of the roundings go up.
    let x = Tensor::full([1 << 14], 1.0 + 1.0 / 512.0, (Kind::Float, Device::Cpu));
    let up = tch_fabric::optim::stochastic_round(&x, 1, 0, 1)?
        .to_kind(Kind::Float)
        .gt(1.0)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    ensure!((up - 0.25).abs() < 0.02, "{up} of the roundings went up");
    println!("bf16-true stochastic rounding and Kahan summation: ok");
    Ok(())
}

/// PyTorch's default AdamW (the shim's for-loop step) under 16-mixed, with a warm-up + cosine
/// schedule from `tch_fabric::lr_scheduler`.
/// A 16-mixed Fabric with the MLP, PyTorch's default AdamW and a warm-up + cosine schedule.
fn adamw_run() -> Result<(
    Fabric,
    FabricModule<nn::Sequential>,
    FabricOptimizer,
    SequentialLR,
)> {
    let fabric = Fabric::builder()
        .accelerator("cpu")
        .precision("16-mixed")
        .cpu_fp16_autocast(true)
        .build()?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs);
    let opt = AdamW::new(&vs, 1e-2)?;
    let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    let warmup = LinearLR::new(&mut opt, 0.1, 1.0, 5)?;
    let cosine = CosineAnnealingLR::new(&mut opt, 25, 0.0)?;
    let sched = SequentialLR::new(&mut opt, vec![Box::new(warmup), Box::new(cosine)], vec![5])?;
    Ok((fabric, model, opt, sched))
}

fn default_adamw_with_schedule() -> Result<()> {
    let (fabric, model, mut opt, mut sched) = adamw_run()?;
    ensure!((opt.lr() - 1e-3).abs() < 1e-15, "warm-up starts at lr/10");
    let (x, y) = batch();
    let (mut first, mut last) = (None, 0.0);
    for _ in 0..30 {
        opt.zero_grad()?;
        let out = model.forward(&x);
        let loss = {
            let _ac = fabric.autocast()?;
            out.mse_loss(&y, Reduction::Mean)
        };
        fabric.backward(&loss)?;
        let outcome = opt.step()?;
        sched.step(&outcome, &mut opt)?;
        last = loss.f_double_value(&[])?;
        first.get_or_insert(last);
    }
    let first = first.context("trained")?;
    ensure!(last < first, "16-mixed AdamW: loss {first} -> {last}");
    println!(
        "16-mixed AdamW + SequentialLR: loss {first:.4} -> {last:.4}, lr {:.2e}",
        opt.lr()
    );

    // A torch.save-format checkpoint (what Lightning's fabric.load reads), with the schedule's
    // state as an entry of its own; a second Fabric resumes from it to the same rate and step.
    let dir = std::env::temp_dir().join(format!("tch-fabric-downstream-pt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("resume.ckpt");
    let state = BTreeMap::from([("scheduler", sched.state_dict())]);
    fabric.save(&path, &state)?;
    let (fabric2, model2, opt2, mut sched2) = adamw_run()?;
    let loaded: BTreeMap<String, SchedulerState> = fabric2.load(&path)?;
    sched2.load_state_dict(&loaded["scheduler"])?;
    ensure!(
        opt2.lr() == opt.lr(),
        "resumed lr {} vs {}",
        opt2.lr(),
        opt.lr()
    );
    ensure!(
        sched2.state_dict() == sched.state_dict(),
        "resumed schedule {:?} vs {:?}",
        sched2.state_dict(),
        sched.state_dict()
    );
    let next = |m: &FabricModule<nn::Sequential>, f: &Fabric| -> Result<f64> {
        let out = m.forward(&x);
        let _ac = f.autocast()?;
        Ok(out.mse_loss(&y, Reduction::Mean).f_double_value(&[])?)
    };
    let (a, b) = (next(&model, &fabric)?, next(&model2, &fabric2)?);
    ensure!(a == b, "resumed model: loss {a} vs {b}");
    println!(
        "torch.save-format checkpoint: resumed at lr {:.2e}, loss {b:.4}",
        opt2.lr()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn checkpoint_round_trip() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tch-fabric-downstream-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ckpt.safetensors");
    let fabric = Fabric::builder().accelerator("cpu").build()?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs);
    let opt = FusedAdamW::new(&vs, 1e-2)?;
    let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    let (x, y) = batch();
    fabric.backward(&model.forward(&x).mse_loss(&y, Reduction::Mean))?;
    opt.step()?;
    fabric.save(&path, &7u32)?;

    let other = Fabric::builder().accelerator("cpu").build()?;
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let model2 = mlp(&vs2);
    let opt2 = FusedAdamW::new(&vs2, 1e-2)?;
    let (_model2, opt2) = other.setup(model2, &mut vs2, opt2)?;
    let step: u32 = other.load(&path)?;
    ensure!(step == 7, "the user state came back");
    for (name, t) in vs.variables() {
        ensure!(t.equal(&vs2.variables()[&name]), "{name} restored");
    }
    ensure!(
        opt2.state_tensors()?.len() == opt.state_tensors()?.len(),
        "the AdamW state came back"
    );
    std::fs::remove_dir_all(&dir)?;
    println!("checkpoint round trip: ok");
    Ok(())
}

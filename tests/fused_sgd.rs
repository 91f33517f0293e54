//! FusedSgd against `torch.optim.SGD(fused=True)` (the same libtorch kernel) for each of its
//! options, with and without 16-mixed + GradScaler + clipping; the sync-free step
//! (`StepOutcome::Queued`); exact resume; bad hyper-parameters.
//!
//! The PyTorch side runs live through the provisioned Python (`.venv/bin/python`).
mod common;

use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::optim::OptimizerState;
use tch_fabric::{
    optim::Amp, Clip, Fabric, FabricModule, FabricOptimizer, FusedSgd, GradScalerConfig, Optimizer,
    StepOutcome,
};

const STEPS: usize = 30;

/// The scale starts low enough for the first step to be taken and grows every 2 steps until
/// float16 overflows: later steps are skipped. (A skipped FIRST step would leave PyTorch's
/// momentum buffers uninitialised, `torch.empty_like`, and its run would depend on whatever
/// memory it got; see `a_skipped_first_step_leaves_clean_momentum`.)
const INIT_SCALE: f64 = 4096.0;

/// SGD options as (momentum, dampening, weight_decay, nesterov).
const OPTIONS: [(f64, f64, f64, bool); 4] = [
    (0.0, 0.0, 0.0, false),
    (0.9, 0.0, 1e-2, false),
    (0.9, 0.0, 0.0, true),
    (0.5, 0.3, 1e-3, false),
];

fn model(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "l1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 16, 4, Default::default()))
}

fn fabric(mixed: bool, sync_free: bool) -> Fabric {
    let b = Fabric::builder().accelerator("cpu");
    let b = if mixed {
        b.precision("16-mixed").cpu_fp16_autocast(true).grad_scaler(
            GradScalerConfig::default()
                .init_scale(INIT_SCALE)
                .growth_interval(2)
                .sync_free(sync_free),
        )
    } else {
        b.precision("32-true")
    };
    b.build().unwrap()
}

fn sgd(vs: &nn::VarStore, (momentum, dampening, wd, nesterov): (f64, f64, f64, bool)) -> FusedSgd {
    FusedSgd::new(vs, 0.01)
        .unwrap()
        .momentum(momentum)
        .dampening(dampening)
        .weight_decay(wd)
        .nesterov(nesterov)
}

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu)) * 4.0;
    let y = Tensor::randn([32, 4], (Kind::Float, Device::Cpu));
    (x, y)
}

fn step(
    fabric: &Fabric,
    m: &FabricModule<nn::Sequential>,
    opt: &mut FabricOptimizer,
    x: &Tensor,
    y: &Tensor,
    clip: bool,
) -> StepOutcome {
    opt.zero_grad().unwrap();
    let out = m.forward(x);
    let loss = {
        let _ac = fabric.autocast().unwrap();
        out.mse_loss(y, Reduction::Mean)
    };
    fabric.backward(&loss).unwrap();
    if clip {
        fabric.clip_gradients(opt, Clip::norm(0.5)).unwrap();
    }
    opt.step().unwrap()
}

const PYTHON: &str = r#"
import json, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
path, out_path, mixed, steps, momentum, dampening, wd, nesterov = sys.stdin.read().split()
mixed, steps, nesterov = mixed == "1", int(steps), nesterov == "1"
t = load_file(path)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
model.load_state_dict({"0.weight": t["l1.weight"], "0.bias": t["l1.bias"], "2.weight": t["l2.weight"], "2.bias": t["l2.bias"]})
x, y = t["x"], t["y"]
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=float(momentum), dampening=float(dampening),
                      weight_decay=float(wd), nesterov=nesterov, fused=True)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2, enabled=mixed)
stepped = []
for _ in range(steps):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16, enabled=mixed):
        out = model(x.half() if mixed else x)
    out = out.float()
    with torch.autocast("cpu", dtype=torch.float16, enabled=mixed):
        loss = F.mse_loss(out, y)
    scaler.scale(loss).backward()
    if mixed:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    before = model[0].weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    stepped.append(not torch.equal(before, model[0].weight.detach()))
sd = model.state_dict()
save_file({"l1.weight": sd["0.weight"], "l1.bias": sd["0.bias"], "l2.weight": sd["2.weight"], "l2.bias": sd["2.bias"]}, out_path)
print(json.dumps({"stepped": stepped, "scale": scaler.get_scale()}))
"#;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-fabric-sgd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Trains here and in PyTorch from the same weights; returns the worst weight difference.
fn parity(mixed: bool, sync_free: bool, options: (f64, f64, f64, bool)) -> f64 {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let (x, y) = data();
    let f = fabric(mixed, sync_free);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let (momentum, dampening, wd, nesterov) = options;
    let tag = format!("{mixed}-{sync_free}-{momentum}-{dampening}-{wd}-{nesterov}");
    let init = tmp(&format!("init-{tag}.safetensors"));
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.push(("x".into(), x.shallow_clone()));
    tensors.push(("y".into(), y.shallow_clone()));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &init).unwrap();

    let opt = sgd(&vs, options);
    let (m, mut opt) = f.setup(m, &mut vs, opt).unwrap();
    let outcomes: Vec<StepOutcome> = (0..STEPS)
        .map(|_| step(&f, &m, &mut opt, &x, &y, mixed))
        .collect();

    let out = tmp(&format!("torch-{tag}.safetensors"));
    let report = common::run_python(
        PYTHON,
        &format!(
            "{} {} {} {STEPS} {momentum} {dampening} {wd} {}",
            init.display(),
            out.display(),
            u8::from(mixed),
            u8::from(nesterov)
        ),
    );
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let torch_stepped: Vec<bool> = report["stepped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let skipped_torch = torch_stepped.iter().filter(|s| !**s).count() as u64;
    if sync_free {
        assert!(outcomes.iter().all(|o| *o == StepOutcome::Queued));
    } else {
        let stepped: Vec<bool> = outcomes.iter().map(|o| !o.is_skipped()).collect();
        assert_eq!(stepped, torch_stepped, "the same steps are skipped");
    }
    assert_eq!(
        f.skipped_steps().unwrap(),
        skipped_torch,
        "skips counted ({tag})"
    );
    if mixed {
        assert!(
            skipped_torch > 0,
            "2^24 overflows float16 gradients at first"
        );
        assert_eq!(f.loss_scale().unwrap(), report["scale"].as_f64().unwrap());
    }
    let torch_w = Tensor::read_safetensors(&out).unwrap();
    let mut worst = 0.0f64;
    for (name, want) in torch_w {
        assert!(
            bool::try_from(want.isfinite().all()).unwrap(),
            "{tag}: PyTorch's run diverged ({name}); the comparison would be vacuous"
        );
        let got = &vs.variables()[&name];
        worst = worst.max((got - &want).abs().max().double_value(&[]));
    }
    worst
}

#[test]
fn matches_torch_fused_sgd_for_each_option() {
    for options in OPTIONS {
        let worst = parity(false, false, options);
        // The same kernel on the same gradients: the same bits.
        assert_eq!(worst, 0.0, "{options:?}");
    }
}

#[test]
fn matches_torch_fused_sgd_with_gradscaler_and_folded_clipping() {
    for options in OPTIONS {
        let worst = parity(true, false, options);
        // Folded clipping divides by scale / clip_coef instead of unscaling and multiplying:
        // the same values up to float32 rounding.
        assert!(worst <= 1e-6, "{options:?}: max difference {worst}");
    }
}

#[test]
fn the_sync_free_step_queues_and_counts_skips_on_the_device() {
    let worst = parity(true, true, OPTIONS[1]);
    assert!(worst <= 1e-6, "max difference {worst}");
}

#[test]
fn resume_from_a_checkpoint_is_exact() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let ckpt = tmp("resume.safetensors");
    let run = |resume: bool, seed: i64| {
        let f = fabric(true, false);
        let mut vs = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(seed);
        let (x, y) = data();
        let m = model(&vs);
        let opt = sgd(&vs, OPTIONS[3]);
        let (m, mut opt) = f.setup(m, &mut vs, opt).unwrap();
        let mut start = 0;
        if resume {
            start = f.load::<usize>(&ckpt).unwrap();
        }
        for i in start..25 {
            if !resume && i == 12 {
                f.save(&ckpt, &i).unwrap();
            }
            step(&f, &m, &mut opt, &x, &y, true);
        }
        assert_eq!(
            opt.state_tensors().unwrap().len(),
            4,
            "a momentum buffer per parameter"
        );
        let mut w: Vec<_> = vs.variables().into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        (w, f.scaler_state().unwrap())
    };
    let (full, full_scaler) = run(false, 3);
    let (resumed, resumed_scaler) = run(true, 99);
    for ((n, a), (_, b)) in full.iter().zip(&resumed) {
        assert!(a.equal(b), "{n} differs after resume");
    }
    assert_eq!(full_scaler, resumed_scaler);
}

#[test]
fn bad_hyper_parameters_are_errors_that_change_nothing() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let loss = m
        .forward(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)))
        .sum(Kind::Float);
    loss.backward();
    let before: Vec<Tensor> = vs.trainable_variables().iter().map(|t| t.copy()).collect();
    // The constructor refuses a bad rate at once; the builder's values are checked by step.
    let err = FusedSgd::new(&vs, -0.1).unwrap_err().to_string();
    assert!(err.contains("Invalid learning rate"), "{err}");
    let cases = [
        (
            FusedSgd::new(&vs, 0.1).unwrap().momentum(-1.0),
            "Invalid momentum value",
        ),
        (
            FusedSgd::new(&vs, 0.1).unwrap().weight_decay(f64::NAN),
            "Invalid weight_decay value",
        ),
        (
            FusedSgd::new(&vs, 0.1).unwrap().nesterov(true),
            "Nesterov momentum requires a momentum and zero dampening",
        ),
        (
            FusedSgd::new(&vs, 0.1)
                .unwrap()
                .momentum(0.9)
                .dampening(0.1)
                .nesterov(true),
            "Nesterov momentum requires a momentum and zero dampening",
        ),
    ];
    for (mut opt, want) in cases {
        let err = opt.step().unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(opt.state_tensors().unwrap().is_empty());
    }
    let mut ok = FusedSgd::new(&vs, 0.1).unwrap();
    assert!(ok.set_lr(f64::INFINITY).is_err());
    assert_eq!(ok.lr(), 0.1, "a refused rate leaves the old one");
    for (a, b) in vs.trainable_variables().iter().zip(&before) {
        assert!(a.equal(b), "nothing stepped");
    }
    // A state that does not fit is refused as a whole.
    let bad = vec![(
        "l1.weight.momentum_buffer".to_string(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    )];
    assert!(ok.load_state(&bad).is_err());
    assert!(ok.state_tensors().unwrap().is_empty());
}

/// PyTorch creates SGD momentum buffers with `torch.empty_like` and fills them in the first
/// step; a first step skipped by the GradScaler leaves them uninitialised. FusedSgd's buffers
/// start at zero and the next taken step starts them from the gradient.
#[test]
fn a_skipped_first_step_leaves_clean_momentum() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let mut opt = FusedSgd::new(&vs, 0.1).unwrap().momentum(0.9);
    let loss = m
        .forward(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)))
        .sum(Kind::Float);
    loss.backward();
    let before: Vec<Tensor> = vs.trainable_variables().iter().map(|t| t.copy()).collect();
    let inf = Tensor::ones([], (Kind::Float, Device::Cpu));
    let grads = opt.params().grads().unwrap();
    opt.step_with(
        &grads,
        Amp::Scaled {
            grad_scale: None,
            found_inf: &inf,
            device: Device::Cpu,
        },
    )
    .unwrap();
    for (a, b) in vs.trainable_variables().iter().zip(&before) {
        assert!(a.equal(b), "a skipped step changes no weight");
    }
    for (name, buf) in opt.state_tensors().unwrap() {
        assert_eq!(buf.abs().sum(Kind::Float).double_value(&[]), 0.0, "{name}");
    }
    let no_inf = Tensor::zeros([], (Kind::Float, Device::Cpu));
    opt.step_with(
        &grads,
        Amp::Scaled {
            grad_scale: None,
            found_inf: &no_inf,
            device: Device::Cpu,
        },
    )
    .unwrap();
    for (name, buf) in opt.state_tensors().unwrap() {
        let param = name.trim_end_matches(".momentum_buffer");
        let i = opt
            .params()
            .names()
            .iter()
            .position(|n| n == param)
            .unwrap();
        let g = grads.get(i).unwrap();
        assert!(
            buf.equal(g),
            "{name}: the first taken step starts from the gradient"
        );
    }
}

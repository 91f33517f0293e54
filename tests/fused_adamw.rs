//! FusedAdamW against `torch.optim.AdamW(fused=True)` (the same libtorch kernel), with and
//! without 16-mixed + GradScaler + clipping, and exact resume from a Fabric checkpoint.
//!
//! The PyTorch side runs live through the provisioned Python (`.venv/bin/python`).
mod common;

use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::optim::OptimizerState;
use tch_fabric::{Clip, Fabric, FabricModule, FabricOptimizer, FusedAdamW, GradScalerConfig};

const STEPS: usize = 30;

fn model(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "l1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 16, 4, Default::default()))
}

fn fabric(mixed: bool) -> Fabric {
    let b = Fabric::builder().accelerator("cpu");
    let b = if mixed {
        b.precision("16-mixed").cpu_fp16_autocast(true).grad_scaler(
            GradScalerConfig::default()
                .init_scale(2f64.powi(24))
                .growth_interval(4),
        )
    } else {
        b.precision("32-true")
    };
    b.build().unwrap()
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
) -> bool {
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
    !opt.step().unwrap().is_skipped()
}

const PYTHON: &str = r#"
import json, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
path, out_path, mixed, steps = sys.stdin.read().split()
mixed, steps = mixed == "1", int(steps)
t = load_file(path)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
model.load_state_dict({"0.weight": t["l1.weight"], "0.bias": t["l1.bias"], "2.weight": t["l2.weight"], "2.bias": t["l2.bias"]})
x, y = t["x"], t["y"]
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=4, enabled=mixed)
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
    before = opt.state[model[0].weight]["step"].item() if opt.state else 0.0
    scaler.step(opt)
    scaler.update()
    stepped.append(opt.state[model[0].weight]["step"].item() > before if opt.state else False)
sd = model.state_dict()
save_file({"l1.weight": sd["0.weight"], "l1.bias": sd["0.bias"], "l2.weight": sd["2.weight"], "l2.bias": sd["2.bias"]}, out_path)
print(json.dumps({"stepped": stepped, "scale": scaler.get_scale()}))
"#;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-fabric-fused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn parity(mixed: bool) {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let (x, y) = data();
    let f = fabric(mixed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let init = tmp(&format!("init-{mixed}.safetensors"));
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.push(("x".into(), x.shallow_clone()));
    tensors.push(("y".into(), y.shallow_clone()));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &init).unwrap();

    let opt = FusedAdamW::new(&vs, 1e-2).unwrap();
    let (m, mut opt) = f.setup(m, &mut vs, opt).unwrap();
    let stepped: Vec<bool> = (0..STEPS)
        .map(|_| step(&f, &m, &mut opt, &x, &y, mixed))
        .collect();

    let out = tmp(&format!("torch-{mixed}.safetensors"));
    let report = common::run_python(
        PYTHON,
        &format!(
            "{} {} {} {STEPS}",
            init.display(),
            out.display(),
            u8::from(mixed)
        ),
    );
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let torch_stepped: Vec<bool> = report["stepped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    assert_eq!(stepped, torch_stepped, "the same steps are skipped");
    if mixed {
        assert!(
            stepped.iter().any(|s| !s),
            "2^24 overflows float16 gradients at first"
        );
        assert_eq!(f.loss_scale().unwrap(), report["scale"].as_f64().unwrap());
    }
    let torch_w = Tensor::read_safetensors(&out).unwrap();
    for (name, want) in torch_w {
        let got = &vs.variables()[&name];
        let diff = (got - &want).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-6,
            "{name}: max difference {diff} (mixed={mixed})"
        );
    }
}

#[test]
fn matches_torch_fused_adamw_in_float32() {
    parity(false);
}

#[test]
fn matches_torch_fused_adamw_with_gradscaler_and_clipping() {
    parity(true);
}

fn run(
    f: &Fabric,
    vs: &mut nn::VarStore,
    resume: Option<&std::path::Path>,
    save_at: Option<(usize, &std::path::Path)>,
    steps: usize,
) -> Vec<(String, Tensor)> {
    let (x, y) = data();
    let m = model(vs);
    let opt = FusedAdamW::new(vs, 1e-2).unwrap();
    let (m, mut opt) = f.setup(m, vs, opt).unwrap();
    let mut start = 0;
    if let Some(p) = resume {
        start = f.load::<usize>(p).unwrap();
    }
    for i in start..steps {
        if let Some((at, p)) = save_at {
            if i == at {
                f.save(p, &i).unwrap();
            }
        }
        step(f, &m, &mut opt, &x, &y, true);
    }
    let mut w: Vec<_> = vs.variables().into_iter().collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn resume_from_a_checkpoint_is_exact() {
    // Same thread count for both runs (other tests in this binary set it too).
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let ckpt = tmp("resume.safetensors");
    let f1 = fabric(true);
    let mut vs1 = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(3);
    let full = run(&f1, &mut vs1, None, Some((12, &ckpt)), 25);
    let f2 = fabric(true);
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(99); // different initial weights: the checkpoint must overwrite them
    let resumed = run(&f2, &mut vs2, Some(&ckpt), None, 25);
    for ((n, a), (_, b)) in full.iter().zip(&resumed) {
        assert!(a.equal(b), "{n} differs after resume");
    }
    assert_eq!(f1.loss_scale().unwrap(), f2.loss_scale().unwrap());
    assert_eq!(f1.scaler_state().unwrap(), f2.scaler_state().unwrap());
}

/// PyTorch's checks of `torch.optim.AdamW`, each a typed error naming the value and its range:
/// at construction and `set_lr` for the rate, at `Fabric::setup` and every `step` for the
/// builder's values. Nothing steps and nothing changes.
#[test]
fn bad_hyper_parameters_are_errors_that_change_nothing() {
    use tch_fabric::{Error, Optimizer};
    let vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    m.forward(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)))
        .sum(Kind::Float)
        .backward();
    let before: Vec<Tensor> = vs.trainable_variables().iter().map(|t| t.copy()).collect();
    for lr in [f64::NAN, -1.0, f64::INFINITY] {
        let e = FusedAdamW::new(&vs, lr).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { field: "lr", .. }), "{e}");
        assert!(e.to_string().contains("Invalid learning rate"), "{e}");
    }
    let cases = [
        (
            FusedAdamW::new(&vs, 0.1).unwrap().eps(-1.0),
            "Invalid epsilon value",
        ),
        (
            FusedAdamW::new(&vs, 0.1).unwrap().eps(f64::NAN),
            "Invalid epsilon value",
        ),
        (
            FusedAdamW::new(&vs, 0.1).unwrap().betas(1.5, 0.999),
            "Invalid beta parameter at index 0",
        ),
        (
            FusedAdamW::new(&vs, 0.1).unwrap().betas(0.9, 1.0),
            "Invalid beta parameter at index 1",
        ),
        (
            FusedAdamW::new(&vs, 0.1).unwrap().betas(f64::NAN, 0.9),
            "Invalid beta parameter at index 0",
        ),
        (
            FusedAdamW::new(&vs, 0.1).unwrap().weight_decay(-0.1),
            "Invalid weight_decay value",
        ),
    ];
    for (mut opt, want) in cases {
        let err = opt.validate().unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        let err = opt.step().unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(opt.state_tensors().unwrap().is_empty());
    }
    // Fabric::setup refuses them before converting anything.
    let f = fabric(false);
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let m2 = model(&vs2);
    let bad = FusedAdamW::new(&vs2, 0.1).unwrap().betas(0.9, 1.0);
    let err = f.setup(m2, &mut vs2, bad).unwrap_err().to_string();
    assert!(err.contains("Invalid beta parameter at index 1"), "{err}");

    let mut ok = FusedAdamW::new(&vs, 0.1).unwrap();
    for lr in [f64::NAN, -0.5] {
        assert!(ok.set_lr(lr).is_err());
        assert_eq!(ok.lr(), 0.1, "a refused rate leaves the old one");
    }
    for (a, b) in vs.trainable_variables().iter().zip(&before) {
        assert!(a.equal(b), "nothing stepped");
    }
    // Loaded state is checked value by value: a negative second moment is refused by name.
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let state = |sq: Tensor| {
        vec![
            ("l1.weight.exp_avg".to_string(), zeros(&[16, 8])),
            ("l1.weight.exp_avg_sq".to_string(), sq),
            ("l1.weight.step".to_string(), Tensor::from(1.0f32)),
        ]
    };
    let e = ok.load_state(&state(zeros(&[16, 8]) - 1.0)).unwrap_err();
    assert!(matches!(e, Error::InvalidState(_)), "{e}");
    assert!(
        e.to_string()
            .contains("'l1.weight.exp_avg_sq' holds negative"),
        "{e}"
    );
    assert!(ok.state_tensors().unwrap().is_empty(), "nothing was loaded");
    ok.load_state(&state(zeros(&[16, 8]))).unwrap();
    assert_eq!(ok.state_tensors().unwrap().len(), 3);
}

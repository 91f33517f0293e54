//! `AdamW`, `Adam` and `Sgd` against PyTorch's default `torch.optim.AdamW`, `Adam` and `SGD`
//! (the for-loop path PyTorch picks on CPU, and `foreach=True`), training the same MLP from
//! the same weights under Lightning Fabric in every precision (16-mixed: a plain autocast +
//! GradScaler loop, as Lightning turns 16-mixed into bf16-mixed on CPU). Losses and final
//! weights must be the same bits.
//!
//! The PyTorch side runs live: `.venv/bin/python scripts/torch_optim_reference.py` (a few
//! seconds), so the reference comes from this machine's PyTorch 2.13.
mod common;

use serde_json::{json, Value};
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::optim::Group;
use tch_fabric::{
    Adam, AdamW, Fabric, FabricModule, FabricOptimizer, FusedAdamW, FusedSgd, GradScalerConfig,
    Optimizer, Sgd,
};

const STEPS: usize = 25;
const PRECISIONS: [&str; 6] = [
    "32-true",
    "64-true",
    "bf16-true",
    "16-true",
    "bf16-mixed",
    "16-mixed",
];

/// (name, PyTorch class, PyTorch keyword arguments). The learning rates are PyTorch's
/// defaults for Adam (1e-3) and a usual one for SGD.
fn optimizers() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("adamw", "AdamW", json!({"lr": 1e-2})),
        (
            "adam_amsgrad_l2",
            "Adam",
            json!({"lr": 1e-3, "weight_decay": 0.01, "amsgrad": true}),
        ),
        (
            "adamw_betas_eps",
            "AdamW",
            json!({"lr": 1e-2, "betas": [0.8, 0.95], "eps": 1e-4, "weight_decay": 0.1}),
        ),
        ("sgd", "SGD", json!({"lr": 0.05})),
        (
            "sgd_nesterov",
            "SGD",
            json!({"lr": 0.05, "momentum": 0.9, "nesterov": true, "weight_decay": 1e-3}),
        ),
        (
            "sgd_dampening_maximize",
            "SGD",
            json!({"lr": 1e-3, "momentum": 0.5, "dampening": 0.1, "maximize": true}),
        ),
    ]
}

fn model(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "l1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 16, 4, Default::default()))
}

fn fabric(precision: &str) -> Fabric {
    let b = Fabric::builder().accelerator("cpu").precision(precision);
    let b = if precision == "16-mixed" {
        b.cpu_fp16_autocast(true).grad_scaler(
            GradScalerConfig::default()
                .init_scale(2f64.powi(24))
                .growth_interval(4),
        )
    } else {
        b
    };
    b.build().unwrap()
}

/// Trains a fresh copy of the model with the optimizer of case `name` (as PyTorch's keyword
/// arguments say) and PyTorch's `foreach`.
fn run_case(f: &Fabric, vs: &mut nn::VarStore, m: nn::Sequential, name: &str, fe: bool) -> Run {
    match name {
        "adamw" => train(f, vs, m, AdamW::new(vs, 1e-2).unwrap().foreach(fe)),
        "adam_amsgrad_l2" => {
            let opt = Adam::new(vs, 1e-3)
                .unwrap()
                .weight_decay(0.01)
                .amsgrad(true);
            train(f, vs, m, opt.foreach(fe))
        }
        "adamw_betas_eps" => {
            let opt = AdamW::new(vs, 1e-2).unwrap().betas(0.8, 0.95).eps(1e-4);
            train(f, vs, m, opt.weight_decay(0.1).foreach(fe))
        }
        "sgd" => train(f, vs, m, Sgd::new(vs, 0.05).unwrap().foreach(fe)),
        "sgd_nesterov" => {
            let opt = Sgd::new(vs, 0.05).unwrap().momentum(0.9).nesterov(true);
            train(f, vs, m, opt.weight_decay(1e-3).foreach(fe))
        }
        "sgd_dampening_maximize" => {
            let opt = Sgd::new(vs, 1e-3).unwrap().momentum(0.5).dampening(0.1);
            train(f, vs, m, opt.maximize(true).foreach(fe))
        }
        other => panic!("no case {other}"),
    }
}

struct Run {
    losses: Vec<u64>,
    stepped: Vec<bool>,
}

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu)) * 4.0;
    let y = Tensor::randn([32, 4], (Kind::Float, Device::Cpu));
    (x, y)
}

/// One training step on (x, y): whether the optimizer stepped, and the loss's bits.
fn step(
    f: &Fabric,
    m: &FabricModule<nn::Sequential>,
    opt: &mut FabricOptimizer,
    x: &Tensor,
    y: &Tensor,
) -> (bool, u64) {
    opt.zero_grad().unwrap();
    let out = m.forward(x);
    let loss = {
        let _ac = f.autocast().unwrap();
        out.mse_loss(y, Reduction::Mean)
    };
    f.backward(&loss).unwrap();
    let stepped = !opt.step().unwrap().is_skipped();
    (stepped, loss.double_value(&[]).to_bits())
}

fn train<O: Optimizer + 'static>(
    f: &Fabric,
    vs: &mut nn::VarStore,
    m: nn::Sequential,
    opt: O,
) -> Run {
    let (x, y) = data();
    let (m, mut opt) = f.setup(m, vs, opt).unwrap();
    let mut run = Run {
        losses: Vec::new(),
        stepped: Vec::new(),
    };
    for _ in 0..STEPS {
        let (stepped, loss) = step(f, &m, &mut opt, &x, &y);
        run.stepped.push(stepped);
        run.losses.push(loss);
    }
    run
}

/// The values of a tensor as float64 bits (NaN compares equal to NaN).
fn bits(t: &Tensor) -> Vec<u64> {
    let v: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    v.iter()
        .map(|x| if x.is_nan() { u64::MAX } else { x.to_bits() })
        .collect()
}

/// A scratch folder named `what`, and the initial weights and data shared with Python there.
fn initial(what: &str) -> (std::path::PathBuf, nn::VarStore, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tch-fabric-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (x, y) = data();
    tch::manual_seed(5);
    let vs0 = nn::VarStore::new(Device::Cpu);
    let _m = model(&vs0);
    let init = dir.join("init.safetensors");
    let mut tensors: Vec<(String, Tensor)> = vs0.variables().into_iter().collect();
    tensors.push(("x".into(), x));
    tensors.push(("y".into(), y));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &init).unwrap();
    (dir, vs0, init)
}

/// Runs the Python reference on `cases`.
fn reference(init: &std::path::Path, dir: &std::path::Path, cases: Vec<Value>) -> Value {
    let config = json!({"init": init, "out_dir": dir, "steps": STEPS, "cases": cases});
    let script =
        std::fs::read_to_string(common::repo().join("scripts/torch_optim_reference.py")).unwrap();
    serde_json::from_str(common::run_python(&script, &config.to_string()).trim()).unwrap()
}

/// The differences between a run and PyTorch's `case`: steps taken or skipped, every loss,
/// every final weight.
fn compare(
    report: &Value,
    case: &str,
    run: &Run,
    vs: &nn::VarStore,
    dir: &std::path::Path,
) -> Vec<String> {
    let mut failures = Vec::new();
    let want = &report[case];
    let want_losses: Vec<u64> = want["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let want_stepped: Vec<bool> = want["stepped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    if run.stepped != want_stepped {
        failures.push(format!(
            "{case}: stepped {:?} vs {want_stepped:?}",
            run.stepped
        ));
    }
    if let Some(k) = (0..STEPS).find(|&k| run.losses[k] != want_losses[k]) {
        failures.push(format!(
            "{case}: loss at step {k}: {} vs PyTorch {}",
            f64::from_bits(run.losses[k]),
            f64::from_bits(want_losses[k])
        ));
    }
    let torch_w = Tensor::read_safetensors(dir.join(format!("{case}.safetensors"))).unwrap();
    for (key, w) in torch_w {
        let got = &vs.variables()[&key];
        let (a, b) = (bits(got), bits(&w));
        if a != b {
            let d = (got.to_kind(Kind::Double) - &w)
                .abs()
                .max()
                .double_value(&[]);
            failures.push(format!("{case}: {key} differs (max {d:e})"));
        }
    }
    failures
}

#[test]
fn default_optimizers_match_torch_optim_bit_for_bit_in_every_precision() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let (dir, vs0, init) = initial("torch-optim");

    let mut cases = Vec::new();
    for p in PRECISIONS {
        for (name, class, kwargs) in optimizers() {
            for foreach in [false, true] {
                cases.push(json!({
                    "name": format!("{p}_{name}_{foreach}"),
                    "precision": p, "optimizer": class, "kwargs": kwargs, "foreach": foreach,
                }));
            }
        }
    }
    let report = reference(&init, &dir, cases);

    let mut failures = Vec::new();
    let mut skipped_somewhere = false;
    for p in PRECISIONS {
        for (name, _, _) in optimizers() {
            for foreach in [false, true] {
                let f = fabric(p);
                let mut vs = nn::VarStore::new(Device::Cpu);
                let m = model(&vs);
                vs.copy(&vs0).unwrap();
                let run = run_case(&f, &mut vs, m, name, foreach);
                skipped_somewhere |= run.stepped.iter().any(|s| !s);
                let case = format!("{p}_{name}_{foreach}");
                failures.extend(compare(&report, &case, &run, &vs, &dir));
            }
        }
    }
    assert!(skipped_somewhere, "16-mixed at 2^24 skips its first steps");
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Two param groups, as nanoGPT builds them (matrices, then the rest), with per-group options:
/// (name, PyTorch class, optimizer kwargs, the groups, whether a fused variant runs too).
fn grouped() -> Vec<(&'static str, &'static str, Value, Value, bool)> {
    vec![
        (
            "adamw_decay_groups",
            "AdamW",
            json!({"lr": 1e-2, "betas": [0.9, 0.95]}),
            json!([{"select": "matrices", "weight_decay": 0.1},
                   {"select": "rest", "weight_decay": 0.0, "lr": 2e-2}]),
            true,
        ),
        (
            "adam_amsgrad_in_one_group",
            "Adam",
            json!({"lr": 1e-3, "weight_decay": 0.01}),
            json!([{"select": "matrices", "amsgrad": true},
                   {"select": "rest", "betas": [0.8, 0.99], "eps": 1e-6}]),
            false,
        ),
        (
            "sgd_momentum_in_one_group",
            "SGD",
            json!({"lr": 0.05}),
            json!([{"select": "matrices", "momentum": 0.9, "nesterov": true},
                   {"select": "rest", "lr": 0.01, "weight_decay": 1e-3}]),
            true,
        ),
    ]
}

/// The optimizer of grouped case `name`; `variant` is "fused" or "foreach_<bool>".
fn grouped_optimizer(vs: &nn::VarStore, name: &str, variant: &str) -> Box<dyn GroupedRun> {
    let foreach = variant == "foreach_true";
    let fused = variant == "fused";
    match (name, fused) {
        ("adamw_decay_groups", false) => Box::new(
            AdamW::new(vs, 1e-2)
                .unwrap()
                .betas(0.9, 0.95)
                .foreach(foreach)
                .param_groups(adamw_groups())
                .unwrap(),
        ),
        ("adamw_decay_groups", true) => Box::new(
            FusedAdamW::new(vs, 1e-2)
                .unwrap()
                .betas(0.9, 0.95)
                .param_groups(adamw_groups())
                .unwrap(),
        ),
        ("adam_amsgrad_in_one_group", _) => Box::new(
            Adam::new(vs, 1e-3)
                .unwrap()
                .weight_decay(0.01)
                .foreach(foreach)
                .param_groups([
                    Group::matching(|_, t| t.dim() >= 2).amsgrad(true),
                    Group::rest().betas(0.8, 0.99).eps(1e-6),
                ])
                .unwrap(),
        ),
        ("sgd_momentum_in_one_group", false) => Box::new(
            Sgd::new(vs, 0.05)
                .unwrap()
                .foreach(foreach)
                .param_groups(sgd_groups())
                .unwrap(),
        ),
        ("sgd_momentum_in_one_group", true) => Box::new(
            FusedSgd::new(vs, 0.05)
                .unwrap()
                .param_groups(sgd_groups())
                .unwrap(),
        ),
        other => panic!("no case {other:?}"),
    }
}

fn adamw_groups() -> [Group; 2] {
    [
        Group::matching(|_, t| t.dim() >= 2).weight_decay(0.1),
        Group::rest().weight_decay(0.0).lr(2e-2),
    ]
}

fn sgd_groups() -> [Group; 2] {
    [
        Group::matching(|_, t| t.dim() >= 2)
            .momentum(0.9)
            .nesterov(true),
        Group::rest().lr(0.01).weight_decay(1e-3),
    ]
}

/// An optimizer of any type, boxed, that a grouped case trains with.
trait GroupedRun {
    fn train(self: Box<Self>, f: &Fabric, vs: &mut nn::VarStore, m: nn::Sequential) -> Run;
}

impl<O: Optimizer + 'static> GroupedRun for O {
    fn train(self: Box<Self>, f: &Fabric, vs: &mut nn::VarStore, m: nn::Sequential) -> Run {
        train(f, vs, m, *self)
    }
}

#[test]
fn param_groups_match_torch_optim_bit_for_bit_in_every_precision() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let (dir, vs0, init) = initial("param-groups");
    // Not under 16-mixed for fused SGD with momentum: its first steps are skipped at scale
    // 2^24, and PyTorch's fused SGD then keeps momentum buffers it made with torch.empty
    // (garbage: its run goes NaN here), where FusedSgd's are zeros (documented on FusedSgd).
    let variants = |p: &str, name: &str, fused: bool| {
        let mut v = vec!["foreach_false", "foreach_true"];
        if fused && !(p == "16-mixed" && name.starts_with("sgd")) {
            v.push("fused");
        }
        v
    };
    let mut cases = Vec::new();
    for p in PRECISIONS {
        for (name, class, kwargs, groups, fused) in grouped() {
            for variant in variants(p, name, fused) {
                cases.push(json!({
                    "name": format!("{p}_{name}_{variant}"),
                    "precision": p, "optimizer": class, "kwargs": kwargs, "groups": groups,
                    "foreach": variant == "foreach_true", "fused": variant == "fused",
                }));
            }
        }
    }
    let report = reference(&init, &dir, cases);
    let mut failures = Vec::new();
    for p in PRECISIONS {
        for (name, _, _, _, fused) in grouped() {
            for variant in variants(p, name, fused) {
                let f = fabric(p);
                let mut vs = nn::VarStore::new(Device::Cpu);
                let m = model(&vs);
                vs.copy(&vs0).unwrap();
                let run = grouped_optimizer(&vs, name, variant).train(&f, &mut vs, m);
                let case = format!("{p}_{name}_{variant}");
                failures.extend(compare(&report, &case, &run, &vs, &dir));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs `steps` steps of the MLP with `make`'s optimizer, saving at `save_at` or starting from
/// `resume`; returns the final weights and optimizer state.
fn resumable<O: Optimizer + 'static>(
    precision: &str,
    make: impl Fn(&nn::VarStore) -> O,
    resume: Option<&std::path::Path>,
    save_at: Option<(usize, &std::path::Path)>,
) -> Vec<(String, Tensor)> {
    let (x, y) = data();
    let f = fabric(precision);
    tch::manual_seed(5);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let opt = make(&vs);
    let (m, mut opt) = f.setup(m, &mut vs, opt).unwrap();
    let start = resume.map_or(0, |p| f.load::<usize>(p).unwrap());
    for i in start..20 {
        if let Some((at, p)) = save_at {
            if i == at {
                f.save(p, &i).unwrap();
            }
        }
        step(&f, &m, &mut opt, &x, &y);
    }
    let mut all: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    all.extend(opt.state_tensors().unwrap());
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn resume_from_a_checkpoint_is_exact() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let dir = std::env::temp_dir().join(format!(
        "tch-fabric-torch-optim-resume-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, full: Vec<(String, Tensor)>, resumed: Vec<(String, Tensor)>| {
        assert_eq!(full.len(), resumed.len(), "{name}: same state");
        for ((n, a), (m, b)) in full.iter().zip(&resumed) {
            assert_eq!(n, m);
            assert_eq!(bits(a), bits(b), "{name}: {n} differs after resume");
        }
    };
    let ckpt = dir.join("adamw.safetensors");
    let adamw = |vs: &nn::VarStore| AdamW::new(vs, 1e-2).unwrap();
    let full = resumable("16-mixed", adamw, None, Some((10, &ckpt)));
    let resumed = resumable("16-mixed", adamw, Some(&ckpt), None);
    assert!(
        full.iter().any(|(n, _)| n.ends_with(".step")),
        "AdamW keeps step counts"
    );
    check("16-mixed AdamW", full, resumed);

    let ckpt = dir.join("sgd.safetensors");
    let sgd = |vs: &nn::VarStore| Sgd::new(vs, 0.05).unwrap().momentum(0.9).nesterov(true);
    let full = resumable("bf16-true", sgd, None, Some((10, &ckpt)));
    let resumed = resumable("bf16-true", sgd, Some(&ckpt), None);
    assert!(full.iter().any(|(n, _)| n.ends_with(".momentum_buffer")));
    check("bf16-true Sgd", full, resumed);
}

//! torch.save-format checkpoints both ways, against Lightning Fabric itself: a Python run
//! (`torch.optim.AdamW()` at its defaults, warm-up + cosine `SequentialLR`, clipping) saves at
//! step 10 with `fabric.save`; tch-fabric loads that file and trains steps 11-20, and the
//! losses and final weights equal the Python run's own steps 11-20. Then tch-fabric trains
//! steps 1-10, saves a `.ckpt`, and Lightning's `fabric.load` resumes from it with the same
//! result. 16-mixed uses the plain GradScaler loop on the Python side (Lightning turns 16-mixed
//! into bf16-mixed on CPU), with the scaler's state in the file.
//!
//! The Python side is `scripts/torch_checkpoint_reference.py`, run live through the provisioned
//! Python (`.venv/bin/python`), so the expected bits are this machine's PyTorch's.
mod common;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::lr_scheduler::{
    CosineAnnealingLR, LinearLR, Scheduler, SchedulerState, SequentialLR,
};
use tch_fabric::optim::Group;
use tch_fabric::{AdamW, Clip, Error, Fabric, FabricModule, FabricOptimizer, GradScalerConfig};

const STEPS: i64 = 20;
const SAVE_AT: i64 = 10;

/// What the checkpoint holds besides the model and optimizer, as Lightning's script saves it.
#[derive(Debug, Serialize, Deserialize)]
struct Extra {
    step: i64,
    scheduler: SchedulerState,
}

fn model(vs: &nn::VarStore) -> nn::Sequential {
    // Python's nn.Sequential names: "0.weight", "2.bias", ...
    nn::seq()
        .add(nn::linear(vs.root() / "0", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "2", 16, 4, Default::default()))
}

fn fabric(precision: &str) -> Fabric {
    let b = Fabric::builder().accelerator("cpu").precision(precision);
    let b = if precision == "16-mixed" {
        b.cpu_fp16_autocast(true).grad_scaler(
            GradScalerConfig::default()
                .init_scale(2f64.powi(16))
                .growth_interval(3),
        )
    } else {
        b
    };
    b.build().unwrap()
}

struct Setup {
    fabric: Fabric,
    vs: nn::VarStore,
    model: FabricModule<nn::Sequential>,
    opt: FabricOptimizer,
    sched: SequentialLR,
}

fn setup(precision: &str, init: &nn::VarStore, groups: bool) -> Setup {
    let fabric = fabric(precision);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    vs.copy(init).unwrap();
    let opt = AdamW::new(&vs, 1e-3).unwrap();
    // nanoGPT's two param groups.
    let opt = if groups {
        opt.param_groups([
            Group::matching(|_, t| t.dim() >= 2).weight_decay(0.1),
            Group::rest().weight_decay(0.0),
        ])
        .unwrap()
    } else {
        opt
    };
    let (model, mut opt) = fabric.setup(m, &mut vs, opt).unwrap();
    let warmup = LinearLR::new(&mut opt, 0.1, 1.0, 5).unwrap();
    let cosine = CosineAnnealingLR::new(&mut opt, STEPS - 5, 0.0).unwrap();
    let sched =
        SequentialLR::new(&mut opt, vec![Box::new(warmup), Box::new(cosine)], vec![5]).unwrap();
    Setup {
        fabric,
        vs,
        model,
        opt,
        sched,
    }
}

/// Steps `from..=to`, returning the losses' bits.
fn train(s: &mut Setup, x: &Tensor, y: &Tensor, from: i64, to: i64) -> Vec<u64> {
    let mut losses = Vec::new();
    for _ in from..=to {
        s.opt.zero_grad().unwrap();
        let out = s.model.forward(x);
        let loss = {
            let _ac = s.fabric.autocast().unwrap();
            out.mse_loss(y, Reduction::Mean)
        };
        s.fabric.backward(&loss).unwrap();
        s.fabric
            .clip_gradients(&mut s.opt, Clip::norm(1.0))
            .unwrap();
        let outcome = s.opt.step().unwrap();
        s.sched.step(&outcome, &mut s.opt).unwrap();
        losses.push(loss.double_value(&[]).to_bits());
    }
    losses
}

struct PyRun {
    losses: Vec<u64>,
    step: Option<i64>,
    weights: Vec<(String, Tensor)>,
}

fn python(
    init: &Path,
    (precision, groups): (&str, bool),
    save: Option<&Path>,
    resume: Option<&Path>,
    out: &Path,
) -> PyRun {
    let cfg = json!({
        "init": init, "precision": precision, "steps": STEPS, "save_at": SAVE_AT,
        "save": save, "resume": resume, "out": out, "groups": groups,
    });
    let script =
        std::fs::read_to_string(common::repo().join("scripts/torch_checkpoint_reference.py"))
            .unwrap();
    let v: Value =
        serde_json::from_str(common::run_python(&script, &cfg.to_string()).trim()).unwrap();
    PyRun {
        losses: v["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect(),
        step: v["step"].as_i64(),
        weights: Tensor::read_safetensors(out).unwrap(),
    }
}

/// The model's weights against Python's (float64 there): equal, or within `tol`.
fn assert_weights(
    precision: &str,
    what: &str,
    vs: &nn::VarStore,
    want: &[(String, Tensor)],
    tol: f64,
) {
    let vars = vs.variables();
    for (key, w) in want {
        let key = key.replace("l1.", "0.").replace("l2.", "2.");
        let got = vars[&key].to_kind(Kind::Double);
        let diff = (&got - w).abs().max().double_value(&[]);
        assert!(diff <= tol, "{precision} {what}: {key} differs by {diff:e}");
    }
}

fn assert_losses(precision: &str, what: &str, got: &[u64], want: &[u64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{precision} {what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from_bits(*g), f64::from_bits(*w));
        assert!(
            (g - w).abs() <= tol * w.abs(),
            "{precision} {what}: loss {i} is {g} vs {w}"
        );
    }
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-fabric-torchckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn init(dir: &Path) -> (nn::VarStore, Tensor, Tensor, PathBuf) {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = model(&vs);
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)) * 3.0;
    let y = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
    let vars = vs.variables();
    let path = dir.join("init.safetensors");
    let named = [
        ("l1.weight", &vars["0.weight"]),
        ("l1.bias", &vars["0.bias"]),
        ("l2.weight", &vars["2.weight"]),
        ("l2.bias", &vars["2.bias"]),
        ("x", &x),
        ("y", &y),
    ];
    Tensor::write_safetensors(&named, &path).unwrap();
    (vs, x, y, path)
}

#[test]
fn resumes_lightning_checkpoints_and_lightning_resumes_ours() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let dir = scratch();
    let (vs0, x, y, init_path) = init(&dir);
    // Tolerances: none in the true precisions; the mixed ones as tests/fabric_parity.rs. Each
    // with one param group, and with nanoGPT's two.
    let runs = [
        ("32-true", 0.0),
        ("64-true", 0.0),
        ("bf16-mixed", 0.0),
        ("16-mixed", 0.0),
    ]
    .into_iter()
    .flat_map(|(p, tol)| [(p, tol, false), (p, tol, true)]);
    for (precision, tol, groups) in runs {
        let py_ckpt = dir.join(format!("{precision}-{groups}-python.ckpt"));
        let full = python(
            &init_path,
            (precision, groups),
            Some(&py_ckpt),
            None,
            &dir.join("full.safetensors"),
        );
        assert_eq!(full.losses.len(), STEPS as usize);

        // Python -> Rust.
        let mut s = setup(precision, &vs0, groups);
        let extra: Extra = s.fabric.load(&py_ckpt).unwrap();
        assert_eq!(extra.step, SAVE_AT);
        s.sched.load_state_dict(&extra.scheduler).unwrap();
        let losses = train(&mut s, &x, &y, SAVE_AT + 1, STEPS);
        assert_losses(
            precision,
            "Python -> Rust",
            &losses,
            &full.losses[SAVE_AT as usize..],
            tol,
        );
        assert_weights(precision, "Python -> Rust", &s.vs, &full.weights, tol);

        // Rust -> Python.
        let mut s = setup(precision, &vs0, groups);
        let first = train(&mut s, &x, &y, 1, SAVE_AT);
        assert_losses(
            precision,
            "Rust steps 1-10",
            &first,
            &full.losses[..SAVE_AT as usize],
            tol,
        );
        let rs_ckpt = dir.join(format!("{precision}-{groups}-rust.ckpt"));
        let extra = Extra {
            step: SAVE_AT,
            scheduler: s.sched.state_dict(),
        };
        s.fabric.save(&rs_ckpt, &extra).unwrap();
        let resumed = python(
            &init_path,
            (precision, groups),
            None,
            Some(&rs_ckpt),
            &dir.join("resumed.safetensors"),
        );
        assert_eq!(resumed.step, Some(SAVE_AT));
        assert_losses(
            precision,
            "Rust -> Python",
            &resumed.losses,
            &full.losses[SAVE_AT as usize..],
            tol,
        );
        for (k, a) in &resumed.weights {
            let b = &full.weights.iter().find(|(n, _)| n == k).unwrap().1;
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(
                diff <= tol,
                "{precision} Rust -> Python: {k} differs by {diff:e}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Checkpoints a load must refuse, written by PyTorch itself.
const BAD_FILES: &str = r#"
import argparse, collections, sys, torch
d = sys.stdin.read().strip()
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
sd = m.state_dict()
adamw = torch.optim.AdamW(m.parameters())
sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
m(torch.randn(2, 8)).sum().backward(); adamw.step(); sgd.step()
def save(name, obj): torch.save(obj, f"{d}/{name}.pt")
save("good", {"model": sd, "optimizer": adamw.state_dict(), "step": 1})
save("object", {"model": sd, "args": argparse.Namespace(lr=0.1)})
save("missing", {"model": {k: v for k, v in sd.items() if k != "2.bias"}})
save("unexpected", {"model": {**sd, "3.weight": torch.ones(2)}})
save("shape", {"model": {**sd, "0.weight": torch.ones(16, 9)}})
save("sgd", {"model": sd, "optimizer": sgd.state_dict()})
save("tensor_extra", {"model": sd, "optimizer": adamw.state_dict(), "rng": torch.ones(3),
                      "best_val_loss": torch.tensor(1.5), "counts": torch.tensor([[1, 2], [3, 4]])})
save("no_optimizer", {"model": sd, "step": 1})
save("no_model", {"weights": sd})
"#;

#[test]
fn refuses_what_does_not_fit() {
    let dir = scratch().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    common::run_python(BAD_FILES, &dir.display().to_string());
    let vs0 = nn::VarStore::new(Device::Cpu);
    let _m = model(&vs0);
    let s = setup("32-true", &vs0, false);
    let before: Vec<(String, Tensor)> =
        s.vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect();
    let lr = s.opt.lr();
    let refused = |s: &Setup, name: &str, want: &[&str]| {
        let path = dir.join(format!("{name}.pt"));
        match s.fabric.load::<Value>(&path) {
            Err(Error::Checkpoint { reason, .. }) => {
                for w in want {
                    assert!(reason.contains(w), "{name}: '{reason}' does not name '{w}'");
                }
            }
            other => panic!("{name}: {other:?}"),
        }
    };
    refused(&s, "object", &["argparse.Namespace", "weights_only"]);
    refused(&s, "missing", &["'2.bias'", "not in the checkpoint"]);
    refused(&s, "unexpected", &["'3.weight'", "matches no parameter"]);
    refused(&s, "shape", &["'0.weight'", "[16, 9]"]);
    refused(&s, "sgd", &["SGD", "AdamW"]);
    refused(
        &s,
        "no_optimizer",
        &["no state for [\"optimizer\"]", "load_non_strict"],
    );
    refused(&s, "no_model", &["no entry 'model'", "weights"]);
    // A damaged archive: cut short, or with bytes of its pickle changed.
    let good = std::fs::read(dir.join("good.pt")).unwrap();
    std::fs::write(dir.join("short.pt"), &good[..good.len() / 2]).unwrap();
    refused(&s, "short", &["torch.save archive"]);
    let mut flipped = good.clone();
    let at = good.windows(8).position(|w| w == b"data.pkl").unwrap() + 60;
    flipped[at] ^= 0x55;
    std::fs::write(dir.join("flipped.pt"), &flipped).unwrap();
    refused(&s, "flipped", &[]);
    // Nothing changed by any refusal.
    for (k, v) in &before {
        assert!(s.vs.variables()[k].equal(v), "{k} changed");
    }
    assert_eq!(s.opt.lr(), lr);
    // Lightning's strict=False: missing and unexpected weights reported, the rest loaded.
    let (_, report): (Value, _) = s.fabric.load_non_strict(dir.join("missing.pt")).unwrap();
    assert_eq!(report.missing_keys, ["2.bias"]);
    assert_eq!(report.missing_state, ["optimizer"]);
    assert!(report.unexpected_keys.is_empty());
    assert!(
        s.vs.variables()["2.bias"].equal(&before.iter().find(|(k, _)| k == "2.bias").unwrap().1)
    );
    assert!(!s.vs.variables()["0.weight"]
        .equal(&before.iter().find(|(k, _)| k == "0.weight").unwrap().1));
    let (_, report): (Value, _) = s.fabric.load_non_strict(dir.join("unexpected.pt")).unwrap();
    assert_eq!(
        (report.missing_keys.len(), report.unexpected_keys),
        (0, vec!["3.weight".to_string()])
    );
    // The shape is checked in either mode, as PyTorch's load_state_dict does.
    assert!(s
        .fabric
        .load_non_strict::<Value>(dir.join("shape.pt"))
        .is_err());

    // And the good file loads, with its extra entry for serde and its learning rate.
    let extra: Value = s.fabric.load(dir.join("good.pt")).unwrap();
    assert_eq!(extra, json!({"step": 1}));
    assert_eq!(s.opt.lr(), 1e-3);
    // Tensors in the user state load as numbers (0-dim, nanoGPT's best_val_loss) and arrays.
    #[derive(Deserialize)]
    struct WithTensors {
        rng: Vec<f32>,
        best_val_loss: f64,
        counts: Vec<Vec<i64>>,
    }
    let t: WithTensors = s.fabric.load(dir.join("tensor_extra.pt")).unwrap();
    assert_eq!(
        (t.rng, t.best_val_loss, t.counts),
        (vec![1.0; 3], 1.5, vec![vec![1, 2], vec![3, 4]])
    );

    // Saving: a state that is not a map, or one colliding with the checkpoint's own entries.
    let ckpt = dir.join("out.ckpt");
    assert!(matches!(s.fabric.save(&ckpt, &(1, 2)), Err(Error::Usage(m)) if m.contains("map")));
    assert!(matches!(
        s.fabric.save(&ckpt, &json!({"optimizer": 1})),
        Err(Error::Usage(m)) if m.contains("collides")
    ));
    assert!(!ckpt.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_tch_optimizer_has_no_torch_format() {
    let dir = scratch();
    let f = Fabric::builder().accelerator("cpu").build().unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    let opt = tch_fabric::TchOptimizer::new(&vs, nn::Adam::default(), 1e-3).unwrap();
    let _ = f.setup(m, &mut vs, opt).unwrap();
    let ckpt = dir.join("tch.pt");
    match f.save(&ckpt, &json!({})) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(reason.contains("torch.optim twin"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The same state saves as safetensors.
    f.save(dir.join("tch.safetensors"), &json!({})).unwrap();
}

#[test]
fn non_strict_loads_report_in_both_formats() {
    let dir = scratch().join("nonstrict");
    std::fs::create_dir_all(&dir).unwrap();
    for ext in ["safetensors", "pt"] {
        let path = dir.join(format!("small.{ext}"));
        // Saved: layers "0" and "2"; loaded into layers "0" and "5".
        let f = Fabric::builder().accelerator("cpu").build().unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let m = model(&vs);
        let _ = f.setup_module(m, &mut vs).unwrap();
        f.save(&path, &json!({"epoch": 2})).unwrap();
        let g = Fabric::builder().accelerator("cpu").build().unwrap();
        let mut other = nn::VarStore::new(Device::Cpu);
        let m2 = nn::seq()
            .add(nn::linear(other.root() / "0", 8, 16, Default::default()))
            .add(nn::linear(other.root() / "5", 16, 4, Default::default()));
        let _ = g.setup_module(m2, &mut other).unwrap();
        assert!(g.load::<Value>(&path).is_err(), "{ext}: strict refuses");
        let (state, mut report): (Value, _) = g.load_non_strict(&path).unwrap();
        assert_eq!(state, json!({"epoch": 2}), "{ext}");
        report.missing_keys.sort();
        report.unexpected_keys.sort();
        assert_eq!(report.missing_keys, ["5.bias", "5.weight"], "{ext}");
        assert_eq!(report.unexpected_keys, ["2.bias", "2.weight"], "{ext}");
        assert!(
            other.variables()["0.weight"].equal(&vs.variables()["0.weight"]),
            "{ext}"
        );
    }
}

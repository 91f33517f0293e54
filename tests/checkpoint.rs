//! Fabric checkpoints: round trip with the scaler and user state, readable from Python,
//! atomic, and every bad file refused without changing anything.
mod common;

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};
use tch_fabric::{Error, Fabric, FabricModule, FabricOptimizer, GradScalerConfig, TchOptimizer};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct State {
    step: u64,
    epoch: u32,
}

fn fabric(precision: &str) -> Fabric {
    Fabric::builder()
        .precision(precision)
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(GradScalerConfig::default().init_scale(2f64.powi(30)))
        .build()
        .unwrap()
}

fn model(fabric: &Fabric) -> (FabricModule<nn::Sequential>, FabricOptimizer, nn::VarStore) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = nn::seq()
        .add(nn::linear(vs.root() / "l1", 4, 8, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "l2", 8, 1, Default::default()));
    let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.05).unwrap();
    let (m, o) = fabric.setup(m, &mut vs, opt).unwrap();
    (m, o, vs)
}

fn train(
    fabric: &Fabric,
    m: &FabricModule<nn::Sequential>,
    opt: &mut FabricOptimizer,
    steps: usize,
) {
    let x = Tensor::full([8, 4], 30.0, (Kind::Float, Device::Cpu));
    for _ in 0..steps {
        opt.zero_grad().unwrap();
        let out = m.forward(&x);
        let loss = {
            let _ac = fabric.autocast().unwrap();
            out.pow_tensor_scalar(2).mean(Kind::Float)
        };
        fabric.backward(&loss).unwrap();
        opt.step().unwrap();
    }
}

fn weights(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1.equal(&y.1))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-fabric-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn round_trip_restores_weights_scaler_and_state() {
    let f = fabric("16-mixed");
    let (m, mut opt, vs) = model(&f);
    train(&f, &m, &mut opt, 12);
    assert!(
        f.skipped_steps().unwrap() > 0,
        "the large init scale overflows at first"
    );
    let path = tmp("round_trip.safetensors");
    f.save(&path, &State { step: 12, epoch: 1 }).unwrap();
    let saved_w = weights(&vs);
    let saved_scaler = f.scaler_state().unwrap();

    // A fresh run loads it all back.
    let g = fabric("16-mixed");
    let (_m2, _o2, vs2) = model(&g);
    assert!(!same(&weights(&vs2), &saved_w));
    let state: State = g.load(&path).unwrap();
    assert_eq!(state, State { step: 12, epoch: 1 });
    assert!(same(&weights(&vs2), &saved_w));
    assert_eq!(g.scaler_state().unwrap(), saved_scaler);
    assert_eq!(g.loss_scale().unwrap(), f.loss_scale().unwrap());
}

#[test]
fn python_reads_the_weights_and_the_scaler_state() {
    let f = fabric("16-mixed");
    let (m, mut opt, vs) = model(&f);
    train(&f, &m, &mut opt, 5);
    let path = tmp("python.safetensors");
    f.save(&path, &State { step: 5, epoch: 0 }).unwrap();
    let code = r#"
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
path = sys.stdin.readline().strip()
tensors = load_file(path)
with safe_open(path, "pt") as f:
    meta = f.metadata()
scaler = torch.amp.GradScaler("cpu")
scaler.load_state_dict(json.loads(meta["tch_fabric.grad_scaler"]))
print(json.dumps({
    "values": {k: v.flatten().tolist() for k, v in tensors.items()},
    "dtypes": sorted({str(v.dtype) for v in tensors.values()}),
    "precision": meta["tch_fabric.precision"],
    "state": json.loads(meta["tch_fabric.state"]),
    "scale": scaler.get_scale(),
}))
"#;
    let out = common::run_python(code, &format!("{}\n", path.display()));
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for (name, t) in weights(&vs) {
        let py: Vec<f64> = out["values"][&name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let ours: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        assert_eq!(py.len(), ours.len(), "{name}");
        for (i, (a, b)) in py.iter().zip(&ours).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{name}[{i}]: Python reads {a}, saved {b}"
            );
        }
    }
    assert_eq!(out["dtypes"], serde_json::json!(["torch.float32"]));
    assert_eq!(out["precision"], "16-mixed");
    assert_eq!(out["state"], serde_json::json!({"step": 5, "epoch": 0}));
    assert_eq!(out["scale"].as_f64().unwrap(), f.loss_scale().unwrap());
}

#[test]
fn a_checkpoint_of_another_precision_is_converted() {
    let f = fabric("32-true");
    let (_m, _o, vs) = model(&f);
    let path = tmp("convert.safetensors");
    f.save(&path, &State { step: 0, epoch: 0 }).unwrap();
    let g = fabric("bf16-true");
    let (_m2, _o2, vs2) = model(&g);
    let _: State = g.load(&path).unwrap();
    for (name, t) in vs2.variables() {
        assert_eq!(
            t.kind(),
            Kind::BFloat16,
            "{name} keeps the current precision's dtype"
        );
        let want = vs.variables()[&name].to_kind(Kind::BFloat16);
        assert!(t.equal(&want), "{name}");
    }
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() {
    struct Unserialisable;
    impl Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refuses to serialise"))
        }
    }
    let f = fabric("32-true");
    let (_m, _o, _vs) = model(&f);
    let path = tmp("atomic.safetensors");
    f.save(&path, &State { step: 1, epoch: 0 }).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(f.save(&path, &Unserialisable).is_err());
    // A save into a folder that does not exist fails too, and touches nothing else.
    assert!(matches!(
        f.save(
            path.with_file_name("missing-dir/x.safetensors"),
            &State { step: 2, epoch: 0 }
        ),
        Err(Error::Io { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files are left behind");
    let s: State = f.load(&path).unwrap();
    assert_eq!(s.step, 1);
}

#[test]
fn bad_files_are_clear_errors_and_change_nothing() {
    let f = fabric("32-true");
    let (_m, _o, vs) = model(&f);
    let good = tmp("good.safetensors");
    f.save(&good, &State { step: 3, epoch: 0 }).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let w0 = weights(&vs);

    let missing = tmp("does-not-exist.safetensors");
    let e = f.load::<State>(&missing).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("does-not-exist"),
        "{e}"
    );

    let truncated = tmp("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = f.load::<State>(&truncated).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");

    let foreign = tmp("foreign.safetensors");
    std::fs::write(&foreign, b"{\"not\": \"a checkpoint\"}").unwrap();
    let e = f.load::<State>(&foreign).unwrap_err();
    assert!(e.to_string().contains("not a safetensors file"), "{e}");

    // A valid safetensors file from elsewhere (no tch-fabric metadata).
    let other = tmp("other.safetensors");
    let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("x", &t)], &other).unwrap();
    let e = f.load::<State>(&other).unwrap_err();
    assert!(e.to_string().contains("not a tch-fabric checkpoint"), "{e}");

    // Another model's checkpoint: shapes differ.
    let g = fabric("32-true");
    let mut vs_g = nn::VarStore::new(Device::Cpu);
    let m = nn::linear(vs_g.root() / "l1", 4, 3, Default::default());
    let opt = TchOptimizer::new(&vs_g, nn::Sgd::default(), 0.1).unwrap();
    let _ = g.setup(m, &mut vs_g, opt).unwrap();
    let e = g.load::<State>(&good).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");

    // The user state does not match the requested type.
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Other {
        lr: f64,
    }
    assert!(matches!(f.load::<Other>(&good), Err(Error::Json(_))));

    assert!(same(&weights(&vs), &w0), "failed loads changed no weight");
}

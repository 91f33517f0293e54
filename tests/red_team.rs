//! The second red team's misuse cases outside file parsing (issue #28; the crafted files are
//! in hostile_checkpoints.rs, faults in checkpoint_crash.rs, panics in bad_inputs.rs, launcher
//! variables in fabric_env.rs): each
//! gets a typed error naming the problem and leaves every state as it was, or round-trips.
mod common;

use common::{same, weights};
use std::collections::BTreeMap;
use tch::{nn, Device, Kind};
use tch_fabric::lr_scheduler::{OneCycle, OneCycleLR, Scheduler, StepLR};
use tch_fabric::optim::{OptimizerState, Params};
use tch_fabric::{AdamW, Error, Fabric, Optimizer, Sgd};

/// One tensor under two names would be updated twice a step (PyTorch only warns).
#[test]
fn the_same_tensor_twice_in_params_is_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[3]);
    let e = Params::new(vec![
        ("a".into(), w.shallow_clone()),
        ("b".into(), w.shallow_clone()),
    ])
    .unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e}");
    assert!(
        e.to_string().contains("'a' and 'b' are the same tensor"),
        "{e}"
    );
    // Two views of one storage are two tensors (PyTorch's rule too): allowed.
    assert!(Params::new(vec![
        ("a".into(), w.shallow_clone()),
        ("b".into(), w.detach())
    ])
    .is_ok());
}

/// A failed `step` changes nothing: lr 1e300 overflows float32 in the step's scalars, which
/// libtorch refuses half-way through the update in PyTorch's for-loop and foreach AdamW and SGD.
#[test]
fn a_step_whose_scalars_overflow_changes_nothing() {
    for foreach in [false, true] {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().ones("w", &[4]);
        (&w * 2.0).sum(Kind::Float).backward();
        let before = weights(&vs);
        let mut adam = AdamW::new(&vs, 1e300).unwrap().foreach(foreach);
        let e = adam.step().unwrap_err();
        assert!(e.to_string().contains("nothing was changed"), "{e}");
        assert!(
            same(&before, &weights(&vs)),
            "foreach {foreach}: weights changed"
        );
        // No state was made either: the step never happened.
        assert!(
            adam.state_tensors().unwrap().is_empty(),
            "foreach {foreach}"
        );
        let mut sgd = Sgd::new(&vs, 1e300).unwrap().foreach(foreach);
        if let Err(e) = sgd.step() {
            assert!(e.to_string().contains("nothing was changed"), "{e}");
            assert!(
                same(&before, &weights(&vs)),
                "foreach {foreach}: SGD changed weights"
            );
        }
    }
}

/// OneCycleLR with pct_start 1.0 over 1 step divides by zero in PyTorch: refused before the
/// optimizer's beta1 or rates are touched.
#[test]
fn a_refused_one_cycle_leaves_the_optimizer_alone() {
    let (_fabric, _vs, mut opt) = adamw_set_up();
    let (lr, beta1) = (opt.lr(), opt.momentum());
    let mut c = OneCycle::new(0.1, 1);
    c.pct_start = 1.0;
    let e = OneCycleLR::new(&mut opt, c).unwrap_err();
    assert!(e.to_string().contains("pct_start"), "{e}");
    assert_eq!((opt.lr(), opt.momentum()), (lr, beta1));
    assert_eq!(beta1, Some(0.9));
}

/// A scheduler loaded at the last epoch an i64 holds refuses to step rather than wrap.
#[test]
fn a_scheduler_at_i64_max_refuses_to_step() {
    let (_fabric, _vs, mut opt) = adamw_set_up();
    let mut sched = StepLR::new(&mut opt, 10, 0.5).unwrap();
    let mut state = sched.state_dict();
    state.last_epoch = i64::MAX;
    sched.load_state_dict(&state).unwrap();
    let lr = opt.lr();
    let e = sched.advance(&mut opt).unwrap_err();
    assert!(e.to_string().contains("cannot step further"), "{e}");
    assert_eq!(sched.state_dict().last_epoch, i64::MAX);
    assert_eq!(opt.lr(), lr);
}

fn fabric_with_model(name: &str) -> (Fabric, nn::VarStore) {
    let fabric = Fabric::builder().accelerator("cpu").build().unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _ = vs.root().ones(name, &[2]);
    let _ = fabric.setup_module((), &mut vs).unwrap();
    (fabric, vs)
}

/// A Fabric with one model variable and an AdamW (lr 1e-3) over it, set up.
fn adamw_set_up() -> (Fabric, nn::VarStore, tch_fabric::FabricOptimizer) {
    let (fabric, vs) = fabric_with_model("w");
    let opt = fabric
        .setup_optimizers(AdamW::new(&vs, 1e-3).unwrap())
        .unwrap();
    (fabric, vs, opt)
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tch-fabric-red-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Saves refuse up front what they could not load back: NaN and inf (the state is JSON in both
/// formats), integers past i64 in a torch.save file; the file is not written.
#[test]
fn saves_refuse_states_they_could_not_load_back() {
    let d = dir("lossless");
    let (fabric, _vs) = fabric_with_model("w");
    for ext in ["pt", "safetensors"] {
        let path = d.join(format!("nan.{ext}"));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = fabric
                .save(&path, &BTreeMap::from([("best_loss", bad)]))
                .unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{ext}: {e}");
            assert!(e.to_string().contains("'best_loss'"), "{ext}: {e}");
            assert!(!path.exists(), "{ext}: a file was written");
        }
        let big = BTreeMap::from([("seed", u64::MAX)]);
        let path = d.join(format!("big.{ext}"));
        if ext == "pt" {
            let e = fabric.save(&path, &big).unwrap_err();
            assert!(e.to_string().contains("'seed'"), "{e}");
            assert!(!path.exists());
        } else {
            fabric.save(&path, &big).unwrap();
            let back: BTreeMap<String, u64> = fabric.load(&path).unwrap();
            assert_eq!(back["seed"], u64::MAX);
        }
        // i64's range round-trips in both.
        let edge = BTreeMap::from([("a", i64::MAX), ("b", i64::MIN)]);
        let path = d.join(format!("edge.{ext}"));
        fabric.save(&path, &edge).unwrap();
        let back: BTreeMap<String, i64> = fabric.load(&path).unwrap();
        assert_eq!(
            back,
            BTreeMap::from([("a".into(), i64::MAX), ("b".into(), i64::MIN)])
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The key the reader gives a state_dict's `_metadata` is one the file does not hold: a user
/// key named like it is kept (it used to vanish on load).
#[test]
fn entries_named_like_the_readers_own_key_are_kept() {
    let d = dir("build-key");
    let key = "\u{0}tch_fabric.build_state";
    let (fabric, _vs) = fabric_with_model("w");
    let path = d.join("user.pt");
    fabric.save(&path, &BTreeMap::from([(key, 7u32)])).unwrap();
    let back: BTreeMap<String, u32> = fabric.load(&path).unwrap();
    assert_eq!(back.get(key), Some(&7));

    // A model entry of that name: hostile_checkpoints.rs ("key_named_like_build_state").
    let _ = std::fs::remove_dir_all(&d);
}

/// An optimizer over parameters named otherwise than their VarStore names them: a torch.save
/// file finds optimizer state through the models' names, so the save is refused up front (it
/// used to write a file its own load refused); a .safetensors save keeps working.
#[test]
fn a_torch_save_its_own_load_would_refuse_is_refused() {
    let d = dir("renamed");
    let fabric = Fabric::builder().accelerator("cpu").build().unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().ones("w", &[3]);
    let params = Params::new(vec![("renamed".into(), w.shallow_clone())]).unwrap();
    let opt = AdamW::with_params(params, 1e-3).unwrap();
    let (_m, mut opt) = fabric.setup((), &mut vs, opt).unwrap();
    (&w * 2.0).sum(Kind::Float).backward();
    opt.step().unwrap();
    let state = BTreeMap::from([("epoch", 1u32)]);
    let path = d.join("renamed.ckpt");
    let e = fabric.save(&path, &state).unwrap_err().to_string();
    assert!(e.contains("'renamed'") && e.contains(".safetensors"), "{e}");
    assert!(!path.exists());
    let path = d.join("renamed.safetensors");
    fabric.save(&path, &state).unwrap();
    let back: BTreeMap<String, u32> = fabric.load(&path).unwrap();
    assert_eq!(back, BTreeMap::from([("epoch".into(), 1)]));
    let _ = std::fs::remove_dir_all(&d);
}

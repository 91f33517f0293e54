//! Fabric checkpoints: round trip with the scaler and user state, readable from Python,
//! atomic, and every bad file refused without changing anything.
mod common;

use common::{same, weights};

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
    // A folder of its own: the other tests of this binary save beside it at the same time,
    // and their temporary files would count here.
    let dir = tmp("atomic");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("atomic.safetensors");
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

/// Every name in `dir` that is a temporary file of a save.
fn temps(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn an_empty_state_saves_readably_for_rust_and_python() {
    // A Fabric with nothing set up: zero tensors (safetensors 0.3 wrote `{},"__metadata__"`).
    let f = fabric("32-true");
    let path = tmp("empty.safetensors");
    f.save(&path, &State { step: 7, epoch: 2 }).unwrap();
    let g = fabric("32-true");
    assert_eq!(g.load::<State>(&path).unwrap(), State { step: 7, epoch: 2 });
    let code = r#"
import json, sys
from safetensors import safe_open
path = sys.stdin.readline().strip()
with safe_open(path, "pt") as f:
    print(json.dumps({"keys": list(f.keys()), "state": json.loads(f.metadata()["tch_fabric.state"])}))
"#;
    let out = common::run_python(code, &format!("{}\n", path.display()));
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(out["keys"], serde_json::json!([]));
    assert_eq!(out["state"], serde_json::json!({"step": 7, "epoch": 2}));

    // A model without parameters, set up with an optimizer over nothing.
    let h = fabric("bf16-true");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let opt = tch_fabric::FusedAdamW::new(&vs, 1e-3).unwrap();
    let _ = h.setup(nn::func(|x| x.relu()), &mut vs, opt).unwrap();
    h.save(&path, &State { step: 8, epoch: 2 }).unwrap();
    assert_eq!(h.load::<State>(&path).unwrap().step, 8);
}

/// Flips every byte of a checkpoint in turn: a byte of tensor data is an error naming its
/// tensor; a byte of the header is an error too, unless it only changed JSON whitespace, and
/// then the load restores exactly what was saved. Nothing ever loads altered weights.
#[test]
fn every_flipped_byte_is_refused_or_harmless() {
    let f = fabric("16-mixed");
    let (m, mut opt, vs) = model(&f);
    train(&f, &m, &mut opt, 3);
    let path = tmp("flips.safetensors");
    f.save(&path, &State { step: 3, epoch: 0 }).unwrap();
    let good = std::fs::read(&path).unwrap();
    let saved = weights(&vs);
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let flipped = tmp("flipped.safetensors");
    let g = fabric("16-mixed");
    let (_m2, _o2, vs2) = model(&g);
    let (mut data_refused, mut header_refused, mut harmless) = (0, 0, 0);
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80] {
            let mut bytes = good.clone();
            bytes[i] ^= mask;
            std::fs::write(&flipped, &bytes).unwrap();
            match g.load::<State>(&flipped) {
                Err(e) => {
                    assert!(
                        matches!(
                            e,
                            Error::Checkpoint { .. } | Error::Io { .. } | Error::Json(_)
                        ),
                        "byte {i}: {e}"
                    );
                    if i >= header_end {
                        let msg = e.to_string();
                        assert!(
                            msg.contains("does not match its checksum") && msg.contains("tensor '"),
                            "byte {i} of the data: {msg}"
                        );
                        data_refused += 1;
                    } else {
                        header_refused += 1;
                    }
                }
                Ok(state) => {
                    assert!(i < header_end, "byte {i} of the data loaded silently");
                    assert_eq!(state, State { step: 3, epoch: 0 }, "byte {i}");
                    assert!(same(&weights(&vs2), &saved), "byte {i} changed the weights");
                    harmless += 1;
                }
            }
        }
    }
    eprintln!(
        "{} flips of a {}-byte checkpoint: {data_refused} in the data refused by the checksums, \
         {header_refused} in the header refused, {harmless} harmless (JSON whitespace)",
        2 * good.len(),
        good.len()
    );
    assert_eq!(data_refused, 2 * (good.len() - header_end));
}

#[test]
fn python_verifies_the_checksums_with_zlib() {
    let f = fabric("32-true");
    let (_m, _o, _vs) = model(&f);
    let path = tmp("zlib.safetensors");
    f.save(&path, &State { step: 1, epoch: 0 }).unwrap();
    // The file read as the safetensors format describes it, without tch-fabric's code.
    let code = r#"
import json, struct, sys, zlib
path = sys.stdin.readline().strip()
raw = open(path, "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
sums = json.loads(header["__metadata__"]["tch_fabric.checksums"])
ok = {k: zlib.crc32(data[v["data_offsets"][0]:v["data_offsets"][1]]) == sums["tensors"][k]
      for k, v in header.items() if k != "__metadata__"}
print(json.dumps({"algorithm": sums["algorithm"], "ok": ok}))
"#;
    let out = common::run_python(code, &format!("{}\n", path.display()));
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(out["algorithm"], "crc32");
    let ok = out["ok"].as_object().unwrap();
    assert_eq!(ok.len(), 4, "{ok:?}");
    assert!(ok.values().all(|v| v == true), "{ok:?}");
}

#[test]
fn a_load_that_overflows_the_precision_is_refused_unless_allowed() {
    let f = fabric("64-true");
    let (_m, _o, vs) = model(&f);
    tch::no_grad(|| {
        let _ = vs.variables()["l1.weight"].shallow_clone().fill_(1e6);
    });
    let path = tmp("overflow.safetensors");
    f.save(&path, &State { step: 1, epoch: 0 }).unwrap();

    let g = fabric("16-true");
    let (_m2, _o2, vs2) = model(&g);
    let before = weights(&vs2);
    let e = g.load::<State>(&path).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Checkpoint { .. }), "{msg}");
    assert!(
        msg.contains("'l1.weight'") && msg.contains("become inf in float16"),
        "{msg}"
    );
    assert!(msg.contains("allow_load_overflow"), "{msg}");
    assert!(
        same(&weights(&vs2), &before),
        "a refused load changes nothing"
    );

    // bf16 has float32's range: the same checkpoint loads there.
    let b = fabric("bf16-true");
    let (_m3, _o3, _vs3) = model(&b);
    b.load::<State>(&path).unwrap();

    let allowed = Fabric::builder()
        .precision("16-true")
        .accelerator("cpu")
        .allow_load_overflow(true)
        .build()
        .unwrap();
    let (_m4, _o4, vs4) = model(&allowed);
    allowed.load::<State>(&path).unwrap();
    let w = vs4.variables()["l1.weight"].to_kind(Kind::Float);
    assert!(
        bool::try_from(w.isinf().all()).unwrap(),
        "allowed: 1e6 is inf in float16"
    );
}

#[test]
fn impossible_optimizer_state_is_refused_naming_the_key() {
    let f = fabric("32-true");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = nn::linear(vs.root() / "l1", 4, 1, Default::default());
    let opt = tch_fabric::FusedAdamW::new(&vs, 1e-2).unwrap();
    let (m, mut opt) = f.setup(m, &mut vs, opt).unwrap();
    opt.zero_grad().unwrap();
    let loss = m
        .forward(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu)))
        .sum(Kind::Float);
    f.backward(&loss).unwrap();
    opt.step().unwrap();
    let path = tmp("bad-optimizer.safetensors");
    for (field, value, needle) in [
        ("l1.weight.exp_avg_sq", -1.0, "negative"),
        ("l1.bias.exp_avg", f64::NAN, "NaN or infinite"),
        ("l1.weight.step", -3.0, "step count"),
        ("l1.bias.step", f64::INFINITY, "NaN or infinite"),
    ] {
        let state = opt.state_tensors().unwrap();
        let (_, t) = state.iter().find(|(n, _)| n == field).unwrap();
        let keep = t.copy();
        let _ = t.shallow_clone().fill_(value);
        f.save(&path, &State { step: 1, epoch: 0 }).unwrap();
        t.shallow_clone().copy_(&keep);

        let g = fabric("32-true");
        let mut vs2 = nn::VarStore::new(Device::Cpu);
        let m2 = nn::linear(vs2.root() / "l1", 4, 1, Default::default());
        let opt2 = tch_fabric::FusedAdamW::new(&vs2, 1e-2).unwrap();
        let (_m2, opt2) = g.setup(m2, &mut vs2, opt2).unwrap();
        let before = weights(&vs2);
        // The optimizer's InvalidState, inside the Checkpoint error that names the file.
        let e = g.load::<State>(&path).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Checkpoint { .. }), "{field}: {msg}");
        assert!(msg.contains("optimizer 0: cannot load state"), "{msg}");
        assert!(
            msg.contains(&format!("'{field}'")) && msg.contains(needle),
            "{field}: {msg}"
        );
        assert!(same(&weights(&vs2), &before), "{field}: weights unchanged");
        assert!(
            opt2.state_tensors().unwrap().is_empty(),
            "{field}: no state"
        );
    }
}

#[test]
fn a_symlinked_path_keeps_the_link_and_replaces_its_target() {
    let f = fabric("32-true");
    let (_m, _o, _vs) = model(&f);
    let dir = tmp("links");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("real")).unwrap();
    let target = dir.join("real/ckpt.safetensors");
    let link = dir.join("latest.safetensors");
    f.save(&target, &State { step: 1, epoch: 0 }).unwrap();
    std::os::unix::fs::symlink("real/ckpt.safetensors", &link).unwrap();
    f.save(&link, &State { step: 2, epoch: 0 }).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        f.load::<State>(&target).unwrap().step,
        2,
        "the target changed"
    );
    assert_eq!(f.load::<State>(&link).unwrap().step, 2);
    assert!(temps(&dir).is_empty() && temps(&dir.join("real")).is_empty());
    // A dangling link: the save creates its target.
    let dangling = dir.join("next.safetensors");
    std::os::unix::fs::symlink("real/new.safetensors", &dangling).unwrap();
    f.save(&dangling, &State { step: 3, epoch: 0 }).unwrap();
    assert_eq!(
        f.load::<State>(dir.join("real/new.safetensors"))
            .unwrap()
            .step,
        3
    );
}

#[test]
fn non_regular_files_are_refused_without_blocking() {
    let f = fabric("32-true");
    let (_m, _o, _vs) = model(&f);
    let fifo = tmp("a.fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for path in [fifo.clone(), "/dev/zero".into(), std::env::temp_dir()] {
        let e = f.load::<State>(&path).unwrap_err();
        assert!(
            matches!(e, Error::Checkpoint { .. }),
            "{}: {e}",
            path.display()
        );
        assert!(e.to_string().contains("cannot be a checkpoint"), "{e}");
    }
    // Nor is a FIFO or a device replaced by a save.
    for path in [fifo.clone(), "/dev/null".into()] {
        let e = f.save(&path, &State { step: 1, epoch: 0 }).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn headers_that_claim_more_than_the_file_holds_are_refused() {
    let f = fabric("32-true");
    let (_m, _o, _vs) = model(&f);
    let path = tmp("claims.safetensors");
    // A header length of 2^40 bytes in a 16-byte file.
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    std::fs::write(&path, &bytes).unwrap();
    let e = f.load::<State>(&path).unwrap_err().to_string();
    assert!(e.contains("claims 1099511627776 bytes"), "{e}");
    // A valid header declaring a 1 TB tensor in a small file.
    let header =
        br#"{"x":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 64]);
    std::fs::write(&path, &bytes).unwrap();
    let e = f.load::<State>(&path).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // Bytes appended after a good checkpoint.
    f.save(&path, &State { step: 1, epoch: 0 }).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"junk");
    std::fs::write(&path, &bytes).unwrap();
    let e = f.load::<State>(&path).unwrap_err().to_string();
    assert!(e.contains("something was appended"), "{e}");
}

#[test]
fn stale_temporary_files_of_dead_savers_are_removed_and_live_ones_kept() {
    let f = fabric("32-true");
    let (_m, _o, _vs) = model(&f);
    let dir = tmp("stale");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A process that has exited (and been reaped): its pid names no process now.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    // A process that is running while the save happens.
    let mut live = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let stale = [
        format!(".ckpt.safetensors.tmp-{dead}-0"),
        format!(".other.safetensors.tmp-{dead}"),
    ];
    let kept = [
        format!(".ckpt.safetensors.tmp-{}-0", live.id()),
        format!(".ckpt.safetensors.tmp-{}-3", std::process::id()),
        format!("ckpt.safetensors.tmp-{dead}"),
        format!(".notes.tmp-{dead}-x"),
    ];
    for name in stale.iter().chain(&kept) {
        std::fs::write(dir.join(name), b"partial").unwrap();
    }
    f.save(dir.join("ckpt.safetensors"), &State { step: 1, epoch: 0 })
        .unwrap();
    live.kill().unwrap();
    live.wait().unwrap();
    for name in &stale {
        assert!(!dir.join(name).exists(), "{name} was left");
    }
    for name in &kept {
        assert!(dir.join(name).exists(), "{name} was removed");
    }
}

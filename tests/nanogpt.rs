//! The nanoGPT port (`examples/nanogpt.rs`) against nanoGPT's model and loop in plain PyTorch
//! (`scripts/nanogpt_reference.py`, run live), from the same weights on the same batches: every
//! micro-step's loss and every final weight the same bits in 32-true, bf16-mixed and 16-mixed;
//! a resume from PyTorch's `ckpt.pt` equal to PyTorch's own resume, and PyTorch resuming the
//! port's `ckpt.pt` equal to the port's uninterrupted run.
mod common;

#[allow(dead_code)]
#[path = "../examples/nanogpt.rs"]
mod nanogpt;

use clap::Parser;
use nanogpt::{train, Args, Trained};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const ITERS: i64 = 10;
const SAVE_AT: i64 = 5;

fn args(precision: &str, dir: &Path, init: &Path, batches: &Path, extra: &[&str]) -> Args {
    let mut cli = vec![
        "nanogpt".to_string(),
        format!("--precision={precision}"),
        format!("--out-dir={}", dir.display()),
        format!("--init={}", init.display()),
        format!("--batches={}", batches.display()),
        format!("--max-iters={ITERS}"),
        "--block-size=16".into(),
        "--n-embd=32".into(),
        "--n-head=4".into(),
        "--n-layer=2".into(),
        "--vocab-size=50".into(),
        "--bias".into(),
        "--warmup-iters=3".into(),
        "--lr-decay-iters=8".into(),
        "--learning-rate=3e-3".into(),
        "--grad-clip=0.5".into(),
    ];
    cli.extend(extra.iter().map(|s| s.to_string()));
    Args::parse_from(cli)
}

/// A reference run: its losses' bits and final weights.
type PyRun = (Vec<u64>, Vec<(String, Tensor)>);

/// Runs the reference with the example's options (nothing for "init").
fn python(mode: &str, a: &Args, weights_out: &Path) -> Option<PyRun> {
    let script =
        std::fs::read_to_string(common::repo().join("scripts/nanogpt_reference.py")).unwrap();
    let cfg = json!({"mode": mode, "args": a, "weights_out": weights_out});
    let out = common::run_python(&script, &cfg.to_string());
    if mode == "init" {
        return None;
    }
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let losses = v["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let mut w: Vec<(String, Tensor)> = Tensor::read_safetensors(weights_out).unwrap();
    w.sort_by(|x, y| x.0.cmp(&y.0));
    Some((losses, w))
}

fn bits(t: &[f64]) -> Vec<u64> {
    t.iter().map(|v| v.to_bits()).collect()
}

/// Every weight of `got` has the bits of PyTorch's (as float64), names and all.
fn same_weights(what: &str, got: &Trained, want: &[(String, Tensor)]) {
    let names: Vec<&str> = got.weights.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want_names, "{what}: the same state_dict keys");
    for ((n, a), (_, b)) in got.weights.iter().zip(want) {
        let a = a.to_kind(Kind::Double);
        assert!(
            a.equal(b),
            "{what}: {n} differs by {:e}",
            (&a - b).abs().max().double_value(&[])
        );
    }
}

fn dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_port_matches_nanogpt_bit_for_bit_and_resumes_both_ways() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let root = std::env::temp_dir().join(format!("tch-fabric-nanogpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    // The batches: a random token stream, and where each row of each micro-batch starts.
    tch::manual_seed(7);
    let batches = root.join("batches.safetensors");
    let data = Tensor::randint(50, [4000], (Kind::Int64, Device::Cpu));
    let offsets = Tensor::randint(4000 - 17, [ITERS, 2, 4], (Kind::Int64, Device::Cpu));
    Tensor::write_safetensors(&[("data", &data), ("offsets", &offsets)], &batches).unwrap();
    let init = root.join("init.pt");
    let base = args("32-true", &root, &init, &batches, &[]);
    python("init", &base, &root.join("unused"));

    for precision in ["32-true", "bf16-mixed", "16-mixed"] {
        let save_at = format!("--save-at={SAVE_AT}");
        // Uninterrupted runs, each saving ckpt.pt at SAVE_AT.
        let py_dir = dir(&root, &format!("{precision}-py"));
        let (py_losses, py_weights) = python(
            "train",
            &args(precision, &py_dir, &init, &batches, &[&save_at]),
            &root.join("py.safetensors"),
        )
        .unwrap();
        let rs_dir = dir(&root, &format!("{precision}-rs"));
        let rs = train(&args(precision, &rs_dir, &init, &batches, &[&save_at])).unwrap();
        assert_eq!(
            bits(&rs.losses),
            py_losses,
            "{precision}: every micro-step's loss"
        );
        same_weights(&format!("{precision} full run"), &rs, &py_weights);

        // PyTorch's ckpt.pt resumed by both sides: the same run.
        let py_resumed_dir = dir(&root, &format!("{precision}-py-resumed"));
        let rs_resumed_dir = dir(&root, &format!("{precision}-rs-from-py"));
        for d in [&py_resumed_dir, &rs_resumed_dir] {
            std::fs::copy(py_dir.join("ckpt.pt"), d.join("ckpt.pt")).unwrap();
        }
        let resume = ["--resume"];
        let (py_resumed, py_resumed_weights) = python(
            "train",
            &args(precision, &py_resumed_dir, &init, &batches, &resume),
            &root.join("py-resumed.safetensors"),
        )
        .unwrap();
        let rs_from_py =
            train(&args(precision, &rs_resumed_dir, &init, &batches, &resume)).unwrap();
        assert_eq!(
            bits(&rs_from_py.losses),
            py_resumed,
            "{precision}: resumed from PyTorch's ckpt.pt"
        );
        same_weights(
            &format!("{precision} resumed from PyTorch"),
            &rs_from_py,
            &py_resumed_weights,
        );

        // The port's ckpt.pt resumed by PyTorch: the port's uninterrupted run.
        let py_from_rs_dir = dir(&root, &format!("{precision}-py-from-rs"));
        std::fs::copy(rs_dir.join("ckpt.pt"), py_from_rs_dir.join("ckpt.pt")).unwrap();
        let (py_from_rs, py_from_rs_weights) = python(
            "train",
            &args(precision, &py_from_rs_dir, &init, &batches, &resume),
            &root.join("py-from-rs.safetensors"),
        )
        .unwrap();
        let tail = &bits(&rs.losses)[2 * SAVE_AT as usize..];
        assert_eq!(
            py_from_rs, tail,
            "{precision}: PyTorch resumed the port's ckpt.pt"
        );
        same_weights(
            &format!("{precision} PyTorch from the port"),
            &rs,
            &py_from_rs_weights,
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

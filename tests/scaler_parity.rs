//! GradScaler against torch.amp.GradScaler, bit for bit.
//!
//! Reference data comes from PyTorch itself; regenerate it with
//!     .venv/bin/python scripts/gen_scaler_parity.py > tests/data/scaler_parity.json
mod common;

use common::scaler::{run, Probe};
use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tch_fabric::{scaler::GradScalerState, GradScaler, GradScalerConfig};

fn config_of(v: &Value) -> GradScalerConfig {
    GradScalerConfig::default()
        .init_scale(v["init_scale"].as_f64().unwrap())
        .growth_factor(v["growth_factor"].as_f64().unwrap())
        .backoff_factor(v["backoff_factor"].as_f64().unwrap())
        .growth_interval(v["growth_interval"].as_i64().unwrap())
}

fn expected(v: &Value) -> Vec<(u32, i64, bool)> {
    let bits = v["scale_bits"].as_array().unwrap();
    let tracker = v["tracker"].as_array().unwrap();
    let stepped = v["stepped"].as_str().unwrap().as_bytes();
    (0..bits.len())
        .map(|i| {
            (
                bits[i].as_u64().unwrap() as u32,
                tracker[i].as_i64().unwrap(),
                stepped[i] == b'1',
            )
        })
        .collect()
}

fn compare(name: &str, got: &[(u32, i64, bool)], want: &[(u32, i64, bool)]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g,
            w,
            "{name}: step {i}: (scale bits, tracker, stepped) = {g:?} ({}) but PyTorch has {w:?} ({})",
            f32::from_bits(g.0),
            f32::from_bits(w.0)
        );
    }
}

#[test]
fn scale_and_tracker_match_pytorch_every_step() {
    let data = common::data("scaler_parity.json");
    assert!(data["torch_version"]
        .as_str()
        .unwrap()
        .starts_with("2.13.0"));
    let trajectories = data["trajectories"].as_array().unwrap();
    assert!(trajectories.len() >= 5);
    for t in trajectories {
        let name = t["name"].as_str().unwrap();
        let flags = t["flags"].as_str().unwrap().as_bytes();
        assert!(flags.len() >= 5000);
        let mut scaler = GradScaler::new(config_of(t)).unwrap();
        let mut probe = Probe::new();
        let got = run(&mut scaler, &mut probe, flags);
        compare(name, &got, &expected(t));
        let skipped = got.iter().filter(|s| !s.2).count() as u64;
        assert_eq!(scaler.steps_skipped().unwrap(), skipped);
        assert_eq!(scaler.steps_taken().unwrap(), flags.len() as u64 - skipped);
    }
}

fn tensor_from_bits(bits: &[u64], dtype: &str) -> Tensor {
    match dtype {
        "float32" => {
            let raw: Vec<i32> = bits.iter().map(|&b| b as u32 as i32).collect();
            Tensor::from_slice(&raw).view_dtype(Kind::Float)
        }
        "float16" | "bfloat16" => {
            let raw: Vec<i16> = bits.iter().map(|&b| b as u16 as i16).collect();
            let kind = if dtype == "float16" {
                Kind::Half
            } else {
                Kind::BFloat16
            };
            Tensor::from_slice(&raw).view_dtype(kind)
        }
        other => panic!("dtype {other}"),
    }
}

fn bits_of(t: &Tensor, dtype: &str) -> Vec<u64> {
    if dtype == "float32" {
        let v: Vec<i32> = Vec::try_from(t.view_dtype(Kind::Int)).unwrap();
        v.into_iter().map(|b| u64::from(b as u32)).collect()
    } else {
        let v: Vec<i16> = Vec::try_from(t.view_dtype(Kind::Int16)).unwrap();
        v.into_iter().map(|b| u64::from(b as u16)).collect()
    }
}

#[test]
fn unscaled_gradient_bits_match_pytorch() {
    let data = common::data("scaler_parity.json");
    let cases = data["unscale"].as_array().unwrap();
    for dtype in ["float32", "bfloat16", "float16"] {
        assert!(cases.iter().any(|c| c["dtype"] == dtype));
    }
    for case in cases {
        let dtype = case["dtype"].as_str().unwrap();
        let scale = case["scale"].as_f64().unwrap();
        let input: Vec<u64> = case["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let want: Vec<u64> = case["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let grad = tensor_from_bits(&input, dtype);
        let config = GradScalerConfig::default()
            .init_scale(scale)
            .allow_fp16_grads(dtype == "float16");
        let mut scaler = GradScaler::new(config).unwrap();
        let _ = scaler
            .scale(&Tensor::ones([], (Kind::Float, Device::Cpu)))
            .unwrap();
        scaler.unscale_grads(std::slice::from_ref(&grad)).unwrap();
        let got = bits_of(&grad, dtype);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "{dtype} scale {scale}: element {i} (input bits {:#x}): got {g:#x}, PyTorch {w:#x}",
                input[i]
            );
        }
        assert_eq!(
            scaler.found_inf().unwrap(),
            case["found_inf"].as_f64().unwrap() != 0.0,
            "{dtype} scale {scale}"
        );
    }
}

#[test]
fn state_written_by_pytorch_loads_and_continues_identically() {
    let data = common::data("scaler_parity.json");
    let resume = &data["resume"];
    let state = GradScalerState::from_json(&resume["state"].to_string()).unwrap();
    let flags = resume["flags"].as_str().unwrap().as_bytes();
    let want = expected(resume);

    // Loaded before the first scale(): the lazy initialisation uses the loaded values.
    let mut lazy = GradScaler::new(GradScalerConfig::default()).unwrap();
    lazy.load_state_dict(&state).unwrap();
    assert_eq!(lazy.get_scale().unwrap(), state.scale.unwrap());
    compare(
        "resume (lazy)",
        &run(&mut lazy, &mut Probe::new(), flags),
        &want,
    );

    // Loaded into a scaler that already has its tensors.
    let mut live = GradScaler::new(GradScalerConfig::default()).unwrap();
    let _ = live
        .scale(&Tensor::ones([], (Kind::Float, Device::Cpu)))
        .unwrap();
    live.load_state_dict(&state).unwrap();
    compare(
        "resume (live)",
        &run(&mut live, &mut Probe::new(), flags),
        &want,
    );
}

/// Rust writes its state, Python loads it into torch.amp.GradScaler, both continue with the
/// same overflows, and Python's state_dict comes back equal.
#[test]
fn state_written_here_loads_in_pytorch_and_continues_identically() {
    let config = GradScalerConfig::default()
        .init_scale(1000.0)
        .growth_interval(3)
        .backoff_factor(0.25);
    let mut scaler = GradScaler::new(config).unwrap();
    let mut probe = Probe::new();
    run(&mut scaler, &mut probe, b"0001200001");
    let state = scaler.state_dict().unwrap();
    let json = state.to_json();
    for key in [
        "\"scale\"",
        "\"growth_factor\"",
        "\"backoff_factor\"",
        "\"growth_interval\"",
        "\"_growth_tracker\"",
    ] {
        assert!(json.contains(key), "{json} lacks {key}");
    }
    let flags = "00100000300000010000";
    let python = r#"
import json, struct, sys, torch
state = json.loads(sys.stdin.readline())
flags = sys.stdin.readline().strip()
scaler = torch.amp.GradScaler("cpu")
scaler.load_state_dict(state)
echo = scaler.state_dict()
p = torch.nn.Parameter(torch.zeros(2))
opt = torch.optim.SGD([p], lr=0.0)
scaler.scale(torch.ones(()))
values = {"0": 1.0, "1": float("inf"), "2": float("nan"), "3": float("-inf")}
bits = []
for f in flags:
    p.grad = torch.tensor([0.5, values[f]])
    scaler.step(opt)
    scaler.update()
    bits.append([struct.unpack("<I", struct.pack("<f", scaler._scale.item()))[0], int(scaler._growth_tracker.item())])
print(json.dumps({"echo": echo, "trajectory": bits}))
"#;
    let out = common::run_python(python, &format!("{json}\n{flags}\n"));
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let echo = GradScalerState::from_json(&out["echo"].to_string()).unwrap();
    assert_eq!(echo, state, "PyTorch's state_dict after loading ours");

    let ours = run(&mut scaler, &mut probe, flags.as_bytes());
    let theirs = out["trajectory"].as_array().unwrap();
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(
            (u64::from(o.0), o.1),
            (t[0].as_u64().unwrap(), t[1].as_i64().unwrap()),
            "step {i} after the round trip"
        );
    }
}

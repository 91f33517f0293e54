//! Two optimizers stepping in turn (a GAN's loop: backward A, step A, backward B, step B) under
//! `16-mixed`: the loss scale updates exactly once per iteration, as `torch.amp.GradScaler`
//! driven the same way (`scaler.update()` once, after both steps), live against PyTorch. The
//! first wave also updated it at B's backward: 5 updates in 3 iterations.
//!
//! The PyTorch side runs live through the provisioned Python (`.venv/bin/python`).
mod common;

use tch::{nn, Device, Kind, Reduction, Tensor};
use tch_fabric::{Fabric, FusedSgd, GradScalerConfig};

const ITERATIONS: usize = 14;
const INIT_SCALE: f64 = 4096.0;
const GROWTH_INTERVAL: i64 = 3;

/// The iterations whose inputs overflow float16 in model A or model B.
fn overflows(i: usize) -> (bool, bool) {
    (matches!(i, 4 | 9), matches!(i, 6 | 9 | 12))
}

const PYTHON: &str = r#"
import json, struct, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
init, out_path, iterations, init_scale, growth_interval, flags = sys.stdin.read().split()
t = load_file(init)
a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
a.load_state_dict({"weight": t["a.weight"], "bias": t["a.bias"]})
b.load_state_dict({"weight": t["b.weight"], "bias": t["b.bias"]})
opt_a = torch.optim.SGD(a.parameters(), lr=0.05, fused=True)
opt_b = torch.optim.SGD(b.parameters(), lr=0.05, fused=True)
scaler = torch.amp.GradScaler("cpu", init_scale=float(init_scale), growth_interval=int(growth_interval))
x, y = t["x"], t["y"]
def loss_of(model, inputs):
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(inputs.half())
    out = out.float()
    with torch.autocast("cpu", dtype=torch.float16):
        return F.mse_loss(out, y)
scales = []
for i in range(int(iterations)):
    big_a, big_b = flags[2 * i] == "1", flags[2 * i + 1] == "1"
    opt_a.zero_grad(); opt_b.zero_grad()
    scaler.scale(loss_of(a, x * 1e4 if big_a else x)).backward()
    scaler.step(opt_a)
    scaler.scale(loss_of(b, x * 1e4 if big_b else x)).backward()
    scaler.step(opt_b)
    scaler.update()
    scales.append(struct.unpack("<I", struct.pack("<f", scaler._scale.item()))[0])
save_file({"a.weight": a.weight.detach(), "a.bias": a.bias.detach(),
           "b.weight": b.weight.detach(), "b.bias": b.bias.detach()}, out_path)
print(json.dumps({"scales": scales}))
"#;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-fabric-two-opt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn interleaved_optimizers_update_the_scale_once_per_iteration_as_pytorch() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    tch::manual_seed(21);
    let fabric = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(
            GradScalerConfig::default()
                .init_scale(INIT_SCALE)
                .growth_interval(GROWTH_INTERVAL),
        )
        .build()
        .unwrap();
    let mut va = nn::VarStore::new(Device::Cpu);
    let mut vb = nn::VarStore::new(Device::Cpu);
    let a = nn::linear(va.root() / "a", 4, 3, Default::default());
    let b = nn::linear(vb.root() / "b", 4, 3, Default::default());
    let x = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
    let init = tmp("init.safetensors");
    let mut tensors: Vec<(String, Tensor)> = va.variables().into_iter().collect();
    tensors.extend(vb.variables());
    tensors.push(("x".into(), x.shallow_clone()));
    tensors.push(("y".into(), y.shallow_clone()));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &init).unwrap();

    let opt = FusedSgd::new(&va, 0.05).unwrap();
    let (a, mut opt_a) = fabric.setup(a, &mut va, opt).unwrap();
    let opt = FusedSgd::new(&vb, 0.05).unwrap();
    let (b, mut opt_b) = fabric.setup(b, &mut vb, opt).unwrap();
    let loss_of = |out: Tensor| {
        let _ac = fabric.autocast().unwrap();
        out.mse_loss(&y, Reduction::Mean)
    };
    let big = &x * 1e4;
    let mut scales = Vec::new();
    let mut flags = String::new();
    for i in 0..ITERATIONS {
        let (big_a, big_b) = overflows(i);
        flags.push(if big_a { '1' } else { '0' });
        flags.push(if big_b { '1' } else { '0' });
        opt_a.zero_grad().unwrap();
        opt_b.zero_grad().unwrap();
        let before = fabric.loss_scale().unwrap();
        fabric
            .backward(&loss_of(if big_a { &big } else { &x }.apply(&a)))
            .unwrap();
        assert_eq!(
            opt_a.step().unwrap().is_skipped(),
            big_a,
            "iteration {i}: A"
        );
        assert_eq!(
            fabric.loss_scale().unwrap(),
            before,
            "iteration {i}: no update before B stepped"
        );
        fabric
            .backward(&loss_of(if big_b { &big } else { &x }.apply(&b)))
            .unwrap();
        assert_eq!(
            opt_b.step().unwrap().is_skipped(),
            big_b,
            "iteration {i}: B"
        );
        scales.push((fabric.loss_scale().unwrap() as f32).to_bits());
    }

    let out = tmp("torch.safetensors");
    let report = common::run_python(
        PYTHON,
        &format!(
            "{} {} {ITERATIONS} {INIT_SCALE} {GROWTH_INTERVAL} {flags}",
            init.display(),
            out.display()
        ),
    );
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let torch_scales: Vec<u32> = report["scales"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        scales, torch_scales,
        "the scale after every iteration, bit for bit (PyTorch: one update per iteration)"
    );
    let distinct = torch_scales.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        distinct >= 4,
        "the scale grew and backed off: {torch_scales:?}"
    );
    for (name, want) in Tensor::read_safetensors(&out).unwrap() {
        let got = if name.starts_with("a.") {
            va.variables()[&name].shallow_clone()
        } else {
            vb.variables()[&name].shallow_clone()
        };
        assert!(got.equal(&want), "{name}: the same weights, bit for bit");
    }
    let _ = std::fs::remove_dir_all(init.parent().unwrap());
}

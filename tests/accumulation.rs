//! Gradient accumulation as Lightning writes it: 4 micro-batches per optimizer step, each
//! under `fabric.no_backward_sync(model, enabled=not last)` and `fabric.backward`, clipping
//! and stepping once. Against Lightning Fabric itself (32-true, bf16-mixed) and, for
//! 16-mixed, the plain `torch.amp.GradScaler` loop (Lightning turns 16-mixed into bf16-mixed
//! on CPU): the same loss and weight bits. Under 16-mixed the scaler scales every micro-batch
//! and unscales once per step, with no "unscale_() has already been called".
//!
//! The Python side runs live through the provisioned Python (`.venv/bin/python`).
mod common;

use serde_json::Value;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{AdamW, Clip, Fabric, GradScalerConfig};

const STEPS: usize = 8;
const MICRO: i64 = 4;

const PYTHON: &str = r#"
import json, struct, sys, warnings
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
init_path, out_dir, steps, micro = sys.stdin.read().split()
steps, micro = int(steps), int(micro)
t = load_file(init_path)
def bits(v): return struct.unpack("<Q", struct.pack("<d", v))[0]
def make():
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    m.load_state_dict({"0.weight": t["l1.weight"], "0.bias": t["l1.bias"], "2.weight": t["l2.weight"], "2.bias": t["l2.bias"]})
    return m
out = {}
for precision in ["32-true", "bf16-mixed", "16-mixed"]:
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
        for s in range(steps):
            for k in range(micro):
                x, y = t[f"x{s}_{k}"], t[f"y{s}_{k}"]
                with torch.autocast("cpu", dtype=torch.float16):
                    o = model(x.half())
                o = o.float()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = F.mse_loss(o, y) / micro
                scaler.scale(loss).backward()
                losses.append(bits(loss.item()))
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        final = model
    else:
        import lightning as L
        fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
        fm, opt = fabric.setup(model, opt)
        for s in range(steps):
            for k in range(micro):
                x, y = t[f"x{s}_{k}"], t[f"y{s}_{k}"]
                with fabric.no_backward_sync(fm, enabled=k + 1 < micro):
                    o = fm(x)
                    with fabric.autocast():
                        loss = F.mse_loss(o, y) / micro
                    fabric.backward(loss)
                losses.append(bits(loss.item()))
            fabric.clip_gradients(fm, opt, max_norm=0.5)
            opt.step()
            opt.zero_grad()
        final = fm.module
    sd = final.state_dict()
    save_file({"l1.weight": sd["0.weight"].double(), "l1.bias": sd["0.bias"].double(),
               "l2.weight": sd["2.weight"].double(), "l2.bias": sd["2.bias"].double()},
              f"{out_dir}/{precision}.safetensors")
    out[precision] = losses
print(json.dumps(out))
"#;

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
                .init_scale(2f64.powi(20))
                .growth_interval(3),
        )
    } else {
        b
    };
    b.build().unwrap()
}

#[test]
fn accumulation_matches_lightning_bit_for_bit() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let dir = std::env::temp_dir().join(format!("tch-fabric-accum-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tch::manual_seed(21);
    let vs0 = nn::VarStore::new(Device::Cpu);
    let _m = model(&vs0);
    let mut tensors: Vec<(String, Tensor)> = vs0.variables().into_iter().collect();
    for s in 0..STEPS {
        for k in 0..MICRO {
            let x = Tensor::randn([6, 8], (Kind::Float, Device::Cpu)) * 3.0;
            let y = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
            tensors.push((format!("x{s}_{k}"), x));
            tensors.push((format!("y{s}_{k}"), y));
        }
    }
    let init = dir.join("init.safetensors");
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &init).unwrap();
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .shallow_clone()
    };
    let stdin = format!("{} {} {STEPS} {MICRO}", init.display(), dir.display());
    let want: Value = serde_json::from_str(common::run_python(PYTHON, &stdin).trim()).unwrap();

    for precision in ["32-true", "bf16-mixed", "16-mixed"] {
        let f = fabric(precision);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let m = model(&vs);
        vs.copy(&vs0).unwrap();
        let opt = AdamW::new(&vs, 1e-2).unwrap();
        let (m, mut opt) = f.setup(m, &mut vs, opt).unwrap();
        let mut losses = Vec::new();
        for s in 0..STEPS {
            for k in 0..MICRO {
                let (x, y) = (get(&format!("x{s}_{k}")), get(&format!("y{s}_{k}")));
                let _sync = f.no_backward_sync(&m, k + 1 < MICRO).unwrap();
                let out = m.forward(&x);
                let loss = {
                    let _ac = f.autocast().unwrap();
                    out.mse_loss(&y, Reduction::Mean) / MICRO as f64
                };
                f.backward(&loss).unwrap();
                losses.push(loss.double_value(&[]).to_bits());
            }
            f.clip_gradients(&mut opt, Clip::norm(0.5)).unwrap();
            opt.step().unwrap();
            opt.zero_grad().unwrap();
        }
        let want_losses: Vec<u64> = want[precision]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(losses, want_losses, "{precision}: losses");
        let torch_w =
            Tensor::read_safetensors(dir.join(format!("{precision}.safetensors"))).unwrap();
        for (key, w) in torch_w {
            let got = vs.variables()[&key].to_kind(Kind::Double);
            assert!(got.equal(&w), "{precision}: {key} differs");
        }
    }
}

#[test]
fn no_backward_sync_refuses_a_module_of_another_fabric() {
    let a = Fabric::new("32-true").unwrap();
    let b = Fabric::new("32-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = a.setup_module(model(&vs), &mut vs).unwrap();
    match b.no_backward_sync(&m, true) {
        Err(tch_fabric::Error::Usage(msg)) => {
            assert!(msg.contains("set up the model first"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    // Enabled or not, in one process the guard changes nothing.
    assert!(a.no_backward_sync(&m, true).is_ok());
    assert!(a.no_backward_sync(&m, false).is_ok());
}

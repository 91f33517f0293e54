//! What porting a real PyTorch script needs of checkpoints (issue #27, found porting nanoGPT):
//! a weight tied under two names, a checkpoint's metadata read before the model exists, strict
//! loads that refuse a file lacking the optimizer's or the GradScaler's state.
//!
//! The PyTorch side runs live through the provisioned Python (`.venv/bin/python`).
mod common;

use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};
use tch_fabric::checkpoint::{self, CheckpointFormat};
use tch_fabric::{AdamW, Error, Fabric, FabricOptimizer, Optimizer};

/// A tiny language model with nanoGPT's tie: `lm_head.weight` is `wte.weight`.
const TIED: &str = r#"
import json, sys, torch
d, mode = sys.stdin.read().split()
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(10, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight
    def forward(self, idx):
        return self.lm_head(self.ln(self.wte(idx)))
def step(m, opt):
    idx = torch.arange(8) % 10
    loss = torch.nn.functional.cross_entropy(m(idx), (idx + 1) % 10)
    opt.zero_grad(); loss.backward(); opt.step()
torch.manual_seed(0)
m = M()
opt = torch.optim.AdamW(m.parameters(), lr=0.1)
if mode == "save":
    step(m, opt)
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, f"{d}/tied.pt")
else:
    ck = torch.load(f"{d}/rust.pt", weights_only=True)
    m.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    step(m, opt)
w = m.wte.weight.detach().double().flatten().tolist()
print(json.dumps({"wte": w, "keys": sorted(m.state_dict().keys())}))
"#;

/// The Rust twin of TIED's model: the weight added to the VarStore under its second name.
struct Tied {
    wte: Tensor,
    ln: nn::LayerNorm,
}

fn tied(vs: &nn::VarStore, register_alias: bool) -> Tied {
    let root = vs.root();
    let wte = (&root / "wte").randn("weight", &[10, 4], 0.0, 1.0);
    if register_alias {
        let _ = (&root / "lm_head").add("weight", wte.shallow_clone(), false);
    }
    let ln = nn::layer_norm(&root / "ln", vec![4], Default::default());
    Tied { wte, ln }
}

fn step(f: &Fabric, m: &Tied, opt: &mut FabricOptimizer) {
    let idx = Tensor::arange(8, (Kind::Int64, Device::Cpu)).remainder(10);
    let h = Tensor::embedding(&m.wte, &idx, -1, false, false).apply(&m.ln);
    let logits = h.linear::<Tensor>(&m.wte, None);
    let target = (&idx + 1).remainder(10);
    let loss = logits.cross_entropy_for_logits(&target);
    opt.zero_grad().unwrap();
    f.backward(&loss).unwrap();
    opt.step().unwrap();
}

fn bits(t: &Tensor) -> Vec<u64> {
    let v: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tch-fabric-porting-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_tied_weight_is_one_parameter_that_loads_and_saves_under_both_names() {
    let _serial = common::exclusive();
    tch::set_num_threads(1);
    let dir = scratch("tied");
    let py = |mode: &str| -> Value {
        let out = common::run_python(TIED, &format!("{} {mode}", dir.display()));
        serde_json::from_str(out.trim()).unwrap()
    };
    let saved = py("save");
    assert_eq!(
        saved["keys"],
        json!(["lm_head.weight", "ln.bias", "ln.weight", "wte.weight"])
    );

    let f = Fabric::new("32-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = tied(&vs, true);
    let opt = AdamW::new(&vs, 0.1).unwrap();
    // One parameter for the two names, so one optimizer state: PyTorch's named_parameters().
    assert_eq!(opt.params().len(), 3);
    let tied_at = (0..3)
        .find(|&i| !opt.params().aliases(i).is_empty())
        .unwrap();
    assert_eq!(opt.params().names()[tied_at], "lm_head.weight");
    assert_eq!(opt.params().aliases(tied_at), ["wte.weight"]);
    let (_m, mut opt) = f.setup((), &mut vs, opt).unwrap();

    // PyTorch's file, both keys of one storage, loads strictly; the state exists once.
    let _: Value = f.load(dir.join("tied.pt")).unwrap();
    let w: Vec<f64> = Vec::try_from(m.wte.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    assert_eq!(
        w,
        serde_json::from_value::<Vec<f64>>(saved["wte"].clone()).unwrap()
    );
    let state = opt.state_tensors().unwrap();
    assert_eq!(
        state.len(),
        3 * 3,
        "exp_avg, exp_avg_sq, step for 3 parameters"
    );

    // Rust steps once and saves; Python loads that strictly and steps once more: the same
    // weights as Rust's own second step.
    f.save(dir.join("rust.pt"), &json!({})).unwrap();
    let resumed = py("resume");
    step(&f, &m, &mut opt);
    let want: Vec<f64> = serde_json::from_value(resumed["wte"].clone()).unwrap();
    let got: Vec<f64> = Vec::try_from(m.wte.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    assert_eq!(
        got, want,
        "one AdamW step from the same checkpoint on both sides"
    );

    // tch-fabric's own format keeps both names and loads strictly.
    let own = dir.join("tied.safetensors");
    f.save(&own, &1u32).unwrap();
    let before = m.wte.copy();
    step(&f, &m, &mut opt);
    let _: u32 = f.load(&own).unwrap();
    assert_eq!(bits(&m.wte), bits(&before));

    // A model tied in code only (the second name not in its VarStore) still loads PyTorch's
    // file strictly: the second key is the same storage as the first.
    let g = Fabric::new("32-true").unwrap();
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let m2 = tied(&vs2, false);
    let opt2 = AdamW::new(&vs2, 0.1).unwrap();
    let (_m2, _opt2) = g.setup((), &mut vs2, opt2).unwrap();
    let _: Value = g.load(dir.join("tied.pt")).unwrap();
    assert_eq!(bits(&m2.wte), bits(&Tensor::from_slice(&w).view([10, 4])));
    std::fs::remove_dir_all(&dir).ok();
}

/// A nanoGPT-style checkpoint: model_args, iter_num, best_val_loss as a 0-dim tensor, config.
const NANOGPT_CKPT: &str = r#"
import sys, torch
path = sys.stdin.read().strip()
torch.manual_seed(0)
m = torch.nn.Linear(4, 3)
torch.save({"model": m.state_dict(), "model_args": {"n_layer": 2, "n_embd": 4, "bias": True},
            "iter_num": 250, "best_val_loss": torch.tensor(1.25),
            "config": {"learning_rate": 6e-4, "dataset": "shakespeare_char"}}, path)
"#;

#[test]
fn a_checkpoint_reads_without_a_model() {
    let dir = scratch("inspect");
    let ckpt = dir.join("ckpt.pt");
    common::run_python(NANOGPT_CKPT, &ckpt.display().to_string());
    let info = checkpoint::inspect(&ckpt).unwrap();
    assert_eq!(info.format, CheckpointFormat::TorchSave);
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct ModelArgs {
        n_layer: i64,
        n_embd: i64,
        bias: bool,
    }
    let args: ModelArgs = info.get(&ckpt, "model_args").unwrap();
    assert_eq!(
        args,
        ModelArgs {
            n_layer: 2,
            n_embd: 4,
            bias: true
        }
    );
    assert_eq!(info.get::<i64>(&ckpt, "iter_num").unwrap(), 250);
    assert_eq!(info.get::<f64>(&ckpt, "best_val_loss").unwrap(), 1.25);
    assert_eq!(info.state["config"]["dataset"], "shakespeare_char");
    assert_eq!(info.state["model"]["weight"], Value::Null);
    let shapes: Vec<(&str, &[i64])> = info
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("model.weight", &[3, 4][..]),
            ("model.bias", &[3]),
            ("best_val_loss", &[])
        ]
    );
    assert!(info.get::<i64>(&ckpt, "no_such_entry").is_err());

    // tch-fabric's own format: the user state, the precision, the tensors from the header.
    let f = Fabric::new("bf16-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let fc = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    let _fc = f.setup_module(fc, &mut vs).unwrap();
    let own = dir.join("own.safetensors");
    f.save(&own, &json!({"model_args": {"n_layer": 2}}))
        .unwrap();
    let info = checkpoint::inspect(&own).unwrap();
    assert_eq!(info.format, CheckpointFormat::TchFabric);
    assert_eq!(
        info.precision.map(|p| p.to_string()).as_deref(),
        Some("bf16-true")
    );
    assert_eq!(info.state["model_args"]["n_layer"], 2);
    let w = info.tensors.iter().find(|t| t.name == "fc.weight").unwrap();
    assert_eq!((w.shape.as_slice(), w.kind), (&[3, 4][..], Kind::BFloat16));

    // The Python checkpoint loads into a model built from what was read, its 0-dim
    // best_val_loss into a number.
    let g = Fabric::new("32-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root(), args.n_embd, 3, Default::default());
    let _lin = g.setup_module(lin, &mut vs).unwrap();
    let rest: Value = g.load(&ckpt).unwrap();
    assert_eq!(
        (rest["iter_num"].clone(), rest["best_val_loss"].clone()),
        (json!(250), json!(1.25))
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn strict_loads_refuse_a_missing_optimizer_or_scaler_state() {
    let dir = scratch("strict");
    let setup = |precision: &str, optimizers: usize| {
        let f = Fabric::builder()
            .precision(precision)
            .accelerator("cpu")
            .cpu_fp16_autocast(true)
            .build()
            .unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        let a = nn::linear(vs.root() / "a", 2, 2, Default::default());
        let _ = nn::linear(vs.root() / "b", 2, 2, Default::default());
        let _m = f.setup_module(a, &mut vs).unwrap();
        let opts: Vec<FabricOptimizer> = (0..optimizers)
            .map(|i| {
                let name = if i == 0 { "a" } else { "b" };
                let params = tch_fabric::optim::Params::new(
                    vs.variables()
                        .into_iter()
                        .filter(|(n, _)| n.starts_with(name))
                        .collect(),
                )
                .unwrap();
                f.setup_optimizers(AdamW::with_params(params, 1e-3).unwrap())
                    .unwrap()
            })
            .collect();
        (f, vs, opts)
    };
    for ext in ["safetensors", "pt"] {
        // Saved with one optimizer, loaded where there are two.
        let path = dir.join(format!("one.{ext}"));
        let (f, _vs, _opts) = setup("32-true", 1);
        f.save(&path, &json!({})).unwrap();
        let (g, _vs, _opts) = setup("32-true", 2);
        match g.load::<Value>(&path) {
            Err(Error::Checkpoint { reason, .. }) => {
                assert!(reason.contains("optimizer_1"), "{ext}: {reason}")
            }
            other => panic!("{ext}: {other:?}"),
        }
        let (_, report) = g.load_non_strict::<Value>(&path).unwrap();
        assert_eq!(report.missing_state, ["optimizer_1"], "{ext}");

        // Saved without a GradScaler, loaded under 16-mixed.
        let path = dir.join(format!("noscaler.{ext}"));
        let (f, _vs, _opts) = setup("bf16-mixed", 1);
        f.save(&path, &json!({})).unwrap();
        let (g, _vs, _opts) = setup("16-mixed", 1);
        match g.load::<Value>(&path) {
            Err(Error::Checkpoint { reason, .. }) => {
                assert!(reason.contains("GradScaler"), "{ext}: {reason}")
            }
            other => panic!("{ext}: {other:?}"),
        }
        let (_, report) = g.load_non_strict::<Value>(&path).unwrap();
        assert_eq!(report.missing_state, ["scaler"], "{ext}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

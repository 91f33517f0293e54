//! Lightning Fabric (Python) and tch-fabric train the same models from the same weights on
//! the same data, in every precision, and must agree.
//!
//! Reference data comes from Lightning Fabric 2.6 and PyTorch 2.13 themselves, generated live by
//!     .venv/bin/python scripts/gen_fabric_parity.py DIR
//! into a temporary DIR at the start of the test (about 10 s): float32 matmuls round differently
//! on different CPUs (AVX-512 or AMX against AVX2 kernels), so stored reference bits from one
//! machine do not hold on another, while the same machine's PyTorch and tch-fabric agree.
//!
//! Both sides use AdamW through PyTorch's fused kernel (`torch.optim.AdamW(fused=True)` in
//! Python, `FusedAdamW` here) and the same ATen ops for forward and backward, on one thread, so
//! float32 and float64 runs agree to the last bits and the low precisions closely.
mod common;

use serde_json::Value;
use std::path::PathBuf;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{Clip, Fabric, FabricModule, FusedAdamW, GradScalerConfig, StepOutcome};

/// The folder the reference was generated into (once per test binary).
fn reference() -> &'static PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tch-fabric-parity-{}", std::process::id()));
        let out = std::process::Command::new(common::python())
            .arg(common::repo().join("scripts/gen_fabric_parity.py"))
            .arg(&dir)
            .output()
            .expect("start python");
        assert!(
            out.status.success(),
            "gen_fabric_parity.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn dir() -> PathBuf {
    reference().join("fabric_parity")
}

fn read(name: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(dir().join(name)).unwrap()
}

fn get(v: &[(String, Tensor)], name: &str) -> Tensor {
    v.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone()
}

/// The Python side's `l3(relu(l2(tanh(l1(x)))))`.
fn mlp(vs: &nn::VarStore) -> Box<dyn Module> {
    let p = vs.root();
    Box::new(
        nn::seq()
            .add(nn::linear(&p / "l1", 16, 32, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&p / "l2", 32, 32, Default::default()))
            .add_fn(|x| x.relu())
            .add(nn::linear(&p / "l3", 32, 4, Default::default())),
    )
}

/// The Python side's attention block.
#[derive(Debug)]
struct Block {
    ln: nn::LayerNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    head: nn::Linear,
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.ln);
        let att =
            (h.apply(&self.q).matmul(&h.apply(&self.k).transpose(-2, -1)) / 4.0).softmax(-1, None);
        let a = att.matmul(&h.apply(&self.v));
        let x2 = x + a.apply(&self.o);
        x2.mean_dim(1, false, None).apply(&self.head)
    }
}

fn block(vs: &nn::VarStore) -> Box<dyn Module> {
    let p = vs.root();
    let lin = |name: &str, i, o| nn::linear(&p / name, i, o, Default::default());
    Box::new(Block {
        ln: nn::layer_norm(&p / "ln", vec![16], Default::default()),
        q: lin("q", 16, 16),
        k: lin("k", 16, 16),
        v: lin("v", 16, 16),
        o: lin("o", 16, 16),
        head: lin("head", 16, 4),
    })
}

struct BoxedModule(Box<dyn Module>);

impl std::fmt::Debug for BoxedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxedModule")
    }
}

impl Module for BoxedModule {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.0.forward(xs)
    }
}

/// Relative tolerance for losses, norms and weights per precision: 1e-6 for float32 / float64
/// (the bar), the dtype's epsilon for the low precisions. With the same kernels on one
/// thread the runs in fact agree to the bit; the tolerances leave room for another machine's
/// SIMD paths.
fn tolerance(precision: &str) -> f64 {
    match precision {
        "32-true" | "64-true" => 1e-6,
        "bf16-mixed" | "bf16-true" => 2f64.powi(-7),
        "16-mixed" | "16-true" => 2f64.powi(-10),
        other => panic!("precision {other}"),
    }
}

fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap(),
        v => v.as_f64().unwrap(),
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= rel * b.abs().max(1e-3)
}

struct Run {
    losses: Vec<f64>,
    norms: Vec<f64>,
    stepped: Vec<bool>,
    scales: Vec<f64>,
    weights: Vec<(String, Tensor)>,
}

fn train(case: &Value) -> Run {
    let model_name = case["model"].as_str().unwrap();
    let precision = case["precision"].as_str().unwrap();
    let clip = case["clip_max_norm"].as_f64();
    let mut builder = Fabric::builder().precision(precision).accelerator("cpu");
    if case["runner"] == "torch-gradscaler" {
        // PyTorch's composition (unscale, clip, step) for its bits; the default folded
        // clipping is checked against PyTorch at float32 tolerance in tests/fused_adamw.rs.
        builder = builder.cpu_fp16_autocast(true).grad_scaler(
            GradScalerConfig::default()
                .init_scale(case["init_scale"].as_f64().unwrap())
                .growth_interval(case["growth_interval"].as_i64().unwrap())
                .fold_clipping(false),
        );
    }
    let fabric = builder.build().unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = match model_name {
        "mlp" => mlp(&vs),
        "block" => block(&vs),
        other => panic!("model {other}"),
    };
    vs.load(dir().join(format!("{model_name}_init.safetensors")))
        .unwrap();
    let data = read(&format!("{model_name}_data.safetensors"));
    let (x, y) = (get(&data, "x"), get(&data, "y"));
    let eps = case["eps"].as_f64().unwrap_or(1e-8);
    let opt = FusedAdamW::new(&vs, 1e-2).unwrap().eps(eps);
    let (model, mut opt): (FabricModule<BoxedModule>, _) =
        fabric.setup(BoxedModule(model), &mut vs, opt).unwrap();

    let mut run = Run {
        losses: vec![],
        norms: vec![],
        stepped: vec![],
        scales: vec![],
        weights: vec![],
    };
    for _ in 0..case["losses"].as_array().unwrap().len() {
        opt.zero_grad().unwrap();
        let out = model.forward(&x);
        let loss = {
            let _ac = fabric.autocast().unwrap();
            out.mse_loss(&y, Reduction::Mean)
        };
        fabric.backward(&loss).unwrap();
        if let Some(max_norm) = clip {
            run.norms.push(
                fabric
                    .clip_gradients(&mut opt, Clip::norm(max_norm))
                    .unwrap()
                    .value()
                    .unwrap(),
            );
        }
        let outcome = opt.step().unwrap();
        run.losses.push(loss.double_value(&[]));
        run.stepped.push(outcome == StepOutcome::Stepped);
        run.scales.push(fabric.loss_scale().unwrap());
    }
    let mut w: Vec<_> = vs.variables().into_iter().collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    run.weights = w;
    run
}

#[test]
fn training_matches_lightning_fabric_in_every_precision() {
    // The reference ran with one thread so that reductions sum in the same order.
    tch::set_num_threads(1);
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(reference().join("fabric_parity.json")).unwrap(),
    )
    .unwrap();
    assert!(index["torch_version"]
        .as_str()
        .unwrap()
        .starts_with("2.13.0"));
    let cases = index["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for case in cases {
        let name = format!(
            "{} {} clip={}",
            case["model"].as_str().unwrap(),
            case["precision"].as_str().unwrap(),
            case["clip_max_norm"]
        );
        let tol = tolerance(case["precision"].as_str().unwrap());
        let run = train(case);
        let mut worst = 0.0f64;
        for (i, (got, want)) in run
            .losses
            .iter()
            .zip(case["losses"].as_array().unwrap())
            .enumerate()
        {
            let want = number(want);
            worst = worst.max((got - want).abs() / want.abs().max(1e-3));
            if !close(*got, want, tol) {
                failures.push(format!("{name}: step {i}: loss {got} vs Lightning {want}"));
                break;
            }
        }
        for (i, (got, want)) in run
            .norms
            .iter()
            .zip(case["norms"].as_array().unwrap())
            .enumerate()
        {
            let want = number(want);
            if !close(*got, want, tol) {
                failures.push(format!(
                    "{name}: step {i}: clip norm {got} vs Lightning {want}"
                ));
                break;
            }
        }
        if let Some(stepped) = case["stepped"].as_str() {
            let want: Vec<bool> = stepped.bytes().map(|b| b == b'1').collect();
            if run.stepped != want {
                failures.push(format!(
                    "{name}: skipped steps differ: {:?} vs {stepped}",
                    run.stepped
                ));
            }
            let scales: Vec<f64> = case["scales"]
                .as_array()
                .unwrap()
                .iter()
                .map(number)
                .collect();
            if run.scales != scales {
                failures.push(format!(
                    "{name}: scales differ: {:?} vs {scales:?}",
                    run.scales
                ));
            }
        }
        let final_w = read(case["final"].as_str().unwrap());
        for (n, t) in &run.weights {
            let want = get(&final_w, n);
            let got = t.to_kind(Kind::Double);
            let diff = (&got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]).max(1e-3);
            if diff > tol * scale {
                failures.push(format!(
                    "{name}: weight {n} differs by {diff} (max |w| {scale})"
                ));
            }
        }
        let first_diff = run
            .losses
            .iter()
            .zip(case["losses"].as_array().unwrap())
            .position(|(g, w)| (*g as f32).to_bits() != (number(w) as f32).to_bits());
        let first_norm_diff = run
            .norms
            .iter()
            .zip(case["norms"].as_array().unwrap())
            .position(|(g, w)| (*g as f32).to_bits() != (number(w) as f32).to_bits());
        report.push(format!(
            "{name}: worst relative loss difference {worst:.2e}, first differing step {first_diff:?} (norm {first_norm_diff:?})"
        ));
    }
    println!("{}", report.join("\n"));
    assert!(
        cases.len() >= 20,
        "every precision, both models, with and without clipping"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

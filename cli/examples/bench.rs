//! One training-step benchmark run, for scripts/bench.py (which runs it next to Lightning
//! Fabric and plain PyTorch and prints the table). Prints one JSON line.
//!
//!     cargo run --release --example bench -- --model mlp --precision bf16-mixed --mode fabric
//!
//! `--mode fabric` is the Fabric facade; `--mode raw` is the same step written by hand with
//! tch-fabric's building blocks (autocast guard, GradScaler, FusedAdamW) and no facade.
use anyhow::{bail, Result};
use clap::Parser;
use std::time::Instant;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{
    autocast, Fabric, FusedAdamW, GradScaler, GradScalerConfig, Optimizer, Precision,
};

#[path = "../src/bin/demo/model.rs"]
mod model;

#[derive(Parser)]
struct Args {
    /// mlp (3 layers, 64 wide, batch 32), transformer (the demo's model), or mlp50m (about
    /// 50 M parameters, for memory).
    #[arg(long)]
    model: String,
    #[arg(long)]
    precision: String,
    /// fabric or raw.
    #[arg(long)]
    mode: String,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// After the timed steps, run one more under `tch_fabric::profile::count_ops` and add its libtorch
    /// ops to the JSON (`"ops": {name: [calls, top-level calls, self microseconds]}`), for
    /// scripts/profile_step.py.
    #[arg(long)]
    profile: bool,
}

/// (current, peak) resident memory of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    const MIB: f64 = 1024.0 * 1024.0;
    tch_fabric::memory::process_rss().map_or((f64::NAN, f64::NAN), |m| {
        (m.current_bytes as f64 / MIB, m.peak_bytes as f64 / MIB)
    })
}

fn build(name: &str, vs: &nn::VarStore) -> Result<(Box<dyn Module>, Tensor, Tensor)> {
    let p = vs.root();
    let f = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    Ok(match name {
        "mlp" => {
            let m = nn::seq()
                .add(nn::linear(&p / "l1", 64, 64, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(&p / "l2", 64, 64, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(&p / "l3", 64, 64, Default::default()));
            (Box::new(m), f(&[32, 64]), f(&[32, 64]))
        }
        "mlp50m" => {
            let m = nn::seq()
                .add(nn::linear(&p / "l1", 4096, 4096, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(&p / "l2", 4096, 4096, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(&p / "l3", 4096, 4096, Default::default()));
            (Box::new(m), f(&[32, 4096]), f(&[32, 4096]))
        }
        "transformer" => {
            let cfg = model::Config {
                vocab: 64,
                block: 96,
                d_model: 96,
                layers: 3,
                heads: 4,
            };
            let x = Tensor::randint(64, [16, 96], (Kind::Int64, Device::Cpu));
            let y = Tensor::randint(64, [16, 96], (Kind::Int64, Device::Cpu));
            (Box::new(model::Gpt::new(&p, cfg)), x, y)
        }
        other => bail!("unknown model {other}"),
    })
}

fn loss_fn(name: &str, out: &Tensor, y: &Tensor) -> Tensor {
    if name == "transformer" {
        let v = out.size()[2];
        out.view([-1, v]).cross_entropy_loss::<Tensor>(
            &y.view([-1]),
            None,
            Reduction::Mean,
            -100,
            0.0,
        )
    } else {
        out.mse_loss(y, Reduction::Mean)
    }
}

struct Boxed(Box<dyn Module>);

impl std::fmt::Debug for Boxed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("model")
    }
}

impl Module for Boxed {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.0.forward(xs)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    tch::manual_seed(0);
    let base = rss_mib().0;
    // Tensor bytes from here on, the model's included.
    tch_fabric::memory::count_cpu_tensor_memory()?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let (net, x, y) = build(&args.model, &vs)?;
    // Each mode is one step as a closure, so the timing loop and the profiled step are shared.
    let mut step: Box<dyn FnMut() -> Result<()>> = match args.mode.as_str() {
        "fabric" => {
            let fabric = Fabric::builder()
                .precision(args.precision.as_str())
                .accelerator("cpu")
                .build()?;
            let opt = FusedAdamW::new(&vs, 1e-3)?;
            let (net, mut opt) = fabric.setup(Boxed(net), &mut vs, opt)?;
            let model = args.model.clone();
            Box::new(move || {
                opt.zero_grad()?;
                let out = net.forward(&x);
                let loss = {
                    let _ac = fabric.autocast()?;
                    loss_fn(&model, &out, &y)
                };
                fabric.backward(&loss)?;
                opt.step()?;
                Ok(())
            })
        }
        "raw" => {
            // The same step by hand: what Fabric does, without the facade. On a CPU, 16-mixed
            // means bf16-mixed (Lightning's rule, which Fabric follows by default).
            let mut precision: Precision = args.precision.parse()?;
            if precision == Precision::F16Mixed {
                precision = Precision::Bf16Mixed;
            }
            match precision {
                Precision::F64True => vs.double(),
                Precision::F16True => vs.half(),
                Precision::Bf16True => vs.bfloat16(),
                _ => {}
            }
            let mut opt = FusedAdamW::new(&vs, 1e-3)?;
            let mut scaler = GradScaler::new(
                GradScalerConfig::default().enabled(precision.needs_grad_scaler()),
            )?;
            let x = if precision != Precision::F32True && x.is_floating_point() {
                x.to_kind(precision.input_dtype())
            } else {
                x.shallow_clone()
            };
            let model = args.model.clone();
            Box::new(move || {
                opt.zero_grad()?;
                let loss = {
                    let _ac = precision
                        .autocast_dtype()
                        .map(|k| autocast(Device::Cpu, k))
                        .transpose()?;
                    let _dt = match precision {
                        Precision::F64True | Precision::F16True | Precision::Bf16True => {
                            Some(tch_fabric::default_dtype::DefaultDtypeGuard::new(
                                precision.param_dtype(),
                            )?)
                        }
                        _ => None,
                    };
                    let out = net.forward(&x);
                    let out = if precision != Precision::F32True {
                        out.to_kind(Kind::Float)
                    } else {
                        out
                    };
                    loss_fn(&model, &out, &y)
                };
                scaler.scale(&loss)?.backward();
                scaler.step(&mut opt)?;
                scaler.update()?;
                Ok(())
            })
        }
        other => bail!("unknown mode {other}"),
    };
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        step()?;
        if i >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let ops = if args.profile {
        let (done, counts) = tch_fabric::profile::count_ops(&mut step)?;
        done?;
        let ops: serde_json::Map<String, serde_json::Value> = counts
            .by_name
            .iter()
            .map(|(name, (all, top))| {
                let us = counts.self_time[name].as_secs_f64() * 1e6;
                (name.clone(), serde_json::json!([all, top, us]))
            })
            .collect();
        Some(ops)
    } else {
        None
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mut report = serde_json::json!({
        "median_ms": median * 1e3,
        "min_ms": times[0] * 1e3,
        "peak_rss_mib": rss_mib().1,
        "base_rss_mib": base,
        "peak_tensor_mib": tch_fabric::memory_stats(Device::Cpu)?.peak_bytes as f64 / (1024.0 * 1024.0),
    });
    if let Some(ops) = ops {
        report["ops"] = ops.into();
    }
    println!("{report}");
    Ok(())
}

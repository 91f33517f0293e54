//! Trains a small MLP on a synthetic regression task with the precision given on the command
//! line, the way a Lightning Fabric script would:
//!
//!     cargo run --example quickstart -- --precision bf16-mixed
//!
//! Mixed precisions keep float32 weights and run the forward under autocast (`16-mixed` adds
//! a GradScaler); `-true` precisions convert the weights and inputs.
use anyhow::Result;
use clap::Parser;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{autocast, GradScaler, GradScalerConfig, Optimizer, Precision, TchOptimizer};

#[derive(Parser)]
struct Args {
    /// A Lightning precision value: 64-true, 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true.
    #[arg(long, default_value = "bf16-mixed")]
    precision: String,
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
}

fn main() -> Result<()> {
    // tch-fabric reports Lightning's warnings (CPU fp16 fallback, legacy spellings) via `log`.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let precision: Precision = args.precision.parse()?;
    let device = Device::Cpu;
    tch::manual_seed(0);

    let mut vs = nn::VarStore::new(device);
    let model = nn::seq()
        .add(nn::linear(vs.root() / "l1", 16, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "l2", 64, 1, Default::default()));
    if !precision.is_mixed() {
        vs.set_kind(precision.param_dtype());
    }
    let mut opt = TchOptimizer::new(&vs, nn::AdamW::default(), 1e-2)?;
    let mut scaler =
        GradScaler::new(GradScalerConfig::default().enabled(precision.needs_grad_scaler()))?;

    let true_w = Tensor::randn([16, 1], (Kind::Float, device));
    let x = Tensor::randn([256, 16], (Kind::Float, device));
    let y = x.mm(&true_w);

    for step in 0..args.steps {
        let loss = {
            let _guard = precision
                .autocast_dtype()
                .map(|dtype| autocast(device, dtype))
                .transpose()?;
            let out = model.forward(&x.to_kind(precision.input_dtype()));
            out.to_kind(Kind::Float).mse_loss(&y, Reduction::Mean)
        };
        opt.zero_grad()?;
        scaler.scale(&loss)?.backward();
        let outcome = scaler.step(&mut opt)?;
        scaler.update()?;
        if step % 50 == 0 || step + 1 == args.steps {
            println!(
                "[{precision}] step {step:4}  loss {:.6}  scale {}{}",
                loss.double_value(&[]),
                scaler.get_scale()?,
                if outcome.is_skipped() {
                    "  (skipped)"
                } else {
                    ""
                }
            );
        }
    }
    println!(
        "[{precision}] steps taken {}, skipped {}",
        scaler.steps_taken()?,
        scaler.steps_skipped()?
    );
    Ok(())
}

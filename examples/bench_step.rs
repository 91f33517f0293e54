//! The whole AMP step with clipping (GradScaler + clip_grad_norm + AdamW + scale update) on a
//! large set of float32 gradients, timed three ways in one run, interleaved, medians:
//!
//! - `folded`: tch-fabric's default with a fused optimizer: one read pass over the scaled
//!   gradients (`tch_fabric::unscale_sumsq_`: inf check + sum of squares), the clip
//!   coefficient and the loss scale folded into one divisor on the device, and `_fused_adamw_`
//!   dividing by it; no unscale pass, no clip pass, no host sync.
//! - `composed`: the same libtorch ops PyTorch's GradScaler + `clip_grad_norm_` +
//!   `AdamW(fused=True)` run, called from Rust (tch-fabric with `fold_clipping(false)`):
//!   `_amp_foreach_non_finite_check_and_unscale_`, `_foreach_norm` + norm of the norms,
//!   `_foreach_mul_`, `_fused_adamw_(found_inf)`.
//! - `tch-adamw`: the same composition with tch's own `nn::AdamW` (libtorch's C++
//!   `torch::optim::AdamW`), the path a tch program takes today.
//!
//!     cargo run --release --example bench_step -- --elements 126000000 --tensors 64
//!
//! Prints a markdown table with the per-step medians and the ratios.
use anyhow::Result;
use clap::Parser;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};
use tch_fabric::{
    profile::{count_ops, OpCounts},
    Clip, Fabric, FabricOptimizer, FusedAdamW, GradScalerConfig, TchOptimizer,
};

#[derive(Parser)]
struct Args {
    /// Gradient elements in all.
    #[arg(long, default_value_t = 126_000_000)]
    elements: i64,
    /// Number of gradient tensors.
    #[arg(long, default_value_t = 64)]
    tensors: i64,
    /// Timed steps per configuration (interleaved).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print the op counts per op name.
    #[arg(long)]
    verbose: bool,
}

/// A "model" whose loss is `sum_i <p_i, G_i>`, so backward leaves `scale * G_i` in each
/// gradient: the step sees the gradients a real backward would hand it.
struct Setup {
    fabric: Fabric,
    vs: nn::VarStore,
    opt: FabricOptimizer,
    targets: Vec<Tensor>,
}

fn setup(kind: &str, args: &Args) -> Result<Setup> {
    let fabric = Fabric::builder()
        .accelerator("cpu")
        .precision("16-mixed")
        .cpu_fp16_autocast(true)
        .grad_scaler(
            GradScalerConfig::default()
                .init_scale(1024.0)
                .growth_interval(1_000_000)
                .fold_clipping(kind == "folded"),
        )
        .build()?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let per = args.elements / args.tensors;
    let mut targets = Vec::new();
    for i in 0..args.tensors {
        let _ = vs.root().randn(&format!("p{i:02}"), &[per], 0.0, 0.02);
        targets.push(Tensor::randn([per], (Kind::Float, Device::Cpu)) * 1e-3);
    }
    // The "model" is the identity: only its parameters in `vs` matter here.
    let identity = nn::func(|x| x.shallow_clone());
    let opt = if kind == "tch-adamw" {
        let o = TchOptimizer::new(&vs, nn::AdamW::default().wd(0.01), 1e-3)?;
        fabric.setup(identity, &mut vs, o)?.1
    } else {
        let o = FusedAdamW::new(&vs, 1e-3)?;
        fabric.setup(identity, &mut vs, o)?.1
    };
    Ok(Setup {
        fabric,
        vs,
        opt,
        targets,
    })
}

/// One iteration; returns the seconds of the part after backward (clip + step + update).
fn iteration(s: &mut Setup) -> Result<f64> {
    Ok(iteration_counted(s, false)?.0)
}

/// [`iteration`], optionally counting the libtorch ops of the part after backward.
fn iteration_counted(s: &mut Setup, count: bool) -> Result<(f64, Option<OpCounts>)> {
    s.opt.zero_grad()?;
    let vars = s.vs.trainable_variables();
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (p, g) in vars.iter().zip(&s.targets) {
        loss += (p * g).sum(Kind::Float);
    }
    s.fabric.backward(&loss)?;
    let t0 = Instant::now();
    let after_backward = |s: &mut Setup| -> Result<()> {
        let _norm = s.fabric.clip_gradients(&mut s.opt, Clip::norm(1.0))?;
        s.opt.step()?;
        Ok(())
    };
    if count {
        let (r, counts) = count_ops(|| after_backward(s))?;
        r?;
        return Ok((t0.elapsed().as_secs_f64(), Some(counts)));
    }
    after_backward(s)?;
    Ok((t0.elapsed().as_secs_f64(), None))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let kinds = ["folded", "composed", "tch-adamw"];
    println!(
        "torch threads {}, {} M float32 gradients in {} tensors, medians of {} interleaved steps\n",
        tch::get_num_threads(),
        args.elements / 1_000_000,
        args.tensors,
        args.reps
    );
    // The libtorch ops one step calls (independent of the machine's speed): top-level calls
    // are those the step asked for; the total includes ops nested inside them.
    // Shim calls cross from Rust into tch-fabric's C++ (each takes whole tensor lists).
    println!("| step | shim calls | libtorch calls (top-level) | all ops |");
    println!("|---|---|---|---|");
    for kind in kinds {
        let mut s = setup(kind, &args)?;
        iteration(&mut s)?;
        let (_, counts) = iteration_counted(&mut s, true)?;
        let counts = counts.expect("counted");
        println!(
            "| {kind} | {} | {} | {} |",
            counts.shim_calls,
            counts.top_level(),
            counts.total()
        );
        if args.verbose {
            for (name, (all, top)) in &counts.by_name {
                println!("|   {name} | | {top} | {all} |");
            }
        }
    }
    println!();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    // One configuration alive at a time keeps memory at one model's worth; interleaving the
    // repetitions spreads the machine's noise over all three.
    for rep in 0..=args.reps {
        for (k, kind) in kinds.iter().enumerate() {
            let mut s = setup(kind, &args)?;
            iteration(&mut s)?; // first step: AdamW state allocation
            let t = iteration(&mut s)?;
            if rep > 0 {
                times[k].push(t);
            }
        }
    }
    let med: Vec<f64> = times.into_iter().map(median).collect();
    println!("| step (clip + AdamW + scale update) | ms | vs folded |");
    println!("|---|---|---|");
    for (kind, m) in kinds.iter().zip(&med) {
        println!("| {kind} | {:.0} | {:.2}x |", m * 1e3, m / med[0]);
    }
    Ok(())
}

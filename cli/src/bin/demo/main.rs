//! What each precision buys: trains a character-level transformer with `Fabric` in one
//! precision, or in 32-true and every precision that saves memory or time (each in a fresh
//! child process), and prints loss, speed, tensor memory (where it goes: parameters, gradients,
//! optimizer state, activations) and loss-scale figures side by side, with an SVG chart, under
//! the machine's processor and its 16-bit matrix units.
//!
//! The default model and step count are sized for the machine, so that the comparison takes
//! about 3 minutes on 2 cores: a model where matrix multiplies dominate (d_model 512) on a CPU
//! with bfloat16 matrix units (AMX-BF16, AVX512-BF16) or a GPU, the small one (d_model 96)
//! elsewhere, where 16-bit precisions save memory but no time, as the demo then says.
//!
//!     cargo run --release --bin demo            # compare the precisions
//!     cargo run --bin demo -- --precision bf16-mixed --steps 400
//!     cargo run --bin demo -- --data my.txt --d-model 128 --layers 4
//!
//!     cargo run --bin demo -- --devices 2       # data-parallel: 2 processes (DDP)
//!
//! Ctrl-C stops cleanly and keeps the last checkpoint; `--resume` continues from it along the
//! same trajectory (weights, FusedAdamW moments, loss scale and the batch sequence are all
//! restored).
//!
//! With `--devices N` every run is N processes (the demo relaunches itself as the ranks, as
//! `fabric run --devices N` does): each rank trains on its shard of every batch
//! ([`tch_fabric::dist::DistributedSampler`]), gradients are averaged across ranks, and rank 0
//! writes the checkpoints and reports.
mod chart;
mod corpus;
mod machine;
// The launcher's process supervision; its single-process mode is the launcher's alone.
#[allow(dead_code)]
#[path = "../fabric/launch.rs"]
mod launch;
mod model;

use anyhow::{bail, Context, Result};
use clap::Parser;
use corpus::{Corpus, Rng};
use indicatif::{ProgressBar, ProgressStyle};
use machine::Machine;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};
use tch_fabric::{
    dist::{DistributedSampler, ReduceOp},
    Fabric, FusedAdamW, Precision, StepOutcome,
};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "demo",
    about = "What each precision buys: loss, speed, memory, loss scale"
)]
struct Args {
    /// Train one precision (64-true, 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true).
    /// Without it, 32-true and the precisions that save memory or time are compared (all but
    /// 64-true).
    #[arg(long)]
    precision: Option<String>,
    /// Compare the precisions (the default).
    #[arg(long, conflicts_with = "precision")]
    compare: bool,
    /// A UTF-8 text file to train on (default: a generated corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps per precision (1 to 1000000). This default and the model's size are
    /// sized for the machine: larger where it multiplies 16-bit matrices natively.
    #[arg(long, default_value_t = Size::here().steps)]
    steps: usize,
    /// Sequences per batch (1 to 65536).
    #[arg(long, default_value_t = Size::here().batch)]
    batch: i64,
    /// Context length in characters (2 to 65536).
    #[arg(long, default_value_t = Size::here().block)]
    block: i64,
    /// Model width (1 to 65536, a multiple of --heads).
    #[arg(long, default_value_t = Size::here().d_model)]
    d_model: i64,
    /// Transformer layers (1 to 1024).
    #[arg(long, default_value_t = Size::here().layers)]
    layers: i64,
    /// Attention heads (at least 1).
    #[arg(long, default_value_t = Size::here().heads)]
    heads: i64,
    /// Learning rate (FusedAdamW).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Adam's epsilon. float16 parameters (16-true) keep Adam's second moment in float16, where
    /// small values flush to zero; a larger epsilon (1e-4) keeps such runs finite.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Seed for the weights and the batch sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for checkpoints, reports and the chart.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
    /// Save a checkpoint every this many steps, at least 1 (and on Ctrl-C, and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from the precision's last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Processes (devices) per run: more than 1 trains data-parallel, each process on its
    /// share of every batch (1 to 1024).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Write bfloat16 weights back by stochastic rounding (FusedAdamW's
    /// `.stochastic_rounding(--seed)`): bf16-true then trains like 32-true. The comparison
    /// adds a `bf16-true + stochastic rounding` run.
    #[arg(long)]
    stochastic_rounding: bool,
    /// Write bfloat16 weights back with Kahan-compensated updates (FusedAdamW's
    /// `.kahan_summation(true)`): deterministic, one more bfloat16 buffer per weight.
    #[arg(long, conflicts_with = "stochastic_rounding")]
    kahan: bool,
    /// Also measure the validation loss after these steps (in the report's `val_at`; used by
    /// scripts/bench_rounding.py to read several run lengths off one run).
    #[arg(long, hide = true, value_delimiter = ',')]
    eval_at: Vec<usize>,
    /// Where a child run writes its report (used by --compare).
    #[arg(long, hide = true)]
    report: Option<PathBuf>,
}

/// The default run, sized for the machine so that the comparison of every precision takes
/// about 3 minutes on 2 cores.
#[derive(Debug, Clone, Copy)]
struct Size {
    steps: usize,
    batch: i64,
    block: i64,
    d_model: i64,
    layers: i64,
    heads: i64,
}

impl Size {
    /// Where 16-bit matrix products run natively (AMX-BF16 or AVX512-BF16, a GPU), a model
    /// whose matrix multiplies dominate the step (d_model 512, 4 layers, 8 x 256 tokens), so
    /// that the precisions' speed shows. Elsewhere libtorch computes them through float32,
    /// tens of times slower than float32 itself (on a 2-core AVX2 EPYC, a bfloat16 matrix
    /// product at 1.2 GFLOP/s against 47 in float32, in PyTorch as here): the small model (d_model
    /// 96, 3 layers) keeps the 16-bit runs to about a second a step, and shows the memory.
    fn for_machine(machine: &Machine) -> Size {
        if machine.bf16 {
            Size {
                steps: 40,
                batch: 8,
                block: 256,
                d_model: 512,
                layers: 4,
                heads: 8,
            }
        } else {
            Size {
                steps: 40,
                batch: 16,
                block: 96,
                d_model: 96,
                layers: 3,
                heads: 4,
            }
        }
    }

    /// The size for this machine (detected once).
    fn here() -> Size {
        static SIZE: std::sync::OnceLock<Size> = std::sync::OnceLock::new();
        *SIZE.get_or_init(|| Size::for_machine(&Machine::detect(Device::cuda_if_available())))
    }
}

/// JSON has no NaN: non-finite numbers travel as `null` and come back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        v.is_finite().then_some(*v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub mod vec {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
            let v: Vec<Option<f64>> = v.iter().map(|x| x.is_finite().then_some(*x)).collect();
            v.serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
            let v = Vec::<Option<f64>>::deserialize(d)?;
            Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub precision: String,
    #[serde(with = "nan_as_null::vec")]
    pub losses: Vec<f64>,
    /// Wall-clock seconds of each step in `losses` (empty when a resumed run's checkpoint
    /// kept none).
    #[serde(default)]
    pub step_s: Vec<f64>,
    /// The steps the GradScaler skipped (inf/NaN gradients).
    #[serde(default)]
    pub skipped_at: Vec<usize>,
    #[serde(with = "nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "nan_as_null")]
    pub val_loss: f64,
    // NaN when nothing was timed (a resumed run with no step left) or measured.
    #[serde(with = "nan_as_null")]
    pub ms_per_step: f64,
    #[serde(with = "nan_as_null")]
    pub tokens_per_s: f64,
    /// The most tensor memory the run held.
    #[serde(with = "nan_as_null")]
    pub peak_mib: f64,
    /// What `peak_mib` measured (CPU tensor bytes, or CUDA's caching allocator).
    #[serde(default)]
    pub memory_source: String,
    /// Where the memory of the last step went ([`tch_fabric::memory::MemoryReport`]): the
    /// parameters, their gradients, the optimizer's state, and the step's activation peak
    /// (NaN where no step ran).
    #[serde(default, with = "nan_as_null")]
    pub params_mib: f64,
    #[serde(default, with = "nan_as_null")]
    pub grads_mib: f64,
    #[serde(default, with = "nan_as_null")]
    pub optimizer_mib: f64,
    #[serde(default, with = "nan_as_null")]
    pub activations_mib: f64,
    pub skipped: u64,
    pub loss_scale: f64,
    pub steps: usize,
    /// (step, validation loss) at the `--eval-at` steps this run trained through.
    #[serde(default)]
    pub val_at: Vec<(usize, f64)>,
}

/// Every step's loss, time and skip so far: what the report and the chart are drawn from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct History {
    #[serde(with = "nan_as_null::vec")]
    losses: Vec<f64>,
    // The chart's time axis and skip marks; absent from checkpoints of older demos.
    #[serde(default)]
    step_s: Vec<f64>,
    #[serde(default)]
    skipped_at: Vec<usize>,
}

/// What a checkpoint carries besides weights, optimizer and scaler.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    step: usize,
    #[serde(flatten)]
    history: History,
    fingerprint: u64,
    shape: [i64; 5],
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The largest values the demo accepts: well past what trains in reasonable time here, and
/// small enough that no size computed from them overflows.
const MAX_STEPS: usize = 1_000_000;
const MAX_BATCH: i64 = 1 << 16;
const MAX_BLOCK: i64 = 1 << 16;
const MAX_D_MODEL: i64 = 1 << 16;
const MAX_LAYERS: i64 = 1024;
/// The largest `--data` file: its characters become 8-byte token ids.
const MAX_DATA_BYTES: u64 = 256 << 20;

/// Checks every flag's range, each refusal one line naming the flag and its range.
fn check_args(args: &Args) -> Result<()> {
    let range = |flag: &str, v: i64, lo: i64, hi: i64| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{flag} must be in {lo}..={hi}, not {v}"))
        }
    };
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.steps > MAX_STEPS {
        bail!("--steps must be at most {MAX_STEPS}, not {}", args.steps);
    }
    range("--batch", args.batch, 1, MAX_BATCH)?;
    range("--block", args.block, 2, MAX_BLOCK)?;
    range("--d-model", args.d_model, 1, MAX_D_MODEL)?;
    range("--layers", args.layers, 1, MAX_LAYERS)?;
    range("--heads", args.heads, 1, MAX_D_MODEL)?;
    if args.d_model % args.heads != 0 {
        bail!(
            "--d-model ({}) must be a multiple of --heads ({})",
            args.d_model,
            args.heads
        );
    }
    if !(args.lr.is_finite() && args.lr >= 0.0) {
        bail!("--lr must be a finite number >= 0, not {}", args.lr);
    }
    if !(args.eps.is_finite() && args.eps >= 0.0) {
        bail!("--eps must be a finite number >= 0, not {}", args.eps);
    }
    if (args.stochastic_rounding || args.kahan) && args.precision.is_none() {
        bail!(
            "--stochastic-rounding and --kahan train one precision: add --precision bf16-true (the \
             comparison has a bf16-true + stochastic rounding run of its own)"
        );
    }
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1 (a number of steps)");
    }
    if args.devices == 0 || args.devices > launch::MAX_DEVICES {
        bail!(
            "--devices must be in 1..={}, not {}",
            launch::MAX_DEVICES,
            args.devices
        );
    }
    Ok(())
}

/// A generous estimate of the memory one run needs (all its processes together): parameters,
/// gradients and two Adam moments in float64 at worst (32 bytes a parameter), and the
/// activations kept for the backward (attention scores included) with as much again for the
/// backward's temporaries, in float64 at worst. In f64, so that no size overflows.
fn estimate_bytes(args: &Args, vocab: usize) -> f64 {
    let (v, b, t) = (vocab as f64, args.batch as f64, args.block as f64);
    let (d, l, h) = (args.d_model as f64, args.layers as f64, args.heads as f64);
    let params = 2.0 * v * d + t * d + l * (12.0 * d * d + 13.0 * d) + 2.0 * d + v;
    let per_token = l * (18.0 * d + 2.0 * h * t) + 3.0 * v;
    args.devices as f64 * 32.0 * params + 16.0 * b * t * per_token
}

/// The memory the system says it can give without swapping (`MemAvailable`), if known.
fn available_bytes() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Refuses a configuration that cannot fit in this machine's memory: libtorch would fail an
/// allocation inside the model, where tch panics or the process is killed.
fn check_memory(args: &Args, vocab: usize) -> Result<()> {
    let need = estimate_bytes(args, vocab);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    if let Some(have) = available_bytes() {
        if need > 0.8 * have {
            bail!(
                "--batch {} --block {} --d-model {} --layers {} --devices {} (vocabulary {vocab}) \
                 need about {:.1} GiB to train, this machine has {:.1} GiB available: make them \
                 smaller",
                args.batch,
                args.block,
                args.d_model,
                args.layers,
                args.devices,
                gib(need),
                gib(have)
            );
        }
    }
    Ok(())
}

fn run(args: Args) -> Result<ExitCode> {
    check_args(&args)?;
    let corpus = load_corpus(&args)?;
    check_memory(&args, corpus.vocab.len())?;
    match &args.precision {
        Some(p) => {
            let precision: Precision = p.parse()?;
            if args.devices > 1 && std::env::var_os("WORLD_SIZE").is_none() {
                return launch_ranks(&args);
            }
            train(&args, &corpus, precision)
        }
        None => compare(&args),
    }
}

fn load_corpus(args: &Args) -> Result<Corpus> {
    // The last tenth is the validation split, and a sequence needs block + 1 characters plus
    // one to start from: ten times (block + 2) leaves both at least that.
    let min_len = (args.block as usize + 2) * 10;
    match &args.data {
        Some(path) => Corpus::load(path, min_len, MAX_DATA_BYTES),
        None => Corpus::from_text(&corpus::generated(200_000), min_len),
    }
}

/// The precisions compared: 32-true and those that save memory or time, on CPU (16-mixed as
/// real float16 autocast with a GradScaler, which PyTorch supports on CPU) as on CUDA.
/// 64-true buys neither and would take as long as all the others together; it trains alone
/// with `--precision 64-true`.
fn compared() -> Vec<Precision> {
    Precision::ALL
        .into_iter()
        .filter(|p| *p != Precision::F64True)
        .collect()
}

fn fabric_for(precision: Precision) -> Result<Fabric> {
    Ok(Fabric::builder()
        .precision(precision)
        .cpu_fp16_autocast(true)
        .build()?)
}

/// The run's name in tables and files: the precision, and the rounding option if any.
fn label(args: &Args, precision: Precision) -> String {
    if args.stochastic_rounding {
        format!("{precision} + stochastic rounding")
    } else if args.kahan {
        format!("{precision} + Kahan")
    } else {
        precision.to_string()
    }
}

fn checkpoint_path(args: &Args, precision: Precision) -> PathBuf {
    let name = label(args, precision).replace(" + ", "-").replace(' ', "-");
    args.out.join(format!("{name}.ckpt.safetensors"))
}

/// Runs this very command as `--devices` processes, as `fabric run --devices N` would.
fn launch_ranks(args: &Args) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the demo's own executable")?;
    let port = launch::free_port().context("finding a free port for the rendezvous")?;
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .env("LT_DEVICES", args.devices.to_string())
        .env("LT_STRATEGY", "ddp")
        .env("WORLD_SIZE", args.devices.to_string())
        .env("LOCAL_WORLD_SIZE", args.devices.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    Ok(launch::run_group(
        cmd,
        &exe.display().to_string(),
        args.devices,
        0,
    ))
}

/// Deterministic batch `step`: the same on a resumed run as on an uninterrupted one, and the
/// same global batch whatever the number of processes (each rank then keeps its shard).
fn batch(ids: &Tensor, n_train: i64, args: &Args, step: usize, device: Device) -> (Tensor, Tensor) {
    let mut rng = Rng::new(args.seed ^ (step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let starts: Vec<i64> = (0..args.batch)
        .map(|_| rng.below((n_train - args.block - 1) as usize) as i64)
        .collect();
    let idx = Tensor::from_slice(&starts).unsqueeze(1)
        + Tensor::arange(args.block, (Kind::Int64, Device::Cpu));
    let x = ids
        .index_select(0, &idx.view([-1]))
        .view([args.batch, args.block]);
    let y = ids
        .index_select(0, &(idx + 1).view([-1]))
        .view([args.batch, args.block]);
    (x.to_device(device), y.to_device(device))
}

/// The validation loss: the mean over 4 fixed batches from the held-out tenth of `ids`.
fn validate(
    fabric: &Fabric,
    model: &tch_fabric::FabricModule<model::Gpt>,
    ids: &Tensor,
    n_train: i64,
    args: &Args,
) -> Result<f64> {
    let n = ids.size()[0];
    let loss = tch::no_grad(|| -> Result<f64> {
        model.eval();
        let val_ids = ids.narrow(0, n_train, n - n_train);
        let count = (n - n_train) as usize;
        let mut total = 0.0;
        let evals = 4;
        for k in 0..evals {
            let vargs = Args {
                seed: 0xABCD + k,
                batch: args.batch.min(((count as i64) - args.block - 2).max(1)),
                ..args.clone()
            };
            let (x, y) = batch(&val_ids, n - n_train, &vargs, 0, fabric.device());
            total += loss_of(fabric, model, &x, &y)?.f_double_value(&[])?;
        }
        Ok(total / evals as f64)
    });
    model.train();
    loss
}

fn loss_of(
    fabric: &Fabric,
    model: &tch_fabric::FabricModule<model::Gpt>,
    x: &Tensor,
    y: &Tensor,
) -> Result<Tensor> {
    let logits = model.try_forward(x)?;
    let v = logits.size()[2];
    let _ac = fabric.autocast()?;
    Ok(logits.view([-1, v]).cross_entropy_loss::<Tensor>(
        &y.view([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    ))
}

/// Creates the output folder and turns Ctrl-C into a flag the training loop polls.
fn prepare(args: &Args) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    Ok(stop)
}

fn train(args: &Args, corpus: &Corpus, precision: Precision) -> Result<ExitCode> {
    let stop = prepare(args)?;
    let fabric = fabric_for(precision)?;
    let device = fabric.device();
    let (rank, world) = (fabric.global_rank(), fabric.world_size());
    let lead = fabric.is_global_zero();
    // This rank's rows of every global batch.
    let shard: Vec<i64> = DistributedSampler::new(args.batch as usize, world, rank)?
        .shuffle(false)
        .indices()
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let shard = Tensor::from_slice(&shard).to_device(device);
    tch::manual_seed(args.seed as i64);

    let cfg = model::Config {
        vocab: corpus.vocab.len() as i64,
        block: args.block,
        d_model: args.d_model,
        layers: args.layers,
        heads: args.heads,
    };
    let shape = [cfg.vocab, cfg.block, cfg.d_model, cfg.layers, cfg.heads];
    // Built directly in the precision's parameter dtype: a bf16-true model never exists in
    // float32.
    let mut vs = fabric.init_module()?;
    let gpt = model::Gpt::new(&vs.root(), cfg);
    let mut opt = FusedAdamW::new(&vs, args.lr)?.eps(args.eps);
    if args.stochastic_rounding {
        opt = opt.stochastic_rounding(args.seed);
    }
    if args.kahan {
        opt = opt.kahan_summation(true);
    }
    let (model, mut opt) = fabric.setup(gpt, &mut vs, opt)?;

    let ids = Tensor::from_slice(&corpus.ids);
    let n = corpus.ids.len() as i64;
    let n_train = n * 9 / 10;
    let ckpt = checkpoint_path(args, precision);

    let mut start = 0;
    let mut history = History::default();
    if args.resume {
        let p: Progress = fabric.load(&ckpt).with_context(|| {
            format!("resuming {precision} (run without --resume to start over)")
        })?;
        if p.fingerprint != corpus.fingerprint || p.shape != shape {
            bail!(
                "{} was trained on other data or another model shape; run without --resume",
                ckpt.display()
            );
        }
        // Saving this run's end would label later weights with an earlier step.
        if p.step > args.steps {
            bail!(
                "{} is at step {}, past --steps {}: ask for at least {} steps, or run without \
                 --resume to start over",
                ckpt.display(),
                p.step,
                args.steps,
                p.step
            );
        }
        start = p.step;
        history = p.history;
        if lead {
            eprintln!(
                "resuming {precision} at step {start} from {}",
                ckpt.display()
            );
        }
    }

    if lead {
        // What the Fabric decided (the precision as run, autocast, scaler): one line per run.
        eprintln!("{fabric}");
    }
    let bar = if lead {
        ProgressBar::new(args.steps as u64)
    } else {
        ProgressBar::hidden()
    }
    .with_position(start as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(if world > 1 {
        format!("{} x{world}", label(args, precision))
    } else {
        label(args, precision)
    });
    let tokens_per_step = (args.batch * args.block) as f64;
    let mut timed = Vec::new();
    let mut run_peak = 0;
    let mut val_at = Vec::new();
    let mut breakdown = None;
    let save = |step: usize, history: &History| -> Result<()> {
        fabric.save(
            &ckpt,
            &Progress {
                step,
                history: history.clone(),
                fingerprint: corpus.fingerprint,
                shape,
            },
        )?;
        Ok(())
    };

    for step in start..args.steps {
        // Every rank stops at the same step, or the others would wait for it in a collective.
        let stopping = if world > 1 {
            let flag = Tensor::from(i64::from(stop.load(Ordering::SeqCst)));
            fabric.all_reduce(&flag, ReduceOp::Max)?;
            flag.f_int64_value(&[])? != 0
        } else {
            stop.load(Ordering::SeqCst)
        };
        if stopping {
            save(step, &history)?;
            bar.abandon_with_message(format!(
                "stopped; checkpoint {} (continue with --resume)",
                ckpt.display()
            ));
            return Ok(ExitCode::from(130));
        }
        let t0 = Instant::now();
        let (x, y) = batch(&ids, n_train, args, step, device);
        let (x, y) = if world > 1 {
            (x.index_select(0, &shard), y.index_select(0, &shard))
        } else {
            (x, y)
        };
        opt.zero_grad()?;
        let last = step + 1 == args.steps;
        if last {
            // The last step is measured on its own: where its memory goes.
            run_peak = fabric.memory_stats()?.peak_bytes;
            tch_fabric::reset_peak_memory_stats(device)?;
        }
        let loss = loss_of(&fabric, &model, &x, &y)?;
        fabric.backward(&loss)?;
        let _norm = fabric.clip_gradients(&mut opt, tch_fabric::Clip::norm(1.0))?;
        let outcome = opt.step()?;
        if last {
            breakdown = Some(fabric.memory_report(&model, &opt)?);
        }
        // The loss of the whole global batch: the mean of the ranks' shard losses.
        let l = if world > 1 {
            let mean = loss.f_detach_copy()?;
            fabric.all_reduce(&mean, ReduceOp::Mean)?;
            mean.f_double_value(&[])?
        } else {
            loss.f_double_value(&[])?
        };
        let dt = t0.elapsed().as_secs_f64();
        history.losses.push(l);
        history.step_s.push(dt);
        if step >= start + 3 {
            timed.push(dt);
        }
        let skipped = if let StepOutcome::Skipped { .. } = outcome {
            history.skipped_at.push(step);
            " (skipped)"
        } else {
            ""
        };
        bar.set_message(format!(
            "loss {l:.3} | {:.1}k tok/s | scale {}{skipped}",
            tokens_per_step / dt / 1e3,
            fabric.loss_scale()?
        ));
        bar.inc(1);
        if args.eval_at.contains(&(step + 1)) {
            val_at.push((step + 1, validate(&fabric, &model, &ids, n_train, args)?));
        }
        if (step + 1) % args.checkpoint_every == 0 {
            save(step + 1, &history)?;
        }
    }
    bar.finish();
    // A run resumed at its last step trained nothing: its checkpoint is already the end.
    if start < args.steps {
        save(args.steps, &history)?;
    }

    let val_loss = validate(&fabric, &model, &ids, n_train, args)?;

    timed.sort_by(f64::total_cmp);
    let median = timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN);
    let losses = &history.losses;
    let tail = &losses[losses.len().saturating_sub(10)..];
    let memory = fabric.memory_stats()?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let part = |f: fn(&tch_fabric::memory::MemoryReport) -> u64| {
        breakdown.as_ref().map_or(f64::NAN, |r| mib(f(r)))
    };
    let report = Report {
        precision: label(args, precision),
        // The mean of the last ten losses; NaN once the run diverged.
        train_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        losses: history.losses.clone(),
        step_s: history.step_s,
        skipped_at: history.skipped_at,
        val_loss,
        ms_per_step: median * 1e3,
        tokens_per_s: tokens_per_step / median,
        peak_mib: mib(memory.peak_bytes.max(run_peak)),
        memory_source: memory.source.to_string(),
        params_mib: part(|r| r.parameters_bytes),
        grads_mib: part(|r| r.gradients_bytes),
        optimizer_mib: part(|r| r.optimizer_state_bytes),
        activations_mib: part(|r| r.activations_bytes),
        skipped: fabric.skipped_steps()?,
        loss_scale: fabric.loss_scale()?,
        steps: args.steps,
        val_at,
    };
    if !lead {
        return Ok(ExitCode::SUCCESS);
    }
    match &args.report {
        Some(path) => std::fs::write(path, serde_json::to_string(&report)?)
            .with_context(|| format!("writing {}", path.display()))?,
        None => print_table(device, &[report]),
    }
    Ok(ExitCode::SUCCESS)
}

fn compare(args: &Args) -> Result<ExitCode> {
    // The children get Ctrl-C too and save their checkpoints; the parent only stops.
    let stop = prepare(args)?;
    let exe = std::env::current_exe().context("finding the demo's own executable")?;
    let device = Device::cuda_if_available();
    let mut reports = Vec::new();
    // Every precision, then bf16-true again with stochastic rounding (what it adds to bf16-true
    // is the point of the row).
    let runs = compared()
        .into_iter()
        .map(|p| (p, false))
        .chain([(Precision::Bf16True, true)]);
    for (precision, rounding) in runs {
        let name = if rounding { "-stochastic-rounding" } else { "" };
        let report_path = args.out.join(format!("{precision}{name}.report.json"));
        let _ = std::fs::remove_file(&report_path);
        let mut cmd = Command::new(&exe);
        cmd.arg("--precision").arg(precision.to_string());
        if rounding {
            cmd.arg("--stochastic-rounding");
        }
        cmd.arg("--report").arg(&report_path);
        for (flag, value) in [
            ("--steps", args.steps.to_string()),
            ("--batch", args.batch.to_string()),
            ("--block", args.block.to_string()),
            ("--d-model", args.d_model.to_string()),
            ("--layers", args.layers.to_string()),
            ("--heads", args.heads.to_string()),
            ("--lr", args.lr.to_string()),
            ("--eps", args.eps.to_string()),
            ("--seed", args.seed.to_string()),
            ("--checkpoint-every", args.checkpoint_every.to_string()),
            ("--devices", args.devices.to_string()),
        ] {
            cmd.arg(flag).arg(value);
        }
        cmd.arg("--out").arg(&args.out);
        if let Some(d) = &args.data {
            cmd.arg("--data").arg(d);
        }
        if args.resume {
            cmd.arg("--resume");
        }
        let status = cmd.status().context("starting a child run")?;
        if status.code() == Some(130) || stop.load(Ordering::SeqCst) {
            eprintln!("stopped; continue with --resume");
            return Ok(ExitCode::from(130));
        }
        if !status.success() {
            bail!("the {precision} run failed ({status})");
        }
        let text = std::fs::read_to_string(&report_path)
            .with_context(|| format!("reading {}", report_path.display()))?;
        reports.push(serde_json::from_str::<Report>(&text)?);
    }
    print_table(device, &reports);
    let chart = args.out.join("compare.svg");
    chart::write(&chart, &reports)?;
    println!("\nchart: {}", chart.display());
    Ok(ExitCode::SUCCESS)
}

fn print_table(device: Device, reports: &[Report]) {
    let diverged: Vec<&str> = reports
        .iter()
        .filter(|r| !r.train_loss.is_finite())
        .map(|r| r.precision.as_str())
        .collect();
    let machine = Machine::detect(device);
    println!("\n{}", machine.describe());
    if let Some(caveat) = machine.caveat().filter(|_| !device.is_cuda()) {
        println!("{caveat}");
    }
    let base = reports.iter().find(|r| r.precision == "32-true");
    let ratio = |v: f64, of: fn(&Report) -> f64| {
        base.map_or(String::from("-"), |b| format!("{:.2}x", v / of(b)))
    };
    println!();
    println!("| precision | train loss | val loss | ms/step | tokens/s | vs 32-true | skipped steps | loss scale |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in reports {
        println!(
            "| {} | {:.4} | {:.4} | {:.1} | {:.0} | {} | {} | {} |",
            r.precision,
            r.train_loss,
            r.val_loss,
            r.ms_per_step,
            r.tokens_per_s,
            ratio(r.tokens_per_s, |b| b.tokens_per_s),
            r.skipped,
            r.loss_scale
        );
    }
    let source = reports
        .first()
        .map(|r| r.memory_source.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("not measured");
    println!("\nMemory in MiB ({source}); the parts are those of the last step.\n");
    println!("| precision | peak | vs 32-true | parameters | gradients | optimizer state | activations (step peak) |");
    println!("|---|---|---|---|---|---|---|");
    for r in reports {
        println!(
            "| {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.precision,
            r.peak_mib,
            ratio(r.peak_mib, |b| b.peak_mib),
            r.params_mib,
            r.grads_mib,
            r.optimizer_mib,
            r.activations_mib
        );
    }
    if !diverged.is_empty() {
        println!(
            "\n{} diverged (NaN loss). Without a loss scaler, float16 gradients and float16 Adam \
             state underflow; 16-mixed avoids it, or try --eps 1e-4.",
            diverged.join(", ")
        );
    }
}

//! Karpathy's nanoGPT (`model.py` and `train.py`) ported to tch-fabric, line for line where
//! the two differ only in language: the GPT with its weight tying, AdamW with two param groups
//! (weight decay for matrices only), the warm-up + cosine rate set by hand every iteration on
//! every group, gradient accumulation under `no_backward_sync`, clipping, the GradScaler under
//! `16-mixed`, and `ckpt.pt` checkpoints with `model_args`, `iter_num`, `best_val_loss` and
//! `config` that nanoGPT's own `train.py` resumes from, and that this resumes from.
//!
//! ```sh
//! cargo run --release --example nanogpt -- --precision bf16-mixed --max-iters 50
//! cargo run --release --example nanogpt -- --precision bf16-mixed --max-iters 100 --resume
//! ```
//!
//! `tests/nanogpt.rs` runs it against `scripts/nanogpt_reference.py` (nanoGPT's model and loop
//! in plain PyTorch) on the same weights and batches: the same loss bits in 32-true,
//! bf16-mixed and 16-mixed, and resumes both ways.
use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};
use tch_fabric::optim::Group;
use tch_fabric::{checkpoint, AdamW, Clip, Fabric, FabricModule, GradScalerConfig};

/// nanoGPT's `model_args`, saved in every checkpoint (a resume builds the model from them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelArgs {
    pub n_layer: i64,
    pub n_head: i64,
    pub n_embd: i64,
    pub block_size: i64,
    pub bias: bool,
    pub vocab_size: i64,
    pub dropout: f64,
}

/// nanoGPT's `LayerNorm`: a bias only when `bias`.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl LayerNorm {
    fn new(p: nn::Path, n: i64, bias: bool) -> LayerNorm {
        LayerNorm {
            weight: p.var("weight", &[n], Init::Const(1.0)),
            bias: bias.then(|| p.var("bias", &[n], Init::Const(0.0))),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.weight.size();
        x.layer_norm(&n, Some(&self.weight), self.bias.as_ref(), 1e-5, true)
    }
}

/// nanoGPT's `Block`: causal self-attention and an MLP, each after a LayerNorm.
#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: nn::Linear,
    attn_c_proj: nn::Linear,
    ln_2: LayerNorm,
    c_fc: nn::Linear,
    mlp_c_proj: nn::Linear,
    n_head: i64,
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool, std: f64) -> nn::Linear {
    let c = nn::LinearConfig {
        ws_init: Init::Randn {
            mean: 0.0,
            stdev: std,
        },
        bs_init: Some(Init::Const(0.0)),
        bias,
    };
    nn::linear(p, i, o, c)
}

impl Block {
    fn new(p: nn::Path, a: &ModelArgs) -> Block {
        let (d, b) = (a.n_embd, a.bias);
        // nanoGPT's special scaled init of the residual projections.
        let proj_std = 0.02 / (2.0 * a.n_layer as f64).sqrt();
        Block {
            ln_1: LayerNorm::new(&p / "ln_1", d, b),
            c_attn: linear(&p / "attn" / "c_attn", d, 3 * d, b, 0.02),
            attn_c_proj: linear(&p / "attn" / "c_proj", d, d, b, proj_std),
            ln_2: LayerNorm::new(&p / "ln_2", d, b),
            c_fc: linear(&p / "mlp" / "c_fc", d, 4 * d, b, 0.02),
            mlp_c_proj: linear(&p / "mlp" / "c_proj", 4 * d, d, b, proj_std),
            n_head: a.n_head,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, c) = x.size3().expect("[batch, time, n_embd]");
        let heads: Vec<Tensor> = self
            .ln_1
            .forward(x)
            .apply(&self.c_attn)
            .split(c, 2)
            .into_iter()
            .map(|z| z.view([b, t, self.n_head, c / self.n_head]).transpose(1, 2))
            .collect();
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &heads[0], &heads[1], &heads[2], None, 0.0, true, None, false,
        );
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        let x = x + y.apply(&self.attn_c_proj);
        let m = self
            .ln_2
            .forward(&x)
            .apply(&self.c_fc)
            .gelu("none")
            .apply(&self.mlp_c_proj);
        x + m
    }
}

/// nanoGPT's `GPT`, with its state_dict names (`transformer.wte.weight`, ...) and its weight
/// tying: `lm_head.weight` is `transformer.wte.weight`, one parameter under both names.
#[derive(Debug)]
pub struct Gpt {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt {
    pub fn new(p: &nn::Path, a: &ModelArgs) -> Gpt {
        let t = p / "transformer";
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let wte = (&t / "wte").var("weight", &[a.vocab_size, a.n_embd], normal);
        let wpe = (&t / "wpe").var("weight", &[a.block_size, a.n_embd], normal);
        let h = (0..a.n_layer)
            .map(|i| Block::new(&t / "h" / i, a))
            .collect();
        let ln_f = LayerNorm::new(&t / "ln_f", a.n_embd, a.bias);
        // `self.transformer.wte.weight = self.lm_head.weight`: the second name of one tensor.
        let _ = (p / "lm_head").add("weight", wte.shallow_clone(), false);
        Gpt { wte, wpe, h, ln_f }
    }

    /// Logits, and the loss when `targets` are given (`ignore_index=-1`), as nanoGPT's forward.
    pub fn forward(&self, idx: &Tensor, targets: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        let t = idx.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
        let tok_emb = Tensor::embedding(&self.wte, idx, -1, false, false);
        let pos_emb = Tensor::embedding(&self.wpe, &pos, -1, false, false);
        // Dropout 0 (nanoGPT's default for small runs) is the identity: left out.
        let mut x = tok_emb + pos_emb;
        for block in &self.h {
            x = block.forward(&x);
        }
        let x = self.ln_f.forward(&x);
        let logits = x.linear::<Tensor>(&self.wte, None);
        let loss = targets.map(|y| {
            let v = logits.size()[2];
            logits.view([-1, v]).cross_entropy_loss::<Tensor>(
                &y.view([-1]),
                None,
                tch::Reduction::Mean,
                -1,
                0.0,
            )
        });
        (logits, loss)
    }
}

/// The command line: nanoGPT's `train.py` configuration, small by default.
#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
pub struct Args {
    /// Lightning's precision: 32-true, bf16-mixed or 16-mixed (float16 autocast and a
    /// GradScaler, on CPU too).
    #[arg(long, default_value = "bf16-mixed")]
    pub precision: String,
    /// Where ckpt.pt goes.
    #[arg(long, default_value = "out-nanogpt")]
    pub out_dir: PathBuf,
    /// Iterations to train up to (a resumed run continues from its iter_num).
    #[arg(long, default_value_t = 30)]
    pub max_iters: i64,
    /// Save ckpt.pt when iter_num reaches this (instead of at the end).
    #[arg(long)]
    pub save_at: Option<i64>,
    /// nanoGPT's `init_from = 'resume'`: model_args, weights, optimizer and iter_num from
    /// out_dir/ckpt.pt.
    #[arg(long)]
    pub resume: bool,
    /// Start from these weights (a torch.save file with a "model" entry) instead of a fresh
    /// initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// The data and batches: a safetensors file with "data" (int64 tokens) and "offsets"
    /// (int64 [iterations, micro-steps, batch], where each row of a batch starts). Without
    /// it, a synthetic corpus and seeded offsets.
    #[arg(long)]
    pub batches: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: i64,
    #[arg(long, default_value_t = 2)]
    pub gradient_accumulation_steps: i64,
    #[arg(long, default_value_t = 32)]
    pub block_size: i64,
    #[arg(long, default_value_t = 2)]
    pub n_layer: i64,
    #[arg(long, default_value_t = 2)]
    pub n_head: i64,
    #[arg(long, default_value_t = 32)]
    pub n_embd: i64,
    #[arg(long, default_value_t = 65)]
    pub vocab_size: i64,
    #[arg(long)]
    pub bias: bool,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 5)]
    pub warmup_iters: i64,
    #[arg(long, default_value_t = 30)]
    pub lr_decay_iters: i64,
    #[arg(long, default_value_t = 1e-4)]
    pub min_lr: f64,
}

/// What a checkpoint holds besides the model and optimizer: nanoGPT's own entries.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    model_args: ModelArgs,
    iter_num: i64,
    best_val_loss: f64,
    config: Value,
}

/// nanoGPT's `get_lr`: linear warm-up, cosine decay to `min_lr`, then `min_lr`.
pub fn get_lr(a: &Args, it: i64) -> f64 {
    if it < a.warmup_iters {
        return a.learning_rate * (it + 1) as f64 / (a.warmup_iters + 1) as f64;
    }
    if it > a.lr_decay_iters {
        return a.min_lr;
    }
    let decay_ratio = (it - a.warmup_iters) as f64 / (a.lr_decay_iters - a.warmup_iters) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
    a.min_lr + coeff * (a.learning_rate - a.min_lr)
}

/// The token stream and where each batch row starts.
struct Batches {
    data: Tensor,
    offsets: Tensor,
}

impl Batches {
    fn load(a: &Args) -> Result<Batches> {
        match &a.batches {
            Some(path) => {
                let mut t: std::collections::HashMap<String, Tensor> =
                    Tensor::read_safetensors(path)?.into_iter().collect();
                let data = t.remove("data").context("no 'data' in the batches file")?;
                let offsets = t.remove("offsets").context("no 'offsets'")?;
                Ok(Batches { data, offsets })
            }
            None => {
                // A synthetic corpus: a walk over the vocabulary with a few patterns to learn.
                let n = 20_000;
                let i = Tensor::arange(n, (Kind::Int64, Device::Cpu));
                let data = (&i * 7 + i.divide_scalar_mode(13, "floor")).remainder(a.vocab_size);
                tch::manual_seed(1337);
                let shape = [a.max_iters, a.gradient_accumulation_steps, a.batch_size];
                let offsets =
                    Tensor::randint(n - a.block_size - 1, shape, (Kind::Int64, Device::Cpu));
                Ok(Batches { data, offsets })
            }
        }
    }

    /// nanoGPT's `get_batch`: rows of `block` tokens and the same rows one token on.
    fn get(&self, it: i64, micro: i64, block: i64) -> Result<(Tensor, Tensor)> {
        let starts: Vec<i64> = Vec::try_from(self.offsets.get(it).get(micro))?;
        let rows = |shift: i64| -> Vec<Tensor> {
            starts
                .iter()
                .map(|&o| self.data.narrow(0, o + shift, block))
                .collect()
        };
        Ok((Tensor::stack(&rows(0), 0), Tensor::stack(&rows(1), 0)))
    }
}

/// What a run did: every micro-step's loss (after the division by the accumulation steps),
/// and the model's variables at the end.
pub struct Trained {
    pub losses: Vec<f64>,
    pub weights: Vec<(String, Tensor)>,
}

/// nanoGPT's `train.py` main loop.
pub fn train(a: &Args) -> Result<Trained> {
    std::fs::create_dir_all(&a.out_dir)?;
    let ckpt = a.out_dir.join("ckpt.pt");
    let mut builder = Fabric::builder().precision(a.precision.as_str());
    if a.precision == "16-mixed" {
        // Real float16 on CPU too, and PyTorch's GradScaler defaults, as nanoGPT's.
        builder = builder
            .cpu_fp16_autocast(true)
            .grad_scaler(GradScalerConfig::default());
    }
    let fabric = builder.build()?;

    // init_from: a resume builds the model from the checkpoint's own model_args.
    let default_args = ModelArgs {
        n_layer: a.n_layer,
        n_head: a.n_head,
        n_embd: a.n_embd,
        block_size: a.block_size,
        bias: a.bias,
        vocab_size: a.vocab_size,
        dropout: 0.0,
    };
    let model_args = if a.resume {
        checkpoint::inspect(&ckpt)?.get(&ckpt, "model_args")?
    } else {
        default_args
    };
    let mut vs = nn::VarStore::new(fabric.device());
    let gpt = Gpt::new(&vs.root(), &model_args);
    let model = fabric.setup_module(gpt, &mut vs)?;
    if let Some(init) = &a.init {
        // Weights only: no optimizer or GradScaler state yet, every weight there.
        let (_, report) = fabric.load_non_strict::<Value>(init)?;
        ensure!(
            report.missing_keys.is_empty() && report.unexpected_keys.is_empty(),
            "{} does not fit the model: {report:?}",
            init.display()
        );
    }
    // configure_optimizers: weight decay for every parameter of two or more dimensions.
    let optimizer = AdamW::new(&vs, a.learning_rate)?
        .betas(a.beta1, a.beta2)
        .param_groups([
            Group::matching(|_, t| t.dim() >= 2).weight_decay(a.weight_decay),
            Group::rest().weight_decay(0.0),
        ])?;
    let mut optimizer = fabric.setup_optimizers(optimizer)?;
    let mut iter_num = 0;
    let mut best_val_loss = 1e9;
    if a.resume {
        // nanoGPT's checkpoints hold no GradScaler state: a 16-mixed resume keeps a fresh
        // scale, as nanoGPT's does, and nothing else may be missing.
        let (meta, report) = fabric.load_non_strict::<Meta>(&ckpt)?;
        ensure!(
            report.missing_keys.is_empty()
                && report.unexpected_keys.is_empty()
                && report.missing_state.iter().all(|s| s == "scaler"),
            "{} does not fit the model: {report:?}",
            ckpt.display()
        );
        iter_num = meta.iter_num;
        best_val_loss = meta.best_val_loss;
    }

    let batches = Batches::load(a)?;
    let accum = a.gradient_accumulation_steps;
    let mut losses = Vec::new();
    while iter_num < a.max_iters {
        if Some(iter_num) == a.save_at {
            save(&fabric, &ckpt, &model_args, iter_num, best_val_loss, a)?;
        }
        let lr = get_lr(a, iter_num);
        optimizer.set_lr(lr)?;
        let mut last = 0.0;
        for micro in 0..accum {
            let (x, y) = batches.get(iter_num, micro, model_args.block_size)?;
            // DDP: the gradients are averaged on the last micro-step only.
            let _sync = fabric.no_backward_sync(&model, micro + 1 < accum)?;
            let (_logits, loss) = run(&model, &x, &y)?;
            let loss = loss / accum as f64;
            fabric.backward(&loss)?;
            last = loss.double_value(&[]);
            losses.push(last);
        }
        // nanoGPT clips `model.parameters()`: the norms summed in the model's order.
        let clip = Clip::norm(a.grad_clip).model_order(true);
        fabric.clip_gradients(&mut optimizer, clip)?;
        optimizer.step()?;
        optimizer.zero_grad()?;
        best_val_loss = best_val_loss.min(last * accum as f64);
        iter_num += 1;
    }
    if a.save_at.is_none() {
        save(&fabric, &ckpt, &model_args, iter_num, best_val_loss, a)?;
    }
    let mut weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    weights.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(Trained { losses, weights })
}

/// The forward and loss under the precision's scope, as nanoGPT's `with ctx:`.
fn run(model: &FabricModule<Gpt>, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
    let (logits, loss) = model.run((x, y), |m, (x, y)| m.forward(&x, Some(&y)))?;
    Ok((logits, loss.context("a loss")?))
}

/// nanoGPT's checkpoint: `{'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss',
/// 'config'}` (the Fabric adds the GradScaler's state under 16-mixed).
fn save(
    fabric: &Fabric,
    path: &Path,
    model_args: &ModelArgs,
    iter_num: i64,
    best_val_loss: f64,
    a: &Args,
) -> Result<()> {
    let meta = Meta {
        model_args: *model_args,
        iter_num,
        best_val_loss,
        config: serde_json::to_value(a)?,
    };
    fabric.save(path, &meta)?;
    Ok(())
}

#[allow(dead_code)] // the tests include this file for `train`, not for `main`
fn main() -> Result<()> {
    let a = Args::parse();
    let t0 = std::time::Instant::now();
    let run = train(&a)?;
    let accum = a.gradient_accumulation_steps as usize;
    for (i, chunk) in run.losses.chunks(accum).enumerate() {
        if i % 10 == 0 {
            let loss: f64 = chunk.iter().sum();
            println!("step {i}: loss {loss:.4}");
        }
    }
    println!(
        "{} iterations in {:.1?}; checkpoint in {}",
        run.losses.len() / accum.max(1),
        t0.elapsed(),
        a.out_dir.join("ckpt.pt").display()
    );
    Ok(())
}

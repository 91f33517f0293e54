//! A small causal transformer language model (GPT-style, pre-norm).
use tch::{nn, nn::Module, Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub vocab: i64,
    pub block: i64,
    pub d_model: i64,
    pub layers: i64,
    pub heads: i64,
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(p: nn::Path, d: i64, heads: i64) -> Block {
        let lin = |name: &str, i, o| nn::linear(&p / name, i, o, Default::default());
        Block {
            ln1: nn::layer_norm(&p / "ln1", vec![d], Default::default()),
            qkv: lin("qkv", d, 3 * d),
            proj: lin("proj", d, d),
            ln2: nn::layer_norm(&p / "ln2", vec![d], Default::default()),
            fc: lin("fc", d, 4 * d),
            fc2: lin("fc2", 4 * d, d),
            heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().expect("[batch, time, d_model]");
        let hd = d / self.heads;
        // `split`, as the Python model does: its backward concatenates the three gradients,
        // where three `narrow`s would each scatter theirs into a zero tensor of qkv's size
        // and add the three up (profiled: 9 extra zero-filled tensors and adds per step).
        let heads: Vec<Tensor> = x
            .apply(&self.ln1)
            .apply(&self.qkv)
            .split(d, 2)
            .into_iter()
            .map(|z| z.view([b, t, self.heads, hd]).transpose(1, 2))
            .collect();
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &heads[0], &heads[1], &heads[2], None, 0.0, true, None, false,
        );
        let x = x + y
            .transpose(1, 2)
            .contiguous()
            .view([b, t, d])
            .apply(&self.proj);
        let m = x
            .apply(&self.ln2)
            .apply(&self.fc)
            .gelu("none")
            .apply(&self.fc2);
        x + m
    }
}

#[derive(Debug)]
pub struct Gpt {
    tok: nn::Embedding,
    pos: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: nn::Linear,
}

impl Gpt {
    pub fn new(p: &nn::Path, c: Config) -> Gpt {
        Gpt {
            tok: nn::embedding(p / "tok", c.vocab, c.d_model, Default::default()),
            pos: nn::embedding(p / "pos", c.block, c.d_model, Default::default()),
            blocks: (0..c.layers)
                .map(|i| Block::new(p / format!("h{i}"), c.d_model, c.heads))
                .collect(),
            ln_f: nn::layer_norm(p / "ln_f", vec![c.d_model], Default::default()),
            head: nn::linear(p / "head", c.d_model, c.vocab, Default::default()),
        }
    }
}

impl Module for Gpt {
    /// Token ids [batch, time] to logits [batch, time, vocab].
    fn forward(&self, ids: &Tensor) -> Tensor {
        let t = ids.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let mut h = ids.apply(&self.tok) + pos.apply(&self.pos);
        for b in &self.blocks {
            h = b.forward(&h);
        }
        h.apply(&self.ln_f).apply(&self.head)
    }
}

"""The reference for tests/nanogpt.rs: Karpathy's nanoGPT (model.py, and train.py's loop) in
plain PyTorch, on the weights and batches the test gives, so that examples/nanogpt.rs can be
compared with it bit for bit.

The model is nanoGPT's (LayerNorm with optional bias, fused qkv projection, flash attention,
GELU MLP, weight tying of lm_head and wte, its initialisation); the loop is train.py's: the
learning rate set on every param group each iteration (warm-up then cosine), gradient
accumulation, `scaler.unscale_` + `clip_grad_norm_(model.parameters())`, AdamW with nanoGPT's
two param groups, and checkpoints `{model, optimizer, model_args, iter_num, best_val_loss,
config}`. Two changes, both for running on a CPU: the forward runs under
`torch.autocast("cpu", dtype)` for bf16-mixed and 16-mixed (nanoGPT uses a nullcontext on CPU),
and a resume loads a checkpoint's GradScaler state when it has one (nanoGPT's checkpoints have
none, tch-fabric's 16-mixed ones do). Dropout is 0, as in nanoGPT's small configurations
(F.dropout with p=0 is the identity on CPU).

    .venv/bin/python scripts/nanogpt_reference.py < config.json

config.json: {"mode": "init" | "train", "args": {the example's options: precision, out_dir,
max_iters, save_at, resume, init, batches, batch_size, gradient_accumulation_steps, block_size,
n_layer, n_head, n_embd, vocab_size, bias, learning_rate, weight_decay, beta1, beta2,
grad_clip, warmup_iters, lr_decay_iters, min_lr}, "weights_out": PATH}. "init" writes the
initial weights to args.init ({"model": state_dict}, seed 1337); "train" trains and prints
{"losses": [bits of each micro-step's float64 loss]}, with the final weights (float64, by
state_dict key) in weights_out.
"""
import json
import math
import os
import struct
import sys
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
cfg = json.load(sys.stdin)
a = cfg["args"]


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c["n_embd"], 3 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(c["n_embd"], c["n_embd"], bias=c["bias"])
        self.n_head, self.n_embd = c["n_head"], c["n_embd"]

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c["n_embd"], 4 * c["n_embd"], bias=c["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c["n_embd"], c["n_embd"], bias=c["bias"])

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = LayerNorm(c["n_embd"], bias=c["bias"])
        self.attn = CausalSelfAttention(c)
        self.ln_2 = LayerNorm(c["n_embd"], bias=c["bias"])
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c["vocab_size"], c["n_embd"]),
            wpe=nn.Embedding(c["block_size"], c["n_embd"]),
            h=nn.ModuleList([Block(c) for _ in range(c["n_layer"])]),
            ln_f=LayerNorm(c["n_embd"], bias=c["bias"]),
        ))
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c["n_layer"]))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        groups = [
            {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def bits(v):
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def get_lr(it):
    if it < a["warmup_iters"]:
        return a["learning_rate"] * (it + 1) / (a["warmup_iters"] + 1)
    if it > a["lr_decay_iters"]:
        return a["min_lr"]
    decay_ratio = (it - a["warmup_iters"]) / (a["lr_decay_iters"] - a["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return a["min_lr"] + coeff * (a["learning_rate"] - a["min_lr"])


model_args = dict(n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"],
                  block_size=a["block_size"], bias=a["bias"], vocab_size=a["vocab_size"],
                  dropout=0.0)
if cfg["mode"] == "init":
    torch.manual_seed(1337)
    torch.save({"model": GPT(model_args).state_dict()}, a["init"])
    sys.exit(0)

ckpt_path = os.path.join(a["out_dir"], "ckpt.pt")
checkpoint = torch.load(ckpt_path, weights_only=True) if a["resume"] else None
if checkpoint is not None:
    model_args = dict(checkpoint["model_args"])
model = GPT(model_args)
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
else:
    model.load_state_dict(torch.load(a["init"], weights_only=True)["model"])
optimizer = model.configure_optimizers(a["weight_decay"], a["learning_rate"], (a["beta1"], a["beta2"]))
precision = a["precision"]
scaler = torch.amp.GradScaler("cpu", enabled=(precision == "16-mixed"))
dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
ctx = nullcontext() if dtype is None else torch.amp.autocast(device_type="cpu", dtype=dtype)
iter_num, best_val_loss = 0, 1e9
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    iter_num = checkpoint["iter_num"]
    best_val_loss = float(checkpoint["best_val_loss"])
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])

batches = load_file(a["batches"])
data, offsets = batches["data"], batches["offsets"]
block, accum = model_args["block_size"], a["gradient_accumulation_steps"]


def get_batch(it, micro):
    rows = offsets[it][micro].tolist()
    x = torch.stack([data[o:o + block] for o in rows])
    y = torch.stack([data[o + 1:o + 1 + block] for o in rows])
    return x, y


def save():
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_args": model_args, "iter_num": iter_num,
                "best_val_loss": torch.tensor(best_val_loss, dtype=torch.float64),
                "config": a}, ckpt_path)


os.makedirs(a["out_dir"], exist_ok=True)
losses = []
while iter_num < a["max_iters"]:
    if iter_num == a.get("save_at"):
        save()
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    last = 0.0
    for micro in range(accum):
        X, Y = get_batch(iter_num, micro)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / accum
        scaler.scale(loss).backward()
        last = loss.item()
        losses.append(bits(last))
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), a["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    best_val_loss = min(best_val_loss, last * accum)
    iter_num += 1
if a.get("save_at") is None:
    save()
save_file({k: v.double().contiguous() for k, v in model.state_dict().items()}, cfg["weights_out"])
print(json.dumps({"losses": losses}))

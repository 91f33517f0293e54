"""Reference runs for tests/torch_checkpoint.rs: a Lightning Fabric training loop with
torch.optim.AdamW() at its defaults, a warm-up + cosine schedule (SequentialLR of LinearLR and
CosineAnnealingLR) and gradient clipping, that saves a torch.save checkpoint with
`fabric.save(path, {"model", "optimizer", "scheduler", "step"})` and resumes from one with
`fabric.load`. 16-mixed runs the plain torch.autocast + GradScaler loop instead (Lightning turns
16-mixed into bf16-mixed on CPU) and saves the scaler's state_dict as "scaler".

The test runs it live (seconds), so the bits come from this machine's PyTorch:

    .venv/bin/python scripts/torch_checkpoint_reference.py < config.json

config.json: {"init": <safetensors with l1.*, l2.*, x, y>, "precision": P, "steps": N,
"save_at": K, "save": PATH or null, "resume": PATH or null, "out": PATH, "groups": bool}. With
"groups" the AdamW has nanoGPT's two param groups (weight decay 0.1 for matrices, none for
the rest); clipping goes over the optimizer's parameters group by group, as Lightning's
`fabric.clip_gradients` does. Without "resume" it
trains steps 1..N from the initial weights and saves after step K; with "resume" it loads PATH
and trains steps K+1..N. It writes the final weights (float64, keys l1.weight ...) to "out"
and prints {"losses": [bits of each float64 loss], "step": the checkpoint's step}.
"""
import json
import struct
import sys
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
cfg = json.load(sys.stdin)
init = load_file(cfg["init"])
x, y = init["x"], init["y"]
precision = cfg["precision"]


def bits(v):
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def make_model():
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    m.load_state_dict({"0.weight": init["l1.weight"], "0.bias": init["l1.bias"],
                       "2.weight": init["l2.weight"], "2.bias": init["l2.bias"]})
    return m


def make_opt(model):
    if not cfg.get("groups"):
        return torch.optim.AdamW(model.parameters())
    params = list(model.parameters())
    return torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ])


def make_schedule(opt):
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["steps"] - 5)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[5])


losses = []
first = 1
loaded_step = None
if precision == "16-mixed":
    model = make_model()
    opt = make_opt(model)
    sched = make_schedule(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    if cfg.get("resume"):
        ck = torch.load(cfg["resume"], weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        loaded_step = ck["step"]
        first = loaded_step + 1
    for step in range(first, cfg["steps"] + 1):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x.half())
        out = out.float()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(out, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        # Lightning's order: the optimizer's parameters, group by group.
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= before:
            sched.step()
        losses.append(bits(loss.item()))
        if step == cfg["save_at"] and cfg.get("save"):
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "step": step}, cfg["save"])
    final = model
else:
    import lightning as L
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    model = make_model()
    opt = make_opt(model)
    model, opt = fabric.setup(model, opt)
    sched = make_schedule(opt)
    if cfg.get("resume"):
        state = {"model": model, "optimizer": opt, "scheduler": sched}
        rest = fabric.load(cfg["resume"], state)
        loaded_step = rest["step"]
        first = loaded_step + 1
    for step in range(first, cfg["steps"] + 1):
        opt.zero_grad()
        out = model(x)
        with fabric.autocast():
            loss = F.mse_loss(out, y)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()
        sched.step()
        losses.append(bits(loss.item()))
        if step == cfg["save_at"] and cfg.get("save"):
            fabric.save(cfg["save"], {"model": model, "optimizer": opt, "scheduler": sched,
                                      "step": step})
    final = model.module
sd = final.state_dict()
save_file({"l1.weight": sd["0.weight"].double(), "l1.bias": sd["0.bias"].double(),
           "l2.weight": sd["2.weight"].double(), "l2.bias": sd["2.bias"].double()}, cfg["out"])
print(json.dumps({"losses": losses, "step": loaded_step}))

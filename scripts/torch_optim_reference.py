"""Reference runs for tests/torch_optim.rs: PyTorch's default optimizers (torch.optim.AdamW, Adam,
SGD, with foreach=False and foreach=True) training a small MLP under Lightning Fabric in each
precision, and under a plain torch.autocast + GradScaler loop for 16-mixed (Lightning turns
16-mixed into bf16-mixed on CPU).

The test runs it live (a few seconds), so the bits come from this machine's PyTorch 2.13:

    .venv/bin/python scripts/torch_optim_reference.py < config.json

config.json: {"init": <safetensors with l1.*, l2.*, x, y>, "out_dir": DIR, "steps": N,
"cases": [{"name", "precision", "optimizer", "kwargs", "foreach", "fused" (optional),
"groups" (optional)}]}. "groups" lists param groups as {"select": "matrices" | "rest", ...the
group's own options}: "matrices" takes the parameters with dim >= 2 (nanoGPT's rule), "rest"
every parameter no earlier group took; with "fused" the optimizer runs fused=True (no
foreach). For every case it writes
DIR/<name>.safetensors (the final weights as float64, keys l1.weight ...) and prints one JSON
object {name: {"losses": [bits of each float64 loss], "stepped": [...]}}.
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


def make_model():
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    m.load_state_dict({"0.weight": init["l1.weight"], "0.bias": init["l1.bias"],
                       "2.weight": init["l2.weight"], "2.bias": init["l2.bias"]})
    return m


def with_tuples(options):
    options = dict(options)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return options


def make_opt(case, model):
    kwargs = with_tuples(case["kwargs"])
    params = list(model.parameters())
    if case.get("groups"):
        groups, taken = [], set()
        for g in case["groups"]:
            g = with_tuples(g)
            rule = g.pop("select")
            ps = [p for p in model.parameters()
                  if id(p) not in taken and (rule == "rest" or p.dim() >= 2)]
            taken.update(id(p) for p in ps)
            groups.append({"params": ps, **g})
        params = groups
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}[case["optimizer"]]
    if case.get("fused"):
        return cls(params, fused=True, **kwargs)
    return cls(params, foreach=case["foreach"], **kwargs)


def steps_of(opt):
    st = [s for s in opt.state.values() if "step" in s]
    return st[0]["step"].item() if st else None


def run_lightning(case):
    import lightning as L
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=case["precision"])
    model = make_model()
    opt = make_opt(case, model)
    model, opt = fabric.setup(model, opt)
    losses = []
    for _ in range(cfg["steps"]):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        fabric.backward(loss)
        opt.step()
        losses.append(loss.item())
    return model.module if hasattr(model, "module") else model, losses, [True] * cfg["steps"]


def run_16_mixed(case):
    # What tch-fabric's 16-mixed does on CPU with cpu_fp16_autocast: input cast to float16,
    # forward under autocast(float16), output cast back to float32, GradScaler.
    model = make_model()
    opt = make_opt(case, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=4)
    losses, stepped = [], []
    for _ in range(cfg["steps"]):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x.half())
        out = out.float()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(out, y)
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        stepped.append(scaler.get_scale() >= before)
    return model, losses, stepped


out = {}
for case in cfg["cases"]:
    runner = run_16_mixed if case["precision"] == "16-mixed" else run_lightning
    model, losses, stepped = runner(case)
    sd = model.state_dict()
    save_file({"l1.weight": sd["0.weight"].double(), "l1.bias": sd["0.bias"].double(),
               "l2.weight": sd["2.weight"].double(), "l2.bias": sd["2.bias"].double()},
              f"{cfg['out_dir']}/{case['name']}.safetensors")
    # Losses as the bits of their float64 value, so nothing is lost in JSON.
    bits = [struct.unpack("<Q", struct.pack("<d", v))[0] for v in losses]
    out[case["name"]] = {"losses": bits, "stepped": stepped}
print(json.dumps(out))

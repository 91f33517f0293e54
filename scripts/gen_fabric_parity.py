"""Reference data for tests/fabric_parity.rs, produced by Lightning Fabric 2.6 and PyTorch 2.13 themselves.

tests/fabric_parity.rs runs it at its start (about 10 s), into a temporary folder:

    .venv/bin/python scripts/gen_fabric_parity.py DIR

It writes DIR/fabric_parity.json (the index) and DIR/fabric_parity/*.safetensors. The data is
made afresh on every run because float32 matmul kernels round differently on different CPUs
(AVX-512/AMX against AVX2): bits stored on one machine do not hold on another.

Two models (an MLP and a small attention block) are trained for 50 full-batch AdamW steps
(lr=1e-2, fused=True: the kernel FusedAdamW runs; other arguments default) from fixed initial weights on fixed data:

- runner "lightning": lightning.fabric.Fabric on CPU in 32-true, 64-true, bf16-mixed, bf16-true
  and 16-true, with and without fabric.clip_gradients(max_norm=1.0).
- runner "torch-gradscaler": "16-mixed" on CPU. Lightning itself turns 16-mixed into bf16-mixed on
  CPU, so this is a plain PyTorch loop doing what Fabric's 16-mixed plugin does (input cast to
  float16, forward under torch.autocast(float16), output cast back to float32, GradScaler), with
  a huge initial scale (2**40) so that the first steps overflow and are skipped.

Files in DIR/fabric_parity/ (safetensors):
  <model>_init.safetensors      the float32 state_dict every run starts from
  <model>_data.safetensors      "x" and "y" (float32)
  <model>_<precision>_<clip|noclip>_final.safetensors
                                the weights after the last step, converted to float64 (lossless
                                for every dtype used), keys as in the unwrapped module.
Non-finite floats in the JSON (norms of overflowing steps) are written as the strings "inf",
"-inf" and "nan" so the file stays standard JSON.

16-true uses AdamW(eps=1e-4): with the default eps=1e-8 the float16 moments underflow and the
clipped run diverges to NaN within a few steps, in Lightning as anywhere. Should a clipped run still meet a non-finite norm, Lightning's default
error_if_nonfinite=True raises; such a case is recorded with error_if_nonfinite=False
(tch-fabric's non-strict clip_gradients) and carries the extra keys "error_if_nonfinite": false,
"lightning_default_raised_at_step" and "lightning_default_error".
"""
import json
import math
import os
import sys

# Lightning reads LT_* variables (accelerator, devices, precision, ...); none of them may leak in.
for _k in list(os.environ):
    if _k.startswith("LT_"):
        del os.environ[_k]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import lightning  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402

# One thread: intra-op reductions (sums in matmul, mean, norms) then add in the same order on
# every machine whatever its core count, so the output is reproducible bit for bit; the Rust
# test runs with one thread too.
torch.set_num_threads(1)
torch.set_num_interop_threads(1)

if len(sys.argv) != 2:
    sys.exit("usage: gen_fabric_parity.py DIR (writes DIR/fabric_parity.json and DIR/fabric_parity/)")
DATA = sys.argv[1]
OUT_DIR = os.path.join(DATA, "fabric_parity")
INDEX = os.path.join(DATA, "fabric_parity.json")

STEPS = 50
LR = 1e-2
# The global gradient norm of these models stays below about 0.7, so max_norm=0.1 makes the
# clipping act on most steps (1.0 would never scale anything).
CLIPS = [None, 0.1]
# float16 parameters (16-true) keep Adam's moments in float16, where the default eps=1e-8 and
# small squared gradients flush to zero; the clipped run then diverges within a few steps. 16-true
# runs use eps=1e-4 (recorded in each case as "eps").
EPS = {"16-true": 1e-4}
DEFAULT_EPS = 1e-8
LIGHTNING_PRECISIONS = ["32-true", "64-true", "bf16-mixed", "bf16-true", "16-true"]
INIT_SCALE = 2.0**40
GROWTH_INTERVAL = 5


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 32)
        self.l3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.tanh(self.l1(x)))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16)
        self.o = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.ln(x)
        att = torch.softmax((self.q(h) @ self.k(h).transpose(-2, -1)) / 4.0, dim=-1)
        a = att @ self.v(h)
        x2 = x + self.o(a)
        return self.head(x2.mean(dim=1))


MODELS = {"mlp": (MLP, (64, 16), (64, 4)), "block": (Block, (8, 6, 16), (8, 4))}


def path(name):
    return os.path.join(OUT_DIR, name)


def write_init_and_data(name):
    cls, x_shape, y_shape = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    init = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(init, path(f"{name}_init.safetensors"))
    torch.manual_seed(1)
    x = torch.randn(*x_shape)
    y = torch.randn(*y_shape)
    save_file({"x": x.contiguous(), "y": y.contiguous()}, path(f"{name}_data.safetensors"))


def fresh(name):
    """A new model holding the saved initial weights, and the data."""
    cls = MODELS[name][0]
    model = cls()
    model.load_state_dict(load_file(path(f"{name}_init.safetensors")))
    data = load_file(path(f"{name}_data.safetensors"))
    return model, data["x"], data["y"]


def save_final(module, file_name):
    out = {}
    for k, v in module.state_dict().items():
        if k.startswith("_forward_module."):
            k = k[len("_forward_module."):]
        out[k] = v.detach().double().contiguous()
    save_file(out, path(file_name))


def clip_name(clip):
    return "noclip" if clip is None else "clip"


def num(x):
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def run_lightning(name, precision, clip):
    """One Fabric run. With clipping, Lightning's default error_if_nonfinite=True raises as soon
    as a norm is inf/NaN (16-true: AdamW's eps=1e-8 is 0 in float16, the first step sends
    weights to inf); such a case is then run again with error_if_nonfinite=False, which is what
    tch-fabric's (non-strict) clip_gradients does, and the step that raised is recorded."""
    try:
        return _run_lightning(name, precision, clip, error_if_nonfinite=True)
    except _Raised as e:
        case = _run_lightning(name, precision, clip, error_if_nonfinite=False)
        assert not math.isfinite(float(case["norms"][e.step])), "the rerun must see the same non-finite norm"
        assert all(isinstance(n, float) for n in case["norms"][: e.step])
        case["error_if_nonfinite"] = False
        case["lightning_default_raised_at_step"] = e.step
        case["lightning_default_error"] = e.message
        return case


class _Raised(Exception):
    def __init__(self, step, message):
        super().__init__(message)
        self.step = step
        self.message = message


def _run_lightning(name, precision, clip, error_if_nonfinite):
    model, x, y = fresh(name)
    eps = EPS.get(precision, DEFAULT_EPS)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=eps, fused=True)
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    fmodel, fopt = fabric.setup(model, opt)
    losses, norms = [], []
    for step in range(STEPS):
        fopt.zero_grad()
        out = fmodel(x)
        with fabric.autocast():
            loss = F.mse_loss(out, y)
        fabric.backward(loss)
        if clip is not None:
            try:
                norm = fabric.clip_gradients(
                    fmodel, fopt, max_norm=clip, error_if_nonfinite=error_if_nonfinite
                )
            except RuntimeError as e:
                if "non-finite" not in str(e):
                    raise
                raise _Raised(step, str(e)) from e
            norms.append(num(norm))
        fopt.step()
        losses.append(num(loss.item()))
    final = f"{name}_{precision}_{clip_name(clip)}_final.safetensors"
    # `model` is the unwrapped module that fabric.setup converted in place.
    assert fmodel.module is model
    save_final(model, final)
    return {
        "model": name,
        "precision": precision,
        "clip_max_norm": clip,
        "runner": "lightning",
        "eps": eps,
        "losses": losses,
        "norms": norms,
        "final": final,
    }


def run_gradscaler(name, clip):
    model, x, y = fresh(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    first = next(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    losses, norms, stepped, scales = [], [], [], []
    for _ in range(STEPS):
        opt.zero_grad()
        # What Fabric's MixedPrecision("16-mixed") does around forward: convert_input to
        # float16, forward under autocast, convert_output to the default dtype (float32).
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x.to(torch.float16))
        out = out.float()
        # fabric.autocast() around the loss.
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(out, y)
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            norms.append(num(norm))
        # The fused kernel skips an overflow step itself and takes the step count back, so a
        # step was taken exactly when the count advanced.
        before = float(opt.state[first]["step"]) if opt.state else 0.0
        scaler.step(opt)
        scaler.update()
        losses.append(num(loss.item()))
        stepped.append("1" if float(opt.state[first]["step"]) > before else "0")
        scales.append(num(scaler.get_scale()))
    final = f"{name}_16-mixed_{clip_name(clip)}_final.safetensors"
    save_final(model, final)
    return {
        "model": name,
        "precision": "16-mixed",
        "clip_max_norm": clip,
        "runner": "torch-gradscaler",
        "eps": DEFAULT_EPS,
        "losses": losses,
        "norms": norms,
        "final": final,
        "init_scale": INIT_SCALE,
        "growth_interval": GROWTH_INTERVAL,
        "stepped": "".join(stepped),
        "scales": scales,
    }


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    for f in os.listdir(OUT_DIR):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(OUT_DIR, f))
    cases = []
    for name in MODELS:
        write_init_and_data(name)
        for precision in LIGHTNING_PRECISIONS:
            for clip in CLIPS:
                cases.append(run_lightning(name, precision, clip))
        for clip in CLIPS:
            cases.append(run_gradscaler(name, clip))
    index = {
        "torch_version": torch.__version__,
        "lightning_version": lightning.__version__,
        "steps": STEPS,
        "lr": LR,
        "cases": cases,
    }
    with open(INDEX, "w") as f:
        json.dump(index, f, indent=1, allow_nan=False)
        f.write("\n")
    for c in cases:
        line = f"{c['model']:5} {c['precision']:10} {clip_name(c['clip_max_norm']):6}"
        line += f" loss {c['losses'][0]!r} -> {c['losses'][-1]!r}"
        if c["norms"]:
            line += f"  norm {c['norms'][0]!r} -> {c['norms'][-1]!r}"
        if "lightning_default_raised_at_step" in c:
            line += f"  (Lightning's default clip raised at step {c['lightning_default_raised_at_step']})"
        if "stepped" in c:
            line += f"  skipped {c['stepped'].count('0')} stepped {c['stepped']}"
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()

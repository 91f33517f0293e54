"""Reference data for tests/scaler_parity.rs, produced by torch.amp.GradScaler itself.

Regenerate with:  .venv/bin/python scripts/gen_scaler_parity.py > tests/data/scaler_parity.json

- trajectories: for several configurations, 5,000 steps of a random overflow pattern (clean,
  +inf, NaN, -inf gradients); after every step+update the scale's float32 bits, the growth
  tracker and whether the optimizer stepped.
- unscale: gradients of float32 / bfloat16 / float16 holding +-0, subnormals, values near the
  dtype's max, +-inf, NaN and random bit patterns, unscaled by GradScaler for several scales;
  input bits, output bits and found_inf.
- resume: a state_dict written by Python mid-run, and the trajectory that follows it.
"""
import json
import random
import struct
import sys

import torch

STEPS = 5000
FLAG_VALUE = {0: 1.0, 1: float("inf"), 2: float("nan"), 3: float("-inf")}


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def make_scaler(cfg):
    return torch.amp.GradScaler(
        "cpu",
        init_scale=cfg["init_scale"],
        growth_factor=cfg["growth_factor"],
        backoff_factor=cfg["backoff_factor"],
        growth_interval=cfg["growth_interval"],
    )


def counted_sgd(param):
    opt = torch.optim.SGD([param], lr=0.0)
    opt.calls = 0
    plain = opt.step

    def step(*args, **kwargs):
        opt.calls += 1
        return plain(*args, **kwargs)

    opt.step = step
    return opt


def run(scaler, flags):
    """Drives scaler.step/update with one parameter whose gradient follows `flags`."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = counted_sgd(p)
    if scaler._scale is None:
        scaler.scale(torch.ones(()))
    scale_bits, tracker, stepped = [], [], []
    for f in flags:
        p.grad = torch.tensor([0.5, FLAG_VALUE[f]])
        before = opt.calls
        scaler.step(opt)
        scaler.update()
        stepped.append(opt.calls - before)
        scale_bits.append(f32_bits(scaler._scale.item()))
        tracker.append(int(scaler._growth_tracker.item()))
    return scale_bits, tracker, stepped


def trajectories(rng):
    configs = [
        dict(name="pow2", init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3, p=0.5),
        dict(name="1000", init_scale=1000.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=5, p=0.5),
        dict(name="near_float_max", init_scale=3.0e38, growth_factor=2.0, backoff_factor=0.5, growth_interval=2, p=0.2),
        dict(name="tiny", init_scale=1.0e-30, growth_factor=2.0, backoff_factor=0.5, growth_interval=4, p=0.6),
        dict(name="odd_factors", init_scale=3.0, growth_factor=3.0, backoff_factor=0.3, growth_interval=3, p=0.5),
    ]
    out = []
    for cfg in configs:
        # Alternate calm stretches (rare overflows: the scale grows) with stormy ones (frequent
        # overflows: it backs off), so the scale sweeps a wide range instead of settling.
        flags = []
        for i in range(STEPS):
            p = cfg["p"] if (i // 100) % 3 == 2 else cfg["p"] / 10
            flags.append(rng.choice([1, 2, 3]) if rng.random() < p else 0)
        scale_bits, tracker, stepped = run(make_scaler(cfg), flags)
        entry = {k: v for k, v in cfg.items() if k != "p"}
        entry.update(
            flags="".join(map(str, flags)),
            scale_bits=scale_bits,
            tracker=tracker,
            stepped="".join(map(str, stepped)),
        )
        out.append(entry)
    return out


BIT_SPECIALS = {
    # +0, -0, min subnormal, -min subnormal, max subnormal, min normal, 1, -1, max, -max,
    # max - 1ulp, 0.1, 1/3
    "float32": [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000,
                0x3F800000, 0xBF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7FFFFE, 0x3DCCCCCD, 0x3EAAAAAB],
    "float16": [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF,
                0x7BFE, 0x2E66, 0x3555],
    "bfloat16": [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F,
                 0x7F7E, 0x3DCD, 0x3EAB],
}
NONFINITE = {
    "float32": [0x7F800000, 0xFF800000, 0x7FC00000],
    "float16": [0x7C00, 0xFC00, 0x7E00],
    "bfloat16": [0x7F80, 0xFF80, 0x7FC0],
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT_VIEW = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def from_bits(bits, name):
    width = 32 if name == "float32" else 16
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in bits]
    return torch.tensor(signed, dtype=INT_VIEW[name]).view(DTYPES[name])


def to_bits(t, name):
    width = 32 if name == "float32" else 16
    return [b & ((1 << width) - 1) for b in t.view(INT_VIEW[name]).tolist()]


def random_finite_bits(rng, name, n):
    width = 32 if name == "float32" else 16
    exp_mask = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80}[name]
    out = []
    while len(out) < n:
        b = rng.getrandbits(width)
        if b & exp_mask != exp_mask:
            out.append(b)
    return out


def unscale_cases(rng):
    cases = []
    for name in ["float32", "bfloat16", "float16"]:
        for scale in [65536.0, 1000.0, 3.0, 1.0e-3, 1.0, 2.0 ** -20]:
            for kind in ["finite", "special"]:
                bits = BIT_SPECIALS[name] + random_finite_bits(rng, name, 24)
                if kind == "special":
                    bits = bits + NONFINITE[name]
                grad = from_bits(bits, name)
                p = torch.nn.Parameter(torch.zeros(len(bits), dtype=DTYPES[name]))
                opt = torch.optim.SGD([p], lr=0.0)
                scaler = torch.amp.GradScaler("cpu", init_scale=scale)
                scaler.scale(torch.ones(()))
                p.grad = grad.clone()
                if name == "float16":
                    # GradScaler refuses fp16 gradients outside the fused path; its own
                    # _unscale_grads_ with allow_fp16=True is the exact same computation.
                    inv_scale = scaler._scale.double().reciprocal().float()
                    found = torch.zeros((), dtype=torch.float32)
                    found_per_device = scaler._unscale_grads_(opt, inv_scale, found, True)
                else:
                    scaler.unscale_(opt)
                    found_per_device = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
                found_inf = sum(v.item() for v in found_per_device.values())
                cases.append(dict(dtype=name, scale=scale, input=bits, output=to_bits(p.grad, name),
                                  found_inf=found_inf))
    return cases


def resume(rng):
    cfg = dict(init_scale=1000.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=5)
    scaler = make_scaler(cfg)
    warmup = [rng.choice([1, 2]) if rng.random() < 0.2 else 0 for _ in range(37)]
    run(scaler, warmup)
    state = scaler.state_dict()
    flags = [1 if rng.random() < 0.2 else 0 for _ in range(300)]
    scale_bits, tracker, stepped = run(scaler, flags)
    return dict(state=json.loads(json.dumps(state)), flags="".join(map(str, flags)),
                scale_bits=scale_bits, tracker=tracker, stepped="".join(map(str, stepped)))


def main():
    rng = random.Random(20261128)
    data = dict(
        torch_version=torch.__version__,
        trajectories=trajectories(rng),
        unscale=unscale_cases(rng),
        resume=resume(rng),
    )
    json.dump(data, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

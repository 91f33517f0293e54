"""Asks PyTorch which dtype each op returns under CPU autocast, for tests/autocast_policy.rs.

Regenerate with:  .venv/bin/python scripts/gen_autocast_policy.py > tests/data/autocast_policy.json

Each op is built from float32 inputs unless its name says otherwise ("_low": inputs in the
autocast dtype, "_mixed": one float32 and one low input, "_f64": float64 inputs). The Rust test
builds the very same ops with tch and compares the output dtypes.
"""
import json
import sys

import torch
import torch.nn.functional as F

torch.manual_seed(0)


def f32(*shape):
    return torch.randn(*shape)


def pos(*shape):
    return torch.rand(*shape) + 0.5


def ops(low):
    """name -> zero-argument function returning a tensor; `low` is the autocast dtype."""
    return {
        "mm": lambda: f32(4, 4).mm(f32(4, 4)),
        "matmul": lambda: f32(3, 4).matmul(f32(4, 5)),
        "linear": lambda: F.linear(f32(2, 4), f32(3, 4), f32(3)),
        "conv1d": lambda: F.conv1d(f32(1, 2, 8), f32(3, 2, 3), f32(3)),
        "conv2d": lambda: F.conv2d(f32(1, 2, 6, 6), f32(3, 2, 3, 3), f32(3)),
        "conv3d": lambda: F.conv3d(f32(1, 2, 4, 4, 4), f32(3, 2, 2, 2, 2), f32(3)),
        "conv_transpose1d": lambda: F.conv_transpose1d(f32(1, 2, 5), f32(2, 3, 3), f32(3)),
        "conv_transpose2d": lambda: F.conv_transpose2d(f32(1, 2, 4, 4), f32(2, 3, 3, 3), f32(3)),
        "bmm": lambda: f32(2, 3, 4).bmm(f32(2, 4, 5)),
        "baddbmm": lambda: torch.baddbmm(f32(2, 3, 5), f32(2, 3, 4), f32(2, 4, 5)),
        "addmm": lambda: torch.addmm(f32(3, 5), f32(3, 4), f32(4, 5)),
        "addbmm": lambda: torch.addbmm(f32(3, 5), f32(2, 3, 4), f32(2, 4, 5)),
        "prelu": lambda: F.prelu(f32(2, 3, 4), f32(3)),
        "scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
            f32(1, 2, 4, 8), f32(1, 2, 4, 8), f32(1, 2, 4, 8)
        ),
        "einsum": lambda: torch.einsum("ij,jk->ik", f32(3, 4), f32(4, 5)),
        "dot": lambda: f32(6).dot(f32(6)),
        "mv": lambda: f32(3, 4).mv(f32(4)),
        "softmax": lambda: f32(3, 5).softmax(-1),
        "log_softmax": lambda: f32(3, 5).log_softmax(-1),
        "layer_norm": lambda: F.layer_norm(f32(2, 4), [4], f32(4), f32(4)),
        "group_norm": lambda: F.group_norm(f32(2, 4, 3), 2, f32(4), f32(4)),
        "batch_norm": lambda: F.batch_norm(f32(2, 3, 4), f32(3), pos(3), f32(3), f32(3), False),
        "sum": lambda: f32(3, 4).sum(),
        "prod": lambda: f32(3, 4).prod(),
        "cumsum": lambda: f32(3, 4).cumsum(1),
        "mean": lambda: f32(3, 4).mean(),
        "norm": lambda: torch.ops.aten.norm(f32(3, 4)),
        "exp": lambda: f32(3, 4).exp(),
        "log": lambda: pos(3, 4).log(),
        "pow": lambda: f32(3, 4).pow(2.0),
        "sqrt": lambda: pos(3, 4).sqrt(),
        "tanh": lambda: f32(3, 4).tanh(),
        "sigmoid": lambda: f32(3, 4).sigmoid(),
        "relu": lambda: f32(3, 4).relu(),
        "gelu": lambda: F.gelu(f32(3, 4)),
        "max_pool2d": lambda: F.max_pool2d(f32(1, 2, 4, 4), 2),
        "avg_pool2d": lambda: F.avg_pool2d(f32(1, 2, 4, 4), 2),
        "dropout_eval": lambda: F.dropout(f32(3, 4), 0.5, False),
        "add": lambda: f32(3, 4) + f32(3, 4),
        "mul": lambda: f32(3, 4) * f32(3, 4),
        "cat": lambda: torch.cat([f32(2, 3), f32(2, 3)]),
        "stack": lambda: torch.stack([f32(2, 3), f32(2, 3)]),
        "mse_loss": lambda: F.mse_loss(f32(3, 4), f32(3, 4)),
        "l1_loss": lambda: F.l1_loss(f32(3, 4), f32(3, 4)),
        "cross_entropy": lambda: F.cross_entropy(f32(4, 5), torch.tensor([0, 1, 2, 3])),
        "nll_loss": lambda: F.nll_loss(f32(4, 5).log_softmax(-1), torch.tensor([0, 1, 2, 3])),
        "binary_cross_entropy_with_logits": lambda: F.binary_cross_entropy_with_logits(
            f32(3, 4), torch.rand(3, 4)
        ),
        "embedding": lambda: F.embedding(torch.tensor([1, 3, 5]), f32(10, 4)),
        "topk": lambda: f32(3, 6).topk(2).values,
        "mm_low": lambda: f32(4, 4).to(low).mm(f32(4, 4).to(low)),
        "softmax_low": lambda: f32(3, 5).to(low).softmax(-1),
        "sum_low": lambda: f32(3, 4).to(low).sum(),
        "exp_low": lambda: f32(3, 4).to(low).exp(),
        "log_softmax_low": lambda: f32(3, 5).to(low).log_softmax(-1),
        "layer_norm_low": lambda: F.layer_norm(f32(2, 4).to(low), [4]),
        "mse_loss_low": lambda: F.mse_loss(f32(3, 4).to(low), f32(3, 4).to(low)),
        "cross_entropy_low": lambda: F.cross_entropy(f32(4, 5).to(low), torch.tensor([0, 1, 2, 3])),
        "cumsum_low": lambda: f32(3, 4).to(low).cumsum(1),
        "mm_mixed": lambda: f32(4, 4).mm(f32(4, 4).to(low)),
        "add_mixed": lambda: f32(3, 4) + f32(3, 4).to(low),
        "cat_mixed": lambda: torch.cat([f32(2, 3), f32(2, 3).to(low)]),
        "stack_mixed": lambda: torch.stack([f32(2, 3), f32(2, 3).to(low)]),
        "mm_f64": lambda: f32(4, 4).double().mm(f32(4, 4).double()),
        "linear_f64": lambda: F.linear(f32(2, 4).double(), f32(3, 4).double()),
    }


NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
         torch.float16: "float16"}


def output_dtype(fn, device_dtype):
    try:
        if device_dtype is None:
            out = fn()
        else:
            with torch.autocast("cpu", dtype=device_dtype):
                out = fn()
        return NAMES.get(out.dtype, str(out.dtype))
    except Exception as e:  # an op the policy refuses is part of the table too
        return "error: " + str(e).splitlines()[0]


def main():
    table = {}
    for name in ops(torch.bfloat16):
        table[name] = {
            "none": output_dtype(ops(torch.bfloat16)[name], None),
            "bfloat16": output_dtype(ops(torch.bfloat16)[name], torch.bfloat16),
            "float16": output_dtype(ops(torch.float16)[name], torch.float16),
        }
    json.dump({"torch_version": torch.__version__, "ops": table}, sys.stdout, indent=1,
              sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

//! The output dtype of each op under CPU bfloat16 / float16 autocast equals PyTorch 2.13's.
//!
//! Expected values come from PyTorch itself; regenerate them with
//!     .venv/bin/python scripts/gen_autocast_policy.py > tests/data/autocast_policy.json
//! Each op here is built exactly as the op of the same name in that script.
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{Device, Kind, Reduction, Tensor};
use tch_fabric::Autocast;

fn f32(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn pos(shape: &[i64]) -> Tensor {
    Tensor::rand(shape, (Kind::Float, Device::Cpu)) + 0.5
}

fn targets() -> Tensor {
    Tensor::from_slice(&[0i64, 1, 2, 3])
}

const NONE: Option<&Tensor> = None;

/// The op called `name` in the script, with `low` the autocast dtype.
fn op(name: &str, low: Kind) -> Tensor {
    match name {
        "mm" => f32(&[4, 4]).mm(&f32(&[4, 4])),
        "matmul" => f32(&[3, 4]).matmul(&f32(&[4, 5])),
        "linear" => f32(&[2, 4]).linear(&f32(&[3, 4]), Some(&f32(&[3]))),
        "conv1d" => f32(&[1, 2, 8]).conv1d(&f32(&[3, 2, 3]), Some(&f32(&[3])), [1], [0], [1], 1),
        "conv2d" => f32(&[1, 2, 6, 6]).conv2d(
            &f32(&[3, 2, 3, 3]),
            Some(&f32(&[3])),
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        ),
        "conv3d" => f32(&[1, 2, 4, 4, 4]).conv3d(
            &f32(&[3, 2, 2, 2, 2]),
            Some(&f32(&[3])),
            [1, 1, 1],
            [0, 0, 0],
            [1, 1, 1],
            1,
        ),
        "conv_transpose1d" => f32(&[1, 2, 5]).conv_transpose1d(
            &f32(&[2, 3, 3]),
            Some(&f32(&[3])),
            [1],
            [0],
            [0],
            1,
            [1],
        ),
        "conv_transpose2d" => f32(&[1, 2, 4, 4]).conv_transpose2d(
            &f32(&[2, 3, 3, 3]),
            Some(&f32(&[3])),
            [1, 1],
            [0, 0],
            [0, 0],
            1,
            [1, 1],
        ),
        "bmm" => f32(&[2, 3, 4]).bmm(&f32(&[2, 4, 5])),
        "baddbmm" => f32(&[2, 3, 5]).baddbmm(&f32(&[2, 3, 4]), &f32(&[2, 4, 5]), 1.0, 1.0),
        "addmm" => f32(&[3, 5]).addmm(&f32(&[3, 4]), &f32(&[4, 5])),
        "addbmm" => f32(&[3, 5]).addbmm(&f32(&[2, 3, 4]), &f32(&[2, 4, 5])),
        "prelu" => f32(&[2, 3, 4]).prelu(&f32(&[3])),
        "scaled_dot_product_attention" => Tensor::scaled_dot_product_attention(
            &f32(&[1, 2, 4, 8]),
            &f32(&[1, 2, 4, 8]),
            &f32(&[1, 2, 4, 8]),
            NONE,
            0.0,
            false,
            None,
            false,
        ),
        "einsum" => Tensor::einsum("ij,jk->ik", &[f32(&[3, 4]), f32(&[4, 5])], None::<i64>),
        "dot" => f32(&[6]).dot(&f32(&[6])),
        "mv" => f32(&[3, 4]).mv(&f32(&[4])),
        "softmax" => f32(&[3, 5]).softmax(-1, None),
        "log_softmax" => f32(&[3, 5]).log_softmax(-1, None),
        "layer_norm" => {
            f32(&[2, 4]).layer_norm([4], Some(&f32(&[4])), Some(&f32(&[4])), 1e-5, true)
        }
        "group_norm" => {
            f32(&[2, 4, 3]).group_norm(2, Some(&f32(&[4])), Some(&f32(&[4])), 1e-5, true)
        }
        "batch_norm" => f32(&[2, 3, 4]).batch_norm(
            Some(&f32(&[3])),
            Some(&f32(&[3])),
            Some(&f32(&[3])),
            Some(&pos(&[3])),
            false,
            0.1,
            1e-5,
            true,
        ),
        "sum" => f32(&[3, 4]).sum(None),
        "prod" => f32(&[3, 4]).prod(None),
        "cumsum" => f32(&[3, 4]).cumsum(1, None),
        "mean" => f32(&[3, 4]).mean(None),
        "norm" => f32(&[3, 4]).norm(),
        "exp" => f32(&[3, 4]).exp(),
        "log" => pos(&[3, 4]).log(),
        "pow" => f32(&[3, 4]).pow_tensor_scalar(2.0),
        "sqrt" => pos(&[3, 4]).sqrt(),
        "tanh" => f32(&[3, 4]).tanh(),
        "sigmoid" => f32(&[3, 4]).sigmoid(),
        "relu" => f32(&[3, 4]).relu(),
        "gelu" => f32(&[3, 4]).gelu("none"),
        "max_pool2d" => f32(&[1, 2, 4, 4]).max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
        "avg_pool2d" => f32(&[1, 2, 4, 4]).avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
        "dropout_eval" => f32(&[3, 4]).dropout(0.5, false),
        "add" => f32(&[3, 4]) + f32(&[3, 4]),
        "mul" => f32(&[3, 4]) * f32(&[3, 4]),
        "cat" => Tensor::cat(&[f32(&[2, 3]), f32(&[2, 3])], 0),
        "stack" => Tensor::stack(&[f32(&[2, 3]), f32(&[2, 3])], 0),
        "mse_loss" => f32(&[3, 4]).mse_loss(&f32(&[3, 4]), Reduction::Mean),
        "l1_loss" => f32(&[3, 4]).l1_loss(&f32(&[3, 4]), Reduction::Mean),
        "cross_entropy" => {
            f32(&[4, 5]).cross_entropy_loss(&targets(), NONE, Reduction::Mean, -100, 0.0)
        }
        "nll_loss" => f32(&[4, 5]).log_softmax(-1, None).nll_loss(&targets()),
        "binary_cross_entropy_with_logits" => f32(&[3, 4]).binary_cross_entropy_with_logits(
            &Tensor::rand([3, 4], (Kind::Float, Device::Cpu)),
            NONE,
            NONE,
            Reduction::Mean,
        ),
        "embedding" => Tensor::embedding(
            &f32(&[10, 4]),
            &Tensor::from_slice(&[1i64, 3, 5]),
            -1,
            false,
            false,
        ),
        "topk" => f32(&[3, 6]).topk(2, -1, true, true).0,
        "mm_low" => f32(&[4, 4]).to_kind(low).mm(&f32(&[4, 4]).to_kind(low)),
        "softmax_low" => f32(&[3, 5]).to_kind(low).softmax(-1, None),
        "sum_low" => f32(&[3, 4]).to_kind(low).sum(None),
        "exp_low" => f32(&[3, 4]).to_kind(low).exp(),
        "log_softmax_low" => f32(&[3, 5]).to_kind(low).log_softmax(-1, None),
        "layer_norm_low" => f32(&[2, 4])
            .to_kind(low)
            .layer_norm([4], NONE, NONE, 1e-5, true),
        "mse_loss_low" => f32(&[3, 4])
            .to_kind(low)
            .mse_loss(&f32(&[3, 4]).to_kind(low), Reduction::Mean),
        "cross_entropy_low" => f32(&[4, 5]).to_kind(low).cross_entropy_loss(
            &targets(),
            NONE,
            Reduction::Mean,
            -100,
            0.0,
        ),
        "cumsum_low" => f32(&[3, 4]).to_kind(low).cumsum(1, None),
        "mm_mixed" => f32(&[4, 4]).mm(&f32(&[4, 4]).to_kind(low)),
        "add_mixed" => f32(&[3, 4]) + f32(&[3, 4]).to_kind(low),
        "cat_mixed" => Tensor::cat(&[f32(&[2, 3]), f32(&[2, 3]).to_kind(low)], 0),
        "stack_mixed" => Tensor::stack(&[f32(&[2, 3]), f32(&[2, 3]).to_kind(low)], 0),
        "mm_f64" => f32(&[4, 4])
            .to_kind(Kind::Double)
            .mm(&f32(&[4, 4]).to_kind(Kind::Double)),
        "linear_f64" => f32(&[2, 4])
            .to_kind(Kind::Double)
            .linear(&f32(&[3, 4]).to_kind(Kind::Double), NONE),
        other => panic!("op {other} is in the table but not in this test: add it here"),
    }
}

/// The output dtype, or "error" when libtorch refuses the op (as the script records it).
fn output(name: &str, autocast: Option<Kind>) -> String {
    let low = autocast.unwrap_or(Kind::BFloat16);
    let run = || match autocast {
        None => op(name, low),
        Some(k) => Autocast::new(Device::Cpu, k).run(|| op(name, low)).unwrap(),
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(t) => common::dtype_name(t.kind()).to_string(),
        Err(_) => "error".to_string(),
    }
}

#[test]
fn cpu_autocast_output_dtypes_match_pytorch() {
    let table = common::data("autocast_policy.json");
    assert!(
        table["torch_version"]
            .as_str()
            .unwrap()
            .starts_with("2.13.0"),
        "the table must come from torch 2.13.0"
    );
    let ops = table["ops"].as_object().unwrap();
    assert!(ops.len() >= 25, "at least 25 ops are checked");
    let mut mismatches = Vec::new();
    for (name, expected) in ops {
        for (column, autocast) in [
            ("none", None),
            ("bfloat16", Some(Kind::BFloat16)),
            ("float16", Some(Kind::Half)),
        ] {
            let want = expected[column].as_str().unwrap();
            let want = if want.starts_with("error") {
                "error"
            } else {
                want
            };
            let got = output(name, autocast);
            if got != want {
                mismatches.push(format!(
                    "{name} under {column}: torch {want}, tch-fabric {got}"
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

//! The `cuda` feature's kernel of `tch_fabric::unscale_sumsq_` (csrc/ops_cuda.cu). Without a
//! GPU (CI) this proves the kernel is compiled, linked and registered with libtorch's
//! dispatcher; with one it also compares the op with PyTorch's CUDA kernels. The full GPU check
//! (sync-freeness, CUDA graphs, bandwidth) is scripts/gpu/check.py, see the README.
mod common;

use tch::{Device, Kind, Tensor};
use tch_fabric::ops::{unscale_sumsq, OPS_LIBRARY};
use tch_fabric::{GradScaler, GradScalerConfig};

#[test]
fn the_ops_library_registers_the_cuda_kernel() {
    let out = common::run_python(
        r#"
import sys, torch
torch.ops.load_library(sys.stdin.read().strip())
print(torch._C._dispatch_has_kernel_for_dispatch_key("tch_fabric::unscale_sumsq_", "CUDA"))
"#,
        OPS_LIBRARY,
    );
    assert_eq!(out.trim(), "True", "{out}");
}

fn bits(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float => t.view_dtype(Kind::Int),
        _ => t.view_dtype(Kind::Int16),
    }
}

#[test]
fn matches_pytorchs_cuda_kernels_where_there_is_a_gpu() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: only the registration is checked here");
        return;
    }
    let dev = Device::Cuda(0);
    let grads = || {
        tch::manual_seed(5);
        vec![
            Tensor::randn([1000, 37], (Kind::Float, dev)) * 1e3,
            (Tensor::randn([70_001], (Kind::Float, dev)) * 1e2).to_kind(Kind::BFloat16),
            (Tensor::randn([32_769], (Kind::Float, dev)) * 1e2).to_kind(Kind::Half),
            Tensor::zeros([0], (Kind::Float, dev)),
            Tensor::randn([300, 200], (Kind::Float, dev)).tr(), // non-contiguous
        ]
    };
    let scale = 1000.0;
    let inv = Tensor::full([], scale, (Kind::Double, dev))
        .reciprocal()
        .to_kind(Kind::Float);
    let (ours, native) = (grads(), grads());
    let found = Tensor::zeros([], (Kind::Float, dev));
    let sumsq = unscale_sumsq(&ours, &found, &inv, true).unwrap();
    assert_eq!(sumsq.device(), dev, "the sum stays on the device");
    let mut scaler = GradScaler::new(
        GradScalerConfig::default()
            .init_scale(scale)
            .allow_fp16_grads(true),
    )
    .unwrap();
    let _ = scaler.scale(&Tensor::ones([], (Kind::Float, dev))).unwrap();
    scaler.unscale_grads(&native).unwrap();
    for (a, b) in ours.iter().zip(&native) {
        assert!(bits(a).equal(&bits(b)), "{:?} {:?}", a.kind(), a.size());
    }
    assert_eq!(found.double_value(&[]), 0.0);
    let want: f64 = native
        .iter()
        .map(|g| {
            g.to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum();
    let got = sumsq.double_value(&[]);
    assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
    // Deterministic, and an inf anywhere is found.
    let again = unscale_sumsq(&native, &found, &inv.ones_like(), false).unwrap();
    let third = unscale_sumsq(&native, &found, &inv.ones_like(), false).unwrap();
    assert!(again.equal(&third));
    let _ = native[1].get(12_345).fill_(f64::INFINITY);
    let _ = unscale_sumsq(&native, &found, &inv, false).unwrap();
    assert_eq!(found.double_value(&[]), 1.0);
}

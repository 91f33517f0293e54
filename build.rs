//! Compiles the C++ shim in `csrc/` against the libtorch that torch-sys found, and makes the
//! crate's own binaries, tests and examples find libtorch at run time (rpath) and keep
//! `libtorch_cuda` linked (no `--as-needed`), so a GPU machine sees CUDA.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build_cuda.rs"]
mod cuda;

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");

    // torch-sys (links = "tch") publishes the lib dir it linked against; using it guarantees
    // the shim and tch agree on one libtorch.
    let lib_dir = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").context(
        "torch-sys did not report a libtorch lib dir (DEP_TCH_LIBTORCH_LIB); \
         run scripts/provision.sh, or set LIBTORCH to a libtorch 2.13.0 folder",
    )?);
    let root = lib_dir
        .parent()
        .context("libtorch lib dir has no parent folder")?;
    let includes = [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
    ];
    if !includes[0].join("ATen/ATen.h").exists() {
        bail!(
            "libtorch headers not found under {} (expected ATen/ATen.h). \
             Run scripts/provision.sh, or point LIBTORCH at a libtorch 2.13.0 folder \
             that has include/ and lib/.",
            includes[0].display()
        );
    }

    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .includes(&includes)
        .include("csrc")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi()?.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's own headers are not warning-clean; our code is kept clean by review.
        .warnings(false)
        .file("csrc/shim.cpp")
        .file("csrc/dist.cpp")
        .compile("tch_fabric_shim");

    let ops = build_ops_library(&includes, &lib_dir)?;
    println!("cargo:rustc-env=TCH_FABRIC_OPS_LIB={}", ops.display());

    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        link_args(&lib_dir, ops.parent().expect("in OUT_DIR"));
    }
    Ok(())
}

/// Builds `csrc/ops.cpp` (the `tch_fabric` custom ops) as a shared library: the crate's own
/// binaries link it (loading it registers the ops with libtorch's dispatcher), and Python
/// tests load the very same file with `torch.ops.load_library`.
fn build_ops_library(includes: &[PathBuf], lib_dir: &Path) -> Result<PathBuf> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let out = out_dir.join("libtch_fabric_ops.so");
    let mut cmd = cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .includes(includes)
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi()?.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // The kernel is the hot path of the AMP step: optimise it even in debug builds.
        .opt_level(3)
        .debug(false)
        .warnings(false)
        // at::parallel_for is a header template over `#pragma omp parallel`: without OpenMP it
        // runs on one thread. The OpenMP runtime is libtorch's own libgomp.so.1 (same soname).
        .flag("-fopenmp")
        // Lets sqrt vectorise in the AdamW kernel (the op never reads errno).
        .flag("-fno-math-errno")
        .get_compiler()
        .to_command();
    // The `cuda` feature adds the CUDA kernels (csrc/ops_cuda.cu, see build_cuda.rs).
    let cuda = match std::env::var_os("CARGO_FEATURE_CUDA") {
        Some(_) => Some(cuda::compile(includes, lib_dir, &cxx11_abi()?, &out_dir)?),
        None => None,
    };
    cmd.arg("-shared").arg("-o").arg(&out).arg("csrc/ops.cpp");
    if let Some(cuda) = &cuda {
        cmd.arg(&cuda.object);
    }
    cmd.arg(format!("-L{}", lib_dir.display()))
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-ltorch_cpu", "-lc10"]);
    if let Some(cuda) = &cuda {
        cmd.args(&cuda.link_args);
    }
    let status = cmd
        .status()
        .context("running the C++ compiler for csrc/ops.cpp")?;
    if !status.success() {
        bail!("compiling csrc/ops.cpp failed ({status})");
    }
    Ok(out)
}

/// The C++ ABI libtorch was built with, found the way torch-sys finds it.
fn cxx11_abi() -> Result<String> {
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var_os("VIRTUAL_ENV")
            .map(|v| Path::new(&v).join("bin/python"))
            .unwrap_or_else(|| PathBuf::from("python3"));
        let out = Command::new(&python)
            .args([
                "-c",
                "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        let abi = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if abi != "0" && abi != "1" {
            bail!(
                "could not read torch's C++ ABI from {}: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return Ok(abi);
    }
    Ok(std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string()))
}

/// `rustc-link-arg` reaches only this package's binaries, tests and examples; downstream crates
/// add the same three lines to their own build.rs (see the README).
fn link_args(lib_dir: &Path, ops_dir: &Path) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", ops_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    // Loading the ops library is what registers the `tch_fabric::` ops.
    println!("cargo:rustc-link-arg=-L{}", ops_dir.display());
    println!("cargo:rustc-link-arg=-ltch_fabric_ops");
    // libtorch.so already needs libtorch_cuda.so in the CUDA wheels; naming it too keeps CUDA
    // registered even with a libtorch whose libtorch.so does not.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
}

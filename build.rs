//! Compiles the C++ in `csrc/` against the libtorch that torch-sys found:
//!
//! - the shim (`shim.cpp`, `dist.cpp`) and the `tch_fabric::` ops (`ops.cpp`, plus
//!   `ops_cuda.cu` with the `cuda` feature) as static libraries inside this crate's rlib. The
//!   ops archive is linked whole (`+whole-archive`): it holds only `TORCH_LIBRARY`
//!   registrations that nothing references, which a linker would otherwise drop. Every final
//!   binary of every crate that depends on tch-fabric gets the ops that way, with nothing in
//!   its own build script (`cargo:rustc-link-lib` reaches dependents; `rustc-link-arg` does not);
//! - the same ops objects as a shared library, `libtch_fabric_ops.so`, for Python
//!   (`torch.ops.load_library(tch_fabric::ops::OPS_LIBRARY)`), so tests drive the very op this
//!   crate runs from both sides.
//!
//! This package's own binaries, tests and examples also get an rpath to libtorch and keep
//! `libtorch_cuda` linked (no `--as-needed`), so they run without `LD_LIBRARY_PATH` and see
//! CUDA on a GPU machine; dependents set that up themselves (README, "Use it from your crate").
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build_cuda.rs"]
mod cuda;
#[path = "build_gloo.rs"]
mod gloo;

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=build_cuda.rs");
    println!("cargo:rerun-if-changed=build_gloo.rs");
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
    let abi = cxx11_abi()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);

    let mut shim = cxx(&includes, &abi);
    if let Some(dir) = gloo::configure(&shim, &lib_dir, &out_dir)? {
        shim.include(dir)
            .define("USE_C10D_GLOO", None)
            .define("TF_HAVE_GLOO", None);
    }
    // With `cuda`, NCCL process groups too: libtorch's ProcessGroupNCCL.hpp against the
    // wheels' CUDA and NCCL headers (compiled and linked without a GPU, like the kernels).
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        for dir in cuda::nccl_includes(&lib_dir)? {
            shim.include(dir);
        }
        shim.define("USE_C10D_NCCL", None)
            .define("TF_HAVE_NCCL", None);
    }
    shim.file("csrc/shim.cpp")
        .file("csrc/dist.cpp")
        .file("csrc/pickle.cpp")
        .compile("tch_fabric_shim");

    let cuda = match std::env::var_os("CARGO_FEATURE_CUDA") {
        Some(_) => Some(cuda::compile(&includes, &lib_dir, &abi, &out_dir)?),
        None => None,
    };
    let mut objects = ops_build(&includes, &abi).compile_intermediates();
    if let Some(cuda) = &cuda {
        objects.extend(cuda.objects.iter().cloned());
    }
    // The static copy for Rust: whole, so the registrations survive the final link.
    cxx(&includes, &abi)
        .objects(&objects)
        .link_lib_modifier("+whole-archive")
        .compile("tch_fabric_ops");
    // `#pragma omp parallel` inside at::parallel_for (see ops_build) calls the OpenMP runtime.
    println!("cargo:rustc-link-lib=dylib=gomp");
    if let Some(cuda) = &cuda {
        // The kernels call c10's CUDA stream and guard helpers; libtorch_cuda holds the CUDA
        // dispatch key's kernels the registration sits next to.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!(
            "cargo:rustc-link-search=native={}",
            cuda.cudart_dir.display()
        );
        // Only the versioned runtime ships in the wheels (no libcudart.so link), and it is the
        // very runtime libtorch_cuda loads.
        println!("cargo:rustc-link-lib=dylib:+verbatim={}", cuda.cudart);
    }

    let ops = link_shared_ops(&objects, &lib_dir, cuda.as_ref(), &out_dir)?;
    println!("cargo:rustc-env=TCH_FABRIC_OPS_LIB={}", ops.display());

    let mut runtime_dirs = vec![lib_dir.clone()];
    if let Some(cuda) = &cuda {
        runtime_dirs.push(cuda.cudart_dir.clone());
    }
    // For dependents' build scripts (`DEP_TCH_FABRIC_RPATH`), should they want an rpath: the
    // folders a binary linking tch-fabric loads libraries from.
    let joined: Vec<String> = runtime_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    println!("cargo:rpath={}", joined.join(":"));
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        own_targets_link_args(&lib_dir, &runtime_dirs);
    }
    Ok(())
}

/// A C++17 build against libtorch's headers with its ABI.
fn cxx(includes: &[PathBuf], abi: &str) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .std("c++17")
        .includes(includes)
        .include("csrc")
        .define("_GLIBCXX_USE_CXX11_ABI", abi)
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's own headers are not warning-clean; our code is kept clean by review.
        .warnings(false);
    b
}

/// The build of `csrc/ops.cpp` and `csrc/rounding.cpp`, the hot path of the step: optimised in
/// every profile.
fn ops_build(includes: &[PathBuf], abi: &str) -> cc::Build {
    let mut b = cxx(includes, abi);
    b.opt_level(3)
        .debug(false)
        // at::parallel_for is a header template over `#pragma omp parallel`: without OpenMP it
        // runs on one thread. The OpenMP runtime is libtorch's own libgomp.so.1 (same soname).
        .flag("-fopenmp")
        // Lets sqrt vectorise in the AdamW kernel (the op never reads errno).
        .flag("-fno-math-errno")
        .file("csrc/ops.cpp")
        .file("csrc/rounding.cpp");
    b
}

/// Links the ops objects into `libtch_fabric_ops.so` for Python. Never loaded by a Rust
/// binary of this crate: those hold the static copy, and a second `TORCH_LIBRARY(tch_fabric)`
/// in one process is an error.
fn link_shared_ops(
    objects: &[PathBuf],
    lib_dir: &Path,
    cuda: Option<&cuda::Cuda>,
    out_dir: &Path,
) -> Result<PathBuf> {
    let out = out_dir.join("libtch_fabric_ops.so");
    let mut cmd = cc::Build::new()
        .cpp(true)
        .flag("-fopenmp")
        .get_compiler()
        .to_command();
    cmd.arg("-shared").arg("-o").arg(&out).args(objects);
    cmd.arg(format!("-L{}", lib_dir.display()))
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-ltorch_cpu", "-lc10"]);
    if let Some(cuda) = cuda {
        cmd.args(["-ltorch_cuda", "-lc10_cuda"])
            .arg(format!("-L{}", cuda.cudart_dir.display()))
            .arg(format!("-l:{}", cuda.cudart))
            .arg(format!("-Wl,-rpath,{}", cuda.cudart_dir.display()));
    }
    let status = cmd
        .status()
        .context("running the C++ compiler to link libtch_fabric_ops.so")?;
    if !status.success() {
        bail!("linking libtch_fabric_ops.so failed ({status})");
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

/// `rustc-link-arg` reaches only this package's binaries, tests and examples: an rpath to
/// libtorch (and CUDA's runtime), and libtorch_cuda kept linked so a GPU machine sees CUDA.
fn own_targets_link_args(lib_dir: &Path, runtime_dirs: &[PathBuf]) {
    for dir in runtime_dirs {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    // libtorch.so already needs libtorch_cuda.so in the CUDA wheels; naming it too keeps CUDA
    // registered even with a libtorch whose libtorch.so does not.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
}

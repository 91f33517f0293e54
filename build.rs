//! Compiles the C++ shim in `csrc/` against the libtorch that torch-sys found, and makes the
//! crate's own binaries, tests and examples find libtorch at run time (rpath) and keep
//! `libtorch_cuda` linked (no `--as-needed`), so a GPU machine sees CUDA.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

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
        .compile("tch_fabric_shim");

    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        link_args(&lib_dir);
    }
    Ok(())
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
fn link_args(lib_dir: &Path) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    // libtorch.so already needs libtorch_cuda.so in the CUDA wheels; naming it too keeps CUDA
    // registered even with a libtorch whose libtorch.so does not.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
}

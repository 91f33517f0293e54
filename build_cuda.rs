//! The `cuda` feature's half of build.rs: compiles `csrc/ops_cuda.cu` and `csrc/rounding_cuda.cu`
//! with nvcc into objects that go into the ops libraries next to `csrc/ops.cpp`. Without the feature nothing here runs, so
//! a CPU build never needs a CUDA compiler.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the ops libraries' links need from the CUDA build.
pub struct Cuda {
    /// The compiled kernels.
    pub objects: Vec<PathBuf>,
    /// The folder of the CUDA runtime torch uses.
    pub cudart_dir: PathBuf,
    /// Its file name (versioned, e.g. `libcudart.so.13`: the wheels ship no unversioned link).
    pub cudart: String,
}

/// The CUDA sources in `csrc/`, without `.cu` (scripts/gpu/prepare.sh compiles the same list).
const CUDA_SOURCES: [&str; 2] = ["ops_cuda", "rounding_cuda"];

/// Compiles the CUDA kernels against the libtorch in `lib_dir`.
pub fn compile(includes: &[PathBuf], lib_dir: &Path, abi: &str, out_dir: &Path) -> Result<Cuda> {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let site = site_packages(lib_dir)?;
    let nvcc = find_nvcc(site.as_deref())?;

    let mut objects = Vec::new();
    for name in CUDA_SOURCES {
        let object = out_dir.join(format!("{name}.o"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["-c", &format!("csrc/{name}.cu"), "-o"])
            .arg(&object)
            .args(nvcc_flags()?)
            .arg(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
        for dir in includes {
            cmd.arg(format!("-I{}", dir.display()));
        }
        cmd.args(gencode()?);
        let status = cmd
            .status()
            .with_context(|| format!("running {}", nvcc.display()))?;
        if !status.success() {
            bail!(
                "compiling csrc/{name}.cu with {} failed ({status})",
                nvcc.display()
            );
        }
        objects.push(object);
    }

    let (cudart_dir, cudart) = find_cudart(site.as_deref(), &nvcc)?;
    Ok(Cuda {
        objects,
        cudart_dir,
        cudart,
    })
}

/// csrc/nvcc.flags without its comments (shared with scripts/gpu/prepare.sh).
fn nvcc_flags() -> Result<Vec<String>> {
    let text = std::fs::read_to_string("csrc/nvcc.flags").context("reading csrc/nvcc.flags")?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// `NVCC`, else the CUDA compiler `scripts/provision.sh --cuda` installs next to torch
/// (`site-packages/nvidia/cu13/bin/nvcc`).
fn find_nvcc(site: Option<&Path>) -> Result<PathBuf> {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        let nvcc = PathBuf::from(nvcc);
        if !nvcc.is_file() {
            bail!("NVCC={} does not exist", nvcc.display());
        }
        return Ok(nvcc);
    }
    if let Some(nvcc) = site.and_then(|s| {
        nvidia_dirs(s)
            .map(|d| d.join("bin/nvcc"))
            .find(|p| p.is_file())
    }) {
        return Ok(nvcc);
    }
    bail!(
        "the `cuda` feature needs nvcc from the CUDA version torch was built with (13.0 for \
         torch 2.13.0+cu130). Run `scripts/provision.sh --cuda` (installs it next to torch from \
         the package registry), or set NVCC=/path/to/nvcc."
    )
}

/// `site-packages/nvidia/cu*`: where the CUDA wheels install.
fn nvidia_dirs(site: &Path) -> impl Iterator<Item = PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(site.join("nvidia"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cu"))
        })
        .collect();
    dirs.sort();
    dirs.into_iter()
}

/// The CUDA runtime to link by its versioned name: torch's own (the wheel's), else the one
/// next to nvcc.
fn find_cudart(site: Option<&Path>, nvcc: &Path) -> Result<(PathBuf, String)> {
    let toolkit = nvcc.parent().and_then(Path::parent).map(Path::to_path_buf);
    let candidates = site
        .into_iter()
        .flat_map(|s| nvidia_dirs(s).map(|d| d.join("lib")))
        .chain(
            toolkit
                .iter()
                .flat_map(|t| [t.join("lib64"), t.join("lib")]),
        );
    for dir in candidates {
        let names = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        let mut found: Vec<String> = names
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.strip_prefix("libcudart.so.")
                    .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        found.sort();
        if let Some(name) = found.pop() {
            return Ok((dir, name));
        }
    }
    bail!(
        "no CUDA runtime (libcudart.so.<major>) found next to torch or {}",
        nvcc.display()
    )
}

/// Device code for the GPUs the crate targets: SASS for A100 (sm_80) and H100/H200 (sm_90),
/// plus compute_90 PTX that newer GPUs compile at load time. `CUDA_COMPUTE_CAP=90` (or
/// `80,90`) builds only those, for a faster compile.
fn gencode() -> Result<Vec<String>> {
    let caps: Vec<u32> = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(v) => v
            .split([',', ';', ' '])
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim().replace('.', "").parse().with_context(|| {
                    format!("CUDA_COMPUTE_CAP={v}: expected numbers like 90 or 80,90")
                })
            })
            .collect::<Result<_>>()?,
        Err(_) => vec![80, 90],
    };
    let max = *caps.iter().max().context("CUDA_COMPUTE_CAP is empty")?;
    let mut args: Vec<String> = caps
        .iter()
        .map(|c| format!("-gencode=arch=compute_{c},code=sm_{c}"))
        .collect();
    args.push(format!("-gencode=arch=compute_{max},code=compute_{max}"));
    Ok(args)
}

/// The headers `csrc/dist.cpp` needs for libtorch's `ProcessGroupNCCL.hpp` under the `cuda`
/// feature: the CUDA runtime's (the wheel's `nvidia/cu*/include`, else next to nvcc) and
/// NCCL's (`nvidia/nccl/include`, from the nvidia-nccl wheel torch depends on, or
/// `NCCL_INCLUDE_DIR`). The library itself is libtorch_cuda's, linked already.
pub fn nccl_includes(lib_dir: &Path) -> Result<Vec<PathBuf>> {
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE_DIR");
    let site = site_packages(lib_dir)?;
    let cuda = site
        .iter()
        .flat_map(|s| nvidia_dirs(s).map(|d| d.join("include")))
        .chain(
            find_nvcc(site.as_deref())
                .ok()
                .and_then(|n| Some(n.parent()?.parent()?.join("include"))),
        )
        .find(|d| d.join("cuda_runtime_api.h").exists())
        .context("no CUDA runtime headers (cuda_runtime_api.h) next to torch or nvcc")?;
    let nccl = std::env::var_os("NCCL_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(site.iter().map(|s| s.join("nvidia/nccl/include")))
        .find(|d| d.join("nccl.h").exists())
        .context(
            "no nccl.h: install the nvidia-nccl wheel torch was built with into the Python \
             that owns libtorch, or set NCCL_INCLUDE_DIR",
        )?;
    Ok(vec![cuda, nccl])
}

/// The site-packages folder of the torch whose `lib/` is `lib_dir` (`.libtorch/lib` is a link
/// into the venv: resolved, to find the venv's nvidia/ packages).
fn site_packages(lib_dir: &Path) -> Result<Option<PathBuf>> {
    let lib_dir = std::fs::canonicalize(lib_dir)
        .with_context(|| format!("resolving {}", lib_dir.display()))?;
    Ok(lib_dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf))
}

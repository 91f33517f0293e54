//! The Gloo half of build.rs: finds Gloo's headers (which the torch wheels do not ship) so that
//! `csrc/dist.cpp` compiles against libtorch's real `ProcessGroupGloo.hpp`, and checks, by
//! building and running `csrc/gloo_probe.cpp` against this libtorch, that the header lays the
//! classes out as the shipped library does. Without the headers the crate builds without
//! multi-process support (a clear error at `ProcessGroup` creation); with headers whose layout
//! disagrees, the build stops, since compiling against them would corrupt memory.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Gloo's headers are: `GLOO_INCLUDE_DIR`, else the system's (Debian's `libgloo-dev`
/// puts them in /usr/include/gloo). `None` if neither has `gloo/context.h`, or if
/// `TCH_FABRIC_NO_GLOO` is set.
fn include_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=TCH_FABRIC_NO_GLOO");
    if std::env::var_os("TCH_FABRIC_NO_GLOO").is_some() {
        return None;
    }
    let candidates = std::env::var_os("GLOO_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ]);
    for dir in candidates {
        let header = dir.join("gloo/context.h");
        if header.exists() {
            println!("cargo:rerun-if-changed={}", header.display());
            return Some(dir);
        }
    }
    None
}

/// The Gloo include folder to compile `dist.cpp` with, once the layout probe passed; `None`
/// (with a build warning) when there are no Gloo headers.
pub fn configure(build: &cc::Build, lib_dir: &Path, out_dir: &Path) -> Result<Option<PathBuf>> {
    let Some(dir) = include_dir() else {
        println!(
            "cargo:warning=tch-fabric: no Gloo headers (install libgloo-dev, or set \
             GLOO_INCLUDE_DIR): building without multi-process data parallelism"
        );
        return Ok(None);
    };
    let probe = out_dir.join("gloo_probe");
    let mut cmd = build
        .clone()
        .include(&dir)
        .define("USE_C10D_GLOO", None)
        .get_compiler()
        .to_command();
    cmd.arg("csrc/gloo_probe.cpp")
        .arg("-o")
        .arg(&probe)
        .arg(format!("-L{}", lib_dir.display()))
        .args(["-ltorch_cpu", "-lc10"])
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    let out = cmd.output().context("compiling csrc/gloo_probe.cpp")?;
    if !out.status.success() {
        bail!(
            "the Gloo headers in {} do not compile with libtorch's ProcessGroupGloo.hpp \
             (set GLOO_INCLUDE_DIR to other ones, or TCH_FABRIC_NO_GLOO=1 to build without \
             multi-process support):\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run = Command::new(&probe)
        .output()
        .with_context(|| format!("running {}", probe.display()))?;
    if !run.status.success() {
        bail!(
            "the Gloo headers in {} give ProcessGroupGloo another layout than this libtorch's \
             (set GLOO_INCLUDE_DIR to headers of the Gloo version libtorch was built with, or \
             TCH_FABRIC_NO_GLOO=1 to build without multi-process support): {}{}",
            dir.display(),
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    Ok(Some(dir))
}

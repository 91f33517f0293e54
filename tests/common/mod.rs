//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Reads a JSON file under tests/data.
pub fn data(name: &str) -> serde_json::Value {
    let path = repo().join("tests/data").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Python that has torch 2.13 (the provisioned venv, or TCH_FABRIC_PYTHON).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TCH_FABRIC_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/provision.sh (or set TCH_FABRIC_PYTHON to a python with torch 2.13)",
        venv.display()
    );
    venv
}

/// Runs a Python snippet with `stdin` as its standard input and returns its standard output.
pub fn run_python(code: &str, stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(python())
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// PyTorch's name of a dtype.
pub fn dtype_name(kind: tch::Kind) -> &'static str {
    match kind {
        tch::Kind::Float => "float32",
        tch::Kind::Double => "float64",
        tch::Kind::Half => "float16",
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Int64 => "int64",
        _ => "other",
    }
}

pub mod scaler;

/// Holds a process-wide lock for a test that compares training bits with PyTorch. Two such
/// trainings on parallel test threads of one binary were seen to differ from PyTorch in the
/// last bits now and then (about 1 run in 6, either pair of tests), though each alone never
/// did: libtorch keeps process-wide kernel state (thread settings, cached CPU primitives) that
/// concurrent threads share. Serialising them keeps the comparison exact.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Collects `log` warnings so that tests can check them.
pub struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if record.level() == log::Level::Warn {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

pub fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(c).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
        c
    })
}

/// Warnings emitted while `f` ran (tests share one logger, so they take a lock).
pub fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = capture();
    c.0.lock().unwrap().clear();
    let out = f();
    let w = std::mem::take(&mut *c.0.lock().unwrap());
    (out, w)
}

/// A Fabric of `precision` on CPU.
pub fn cpu(precision: &str) -> tch_fabric::Fabric {
    tch_fabric::Fabric::builder()
        .precision(precision)
        .accelerator("cpu")
        .build()
        .unwrap()
}

/// A `16-mixed` Fabric on CPU as real float16 (not Lightning's bf16 fallback), with `config`.
pub fn cpu_fp16(config: tch_fabric::GradScalerConfig) -> tch_fabric::Fabric {
    tch_fabric::Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(config)
        .build()
        .unwrap()
}

/// Copies of every variable of `vs`, sorted by name.
pub fn weights(vs: &tch::nn::VarStore) -> Vec<(String, tch::Tensor)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Whether two `weights` lists hold the same names and values.
pub fn same(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1.equal(&y.1))
}

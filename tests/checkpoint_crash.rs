//! Checkpoints under faults, in child processes: a saving process killed at random moments
//! never breaks the checkpoint nor leaves temporary files piling up, and a save costs at most
//! one extra copy of the weights in memory.
//!
//! The children are this very test binary: run with `TCH_FABRIC_CKPT_WORKER=<json>` and the
//! filter `worker`, the `worker` test below saves instead of returning at once.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{nn, Device, Tensor};
use tch_fabric::Fabric;

const WORKER_ENV: &str = "TCH_FABRIC_CKPT_WORKER";

#[derive(Debug, Serialize, Deserialize)]
enum Job {
    /// Save versions `first`, `first + 1`, ... to `path` until killed, every weight equal to
    /// the version; `started` appears once the loop runs.
    SaveLoop {
        path: PathBuf,
        started: PathBuf,
        first: u64,
    },
    /// One save of the weights; prints a [`Measure`] line.
    Measure { path: PathBuf },
    /// Saves version 1 to `path`, then, with files limited to `limit` bytes (a disk that fills
    /// up: writes past it fail with EFBIG), version 2 (4 x 8 MiB); prints `FULL <error>`.
    FullDisk { path: PathBuf, limit: u64 },
}

/// What one save cost, from `/proc/self/status`.
#[derive(Debug, Serialize, Deserialize)]
struct Measure {
    weight_bytes: u64,
    rss_before: u64,
    peak_during_save: u64,
    /// How long the save took (printed, never asserted).
    save_ms: u64,
}

/// `tensors` variables of `rows x 1024` float32 each.
fn model(fabric: &Fabric, tensors: usize, rows: i64) -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    for i in 0..tensors {
        let _ = vs.root().zeros(&format!("w{i}"), &[rows, 1024]);
    }
    let _ = fabric.setup_module((), &mut vs).unwrap();
    vs
}

fn fabric() -> Fabric {
    Fabric::builder().accelerator("cpu").build().unwrap()
}

fn fill(vs: &nn::VarStore, v: u64) {
    tch::no_grad(|| {
        for (_, t) in vs.variables() {
            let _ = t.shallow_clone().fill_(v as f64);
        }
    });
}

/// A `/proc/self/status` field in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn run_job(job: Job) {
    let f = fabric();
    match job {
        Job::SaveLoop {
            path,
            started,
            first,
        } => {
            // 4 x 8 MiB: a save takes long enough for kills to land inside it.
            let vs = model(&f, 4, 2048);
            std::fs::write(&started, b"").unwrap();
            for v in first.. {
                fill(&vs, v);
                f.save(&path, &v).unwrap();
            }
        }
        Job::FullDisk { path, limit } => {
            let vs = model(&f, 4, 2048);
            fill(&vs, 1);
            let state = |v: u64| std::collections::BTreeMap::from([("version", v)]);
            f.save(&path, &state(1)).unwrap();
            fill(&vs, 2);
            // SAFETY: plain libc calls on this process; SIGXFSZ would kill it at the limit
            // instead of failing the write.
            unsafe {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: libc::RLIM_INFINITY,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
            }
            let e = f.save(&path, &state(2)).unwrap_err();
            println!("FULL {e}");
        }
        Job::Measure { path } => {
            // 4 x 16 MiB = 64 MiB of weights.
            let vs = model(&f, 4, 4096);
            fill(&vs, 1);
            let weight_bytes = 4 * 4096 * 1024 * 4;
            // Resets VmHWM to the current resident set, so the peak is the save's.
            std::fs::write("/proc/self/clear_refs", b"5").unwrap();
            let rss_before = status_bytes("VmRSS:");
            let t0 = Instant::now();
            f.save(&path, &1u64).unwrap();
            let save_ms = t0.elapsed().as_millis() as u64;
            let m = Measure {
                weight_bytes,
                rss_before,
                peak_during_save: status_bytes("VmHWM:"),
                save_ms,
            };
            println!("MEASURE {}", serde_json::to_string(&m).unwrap());
        }
    }
}

/// Not a test of its own: the entry point of the children (see the module docs).
#[test]
fn worker() {
    if let Ok(json) = std::env::var(WORKER_ENV) {
        run_job(serde_json::from_str(&json).unwrap());
    }
}

fn child(job: &Job) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["worker", "--exact", "--nocapture", "--test-threads=1"])
        .env(WORKER_ENV, serde_json::to_string(job).unwrap());
    cmd
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tch-fabric-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn temps(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .count()
}

/// splitmix64, seeded from the clock: every run kills at other moments (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

const TRIALS: u64 = 25;

#[test]
fn a_saver_killed_at_random_moments_never_breaks_the_checkpoint() {
    let d = dir("kills");
    let path = d.join("ckpt.safetensors");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng(seed);
    let f = fabric();
    let vs = model(&f, 4, 2048);
    let (mut mid_save, mut loaded) = (0, Vec::new());
    for trial in 0..TRIALS {
        let started = d.join(format!("started-{trial}"));
        let first = trial * 1_000_000 + 1;
        let mut c = child(&Job::SaveLoop {
            path: path.clone(),
            started: started.clone(),
            first,
        })
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let t0 = Instant::now();
        // The first trial waits for a first checkpoint: before it there is nothing to keep.
        while !started.exists() || (trial == 0 && !path.exists()) {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the saver did not start"
            );
            assert!(c.try_wait().unwrap().is_none(), "the saver died on its own");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(600)));
        if temps(&d) > 0 {
            mid_save += 1;
        }
        c.kill().unwrap();
        c.wait().unwrap();

        let v: u64 = f
            .load(&path)
            .unwrap_or_else(|e| panic!("trial {trial}: the checkpoint does not load: {e}"));
        assert!(
            v >= 1 && v < first + 1_000_000,
            "trial {trial}: version {v}"
        );
        for (name, t) in vs.variables() {
            let want = Tensor::full_like(&t, v as f64);
            assert!(t.equal(&want), "trial {trial}: {name} is not version {v}'s");
        }
        loaded.push(v);
        // The killed child's temporary file at most: the next save removes it.
        assert!(
            temps(&d) <= 1,
            "trial {trial}: {} temporary files",
            temps(&d)
        );
    }
    f.save(&path, &0u64).unwrap();
    assert_eq!(temps(&d), 0, "a save removes what killed saves left");
    eprintln!(
        "{TRIALS} kills (seed {seed}): {mid_save} while a temporary file existed; \
         {TRIALS}/{TRIALS} loads whole and equal to a saved version; versions {loaded:?}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_save_needs_at_most_one_extra_copy_of_the_weights() {
    let d = dir("memory");
    let out = child(&Job::Measure {
        path: d.join("ckpt.safetensors"),
    })
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("MEASURE ").map(|(_, m)| m))
        .unwrap_or_else(|| panic!("no measurement in {stdout}"));
    let m: Measure = serde_json::from_str(line).unwrap();
    let extra = m.peak_during_save.saturating_sub(m.rss_before);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "saving {:.0} MiB of weights (4 tensors, {} ms): peak resident set +{:.1} MiB = {:.2} \
         copies",
        mib(m.weight_bytes),
        m.save_ms,
        mib(extra),
        extra as f64 / m.weight_bytes as f64
    );
    assert!(
        extra <= m.weight_bytes,
        "a save took {:.1} MiB on top of {:.0} MiB of weights",
        mib(extra),
        mib(m.weight_bytes)
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A disk that fills up during a save (file size limited under the checkpoint's size): the
/// save returns an error naming the file, in both formats, the process lives on, the previous
/// checkpoint is whole and no temporary file is left. (A torch.save-format save used to abort
/// the process: libtorch's zip writer threw from a write callback.)
#[test]
fn a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint() {
    let d = dir("full");
    for name in ["ckpt.pt", "ckpt.safetensors"] {
        let path = d.join(name);
        let out = child(&Job::FullDisk {
            path: path.clone(),
            limit: 20 << 20,
        })
        .output()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{name}: {}\n{stdout}\n{stderr}",
            out.status
        );
        let line = stdout
            .lines()
            .find_map(|l| l.find("FULL ").map(|at| &l[at + 5..]))
            .unwrap_or_else(|| panic!("{name}: no error line in {stdout}"));
        assert!(line.contains(name), "{name}: {line}");
        println!("{name}: {line}");
        let f = fabric();
        let vs = model(&f, 4, 2048);
        let v: std::collections::BTreeMap<String, u64> = f.load(&path).unwrap();
        assert_eq!(v["version"], 1, "{name}");
        for (_, t) in vs.variables() {
            assert_eq!(t.double_value(&[0, 0]), 1.0, "{name}");
        }
        assert_eq!(temps(&d), 0, "{name}: temporary files left");
    }
    let _ = std::fs::remove_dir_all(&d);
}

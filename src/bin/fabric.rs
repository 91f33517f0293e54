//! `fabric run`: Lightning's launcher for tch-fabric programs. It validates the values, sets
//! the `LT_*` environment variables that `Fabric` reads (and `LT_CLI_USED=1`), and runs the
//! program: once, or with `--devices N` as N processes with torchrun's rendezvous variables
//! (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `LOCAL_RANK`, `WORLD_SIZE`). When a rank fails, the
//! others are stopped and the launcher says which rank failed and how.
use clap::{Parser, Subcommand};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};
use tch_fabric::Precision;

const PRECISION_HELP: &str = "\
Precision values (Lightning's):
  64-true     float64 parameters and compute
  32-true     float32 parameters and compute (the default)
  16-mixed    float32 parameters, float16 autocast, dynamic loss scaling
              (on CPU: bf16-mixed, unless the program opts into CPU float16)
  bf16-mixed  float32 parameters, bfloat16 autocast
  16-true     float16 parameters and compute
  bf16-true   bfloat16 parameters and compute
Legacy spellings: 64, 32, 16 (= 16-mixed), bf16 (= bf16-mixed).

With --devices N (N > 1) the program runs as N processes (DDP), each with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun sets them. If one exits with an
error, the others are stopped and fabric exits with that rank's exit code.";

/// How long ranks get to finish after an interrupt (they save checkpoints) or after being
/// told to stop, before they are killed.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "fabric",
    version,
    about = "Launch a tch-fabric program, as Lightning's `fabric run`"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROGRAM with the Fabric settings in its environment.
    #[command(after_help = PRECISION_HELP)]
    Run {
        /// The precision (see below); the program's Fabric picks it up from LT_PRECISION.
        #[arg(long)]
        precision: Option<String>,
        /// cpu, cuda, gpu or auto.
        #[arg(long)]
        accelerator: Option<String>,
        /// Number of devices on this machine: one process each.
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// auto, ddp or single_device (default: ddp with several devices).
        #[arg(long)]
        strategy: Option<String>,
        /// Number of machines taking part.
        #[arg(long, default_value_t = 1)]
        num_nodes: usize,
        /// This machine's index among them.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// The address of rank 0's machine (default: MASTER_ADDR, else 127.0.0.1).
        #[arg(long)]
        main_address: Option<String>,
        /// The rendezvous port (default: MASTER_PORT, else a free port).
        #[arg(long)]
        main_port: Option<u16>,
        /// The program and its arguments.
        #[arg(required = true, last = true, value_name = "PROGRAM [ARGS]")]
        program: Vec<String>,
    },
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("fabric: {msg}");
    ExitCode::from(2)
}

/// The exit code a shell would report for `status`.
fn code_of(status: ExitStatus) -> u8 {
    match status.code() {
        Some(code) => code.clamp(0, 255) as u8,
        None => (128 + status.signal().unwrap_or(0)).clamp(0, 255) as u8,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

fn main() -> ExitCode {
    let Cmd::Run {
        precision,
        accelerator,
        devices,
        strategy,
        num_nodes,
        node_rank,
        main_address,
        main_port,
        program,
    } = Cli::parse().command;

    if let Some(p) = &precision {
        if let Err(e) = p.parse::<Precision>() {
            return fail(&e.to_string());
        }
    }
    if let Some(a) = &accelerator {
        if !matches!(a.as_str(), "cpu" | "cuda" | "gpu" | "auto") {
            return fail(&format!(
                "invalid accelerator '{a}': must be one of cpu, cuda, gpu, auto"
            ));
        }
    }
    if let Some(s) = &strategy {
        if !matches!(s.as_str(), "auto" | "ddp" | "single_device") {
            return fail(&format!(
                "invalid strategy '{s}': must be one of auto, ddp, single_device"
            ));
        }
    }
    if devices == 0 {
        return fail("invalid devices 0: must be at least 1");
    }
    if num_nodes == 0 || node_rank >= num_nodes {
        return fail(&format!(
            "invalid node rank {node_rank} of {num_nodes} nodes: need 0 <= node_rank < num_nodes"
        ));
    }
    if main_port == Some(0) {
        return fail("invalid main port 0: must be in 1..65535");
    }

    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..])
        .env("LT_CLI_USED", "1")
        .env("LT_DEVICES", devices.to_string())
        .env("LT_NUM_NODES", num_nodes.to_string());
    if let Some(p) = &precision {
        cmd.env("LT_PRECISION", p);
    }
    if let Some(a) = &accelerator {
        cmd.env("LT_ACCELERATOR", a);
    }
    let world = devices * num_nodes;
    if let Some(s) = strategy
        .clone()
        .or_else(|| (world > 1).then(|| "ddp".to_string()))
    {
        cmd.env("LT_STRATEGY", s);
    }
    if world == 1 {
        return run_single(cmd, &program[0]);
    }

    let addr = main_address
        .or_else(|| std::env::var("MASTER_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let port = match main_port.or_else(|| {
        std::env::var("MASTER_PORT")
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }) {
        Some(p) => p,
        None => match free_port() {
            Ok(p) => p,
            Err(e) => return fail(&format!("cannot find a free port for the rendezvous: {e}")),
        },
    };
    cmd.env("MASTER_ADDR", &addr)
        .env("MASTER_PORT", port.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", devices.to_string())
        .env("NODE_RANK", node_rank.to_string());
    run_group(cmd, &program[0], devices, node_rank)
}

fn run_single(mut cmd: Command, program: &str) -> ExitCode {
    match cmd.status() {
        Ok(status) => {
            if status.code().is_none() {
                eprintln!("fabric: {program} {}", describe(status));
            }
            ExitCode::from(code_of(status))
        }
        Err(e) => {
            eprintln!("fabric: cannot run {program}: {e}");
            ExitCode::from(127)
        }
    }
}

/// A port the OS says is free now (the usual launcher race: another program may take it
/// before rank 0 binds it; rank 0 then fails with a clear error).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// The last SIGINT/SIGTERM the launcher received (0: none), forwarded to the ranks.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Sends `sig` to the process group of a rank (each rank leads its own group, so whatever it
/// started goes too).
fn signal_group(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory effects; a group that is already gone gives ESRCH.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

struct Rank {
    child: Child,
    status: Option<ExitStatus>,
}

fn run_group(mut cmd: Command, program: &str, devices: usize, node_rank: usize) -> ExitCode {
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let mut ranks: Vec<Rank> = Vec::with_capacity(devices);
    for local in 0..devices {
        let rank = node_rank * devices + local;
        // Each rank in its own process group: a terminal's Ctrl-C reaches the launcher only,
        // which forwards it once to every rank, and stopping a rank stops all it started.
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("GROUP_RANK", node_rank.to_string())
            .process_group(0);
        match cmd.spawn() {
            Ok(child) => ranks.push(Rank {
                child,
                status: None,
            }),
            Err(e) => {
                eprintln!("fabric: cannot run {program} as rank {rank}: {e}");
                stop_all(&mut ranks, libc::SIGKILL);
                reap(&mut ranks, Instant::now());
                return ExitCode::from(127);
            }
        }
    }

    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut interrupted: Option<i32> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if interrupted.is_none() {
                eprintln!("fabric: signal {sig}: passing it to every rank");
            }
            interrupted = Some(sig);
            stop_all(&mut ranks, sig);
            deadline.get_or_insert(Instant::now() + GRACE);
        }
        for (local, r) in ranks.iter_mut().enumerate() {
            if r.status.is_some() {
                continue;
            }
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    r.status = Some(status);
                    if !status.success() && failure.is_none() && interrupted.is_none() {
                        failure = Some((node_rank * devices + local, status));
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("fabric: cannot wait for rank {local}: {e}"),
            }
        }
        if let Some((rank, status)) = failure {
            if deadline.is_none() {
                eprintln!(
                    "fabric: rank {rank} {}; stopping the other ranks",
                    describe(status)
                );
                stop_all(&mut ranks, libc::SIGTERM);
                deadline = Some(Instant::now() + GRACE);
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop_all(&mut ranks, libc::SIGKILL);
            reap(&mut ranks, Instant::now() + GRACE);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    if let Some((rank, status)) = failure {
        eprintln!(
            "fabric: failed: rank {rank} of {} {}",
            ranks.len(),
            describe(status)
        );
        return ExitCode::from(code_of(status).max(1));
    }
    if let Some(sig) = interrupted {
        // The ranks' own code when they stopped cleanly on the signal (e.g. 130 after saving).
        let code = ranks
            .iter()
            .filter_map(|r| r.status)
            .map(code_of)
            .find(|c| *c != 0)
            .unwrap_or((128 + sig).clamp(0, 255) as u8);
        return ExitCode::from(code);
    }
    ExitCode::SUCCESS
}

/// Sends `sig` to every rank still running.
fn stop_all(ranks: &mut [Rank], sig: libc::c_int) {
    for r in ranks.iter().filter(|r| r.status.is_none()) {
        signal_group(&r.child, sig);
    }
}

/// Waits for every rank (after SIGKILL), so none is left behind as an orphan or a zombie.
fn reap(ranks: &mut [Rank], until: Instant) {
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        loop {
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    r.status = Some(status);
                    break;
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = r.child.kill();
                    r.status = r.child.wait().ok();
                    break;
                }
            }
        }
    }
}

//! Running a program as N ranks of a process group, as torchrun does: shared by the `fabric`
//! launcher and the demo (which relaunches itself with `--devices N`).
//!
//! Each rank gets `RANK` and `LOCAL_RANK` on top of the environment the caller prepared
//! (`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `LT_*`). When a rank fails, the others are
//! stopped (SIGTERM, then SIGKILL after a grace period) and reaped, so nothing is left behind;
//! SIGINT/SIGTERM sent to the launcher is forwarded to every rank.
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long ranks get to finish after an interrupt (they save checkpoints) or after being
/// told to stop, before they are killed.
const GRACE: Duration = Duration::from_secs(10);

/// The exit code a shell would report for `status`.
pub fn code_of(status: ExitStatus) -> u8 {
    match status.code() {
        Some(code) => code.clamp(0, 255) as u8,
        None => (128 + status.signal().unwrap_or(0)).clamp(0, 255) as u8,
    }
}

/// How a rank ended, in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

/// A port the OS says is free now (the usual launcher race: another program may take it
/// before rank 0 binds it; rank 0 then fails with a clear error).
pub fn free_port() -> std::io::Result<u16> {
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

pub fn run_group(mut cmd: Command, program: &str, devices: usize, node_rank: usize) -> ExitCode {
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

//! Running a program as one process, or as N ranks of a process group as torchrun does:
//! shared by the `fabric` launcher and the demo (which relaunches itself with `--devices N`).
//!
//! Each rank gets `RANK` and `LOCAL_RANK` on top of the environment the caller prepared
//! (`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `LT_*`). When a rank fails, the others are
//! stopped (SIGTERM, then SIGKILL after a grace period) and reaped, so nothing is left behind.
//! In every mode SIGINT/SIGTERM sent to the launcher reach every child exactly once, and every
//! child gets a parent-death signal (SIGKILL), so even a launcher killed with SIGKILL leaves no
//! process running.
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// The most processes one launcher starts on one machine: far above any device count, and
/// low enough that a mistyped `--devices` fails at once instead of forking until the machine
/// gives up.
pub const MAX_DEVICES: usize = 1024;

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

/// The last SIGINT/SIGTERM the launcher received (0: none), forwarded to the children.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Whether that signal came from the kernel (a terminal's Ctrl-C, sent to the whole
/// foreground process group) rather than from `kill` aimed at the launcher.
static FROM_KERNEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; reading a field and storing
    // into atomics is async-signal-safe. Positive codes are the kernel's (SI_KERNEL), the
    // others a process's (SI_USER, SI_QUEUE, SI_TKILL).
    let kernel = !info.is_null() && unsafe { (*info).si_code } > 0;
    FROM_KERNEL.store(kernel, Ordering::SeqCst);
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only touches atomics.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Makes the child die with SIGKILL when the launcher dies, however it dies.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher may have died before prctl: then no signal would ever come.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Sends `sig` to a rank: to its process group when it leads one (so whatever it started
/// goes too), else to the process alone.
fn signal(child: &Child, sig: libc::c_int, own_group: bool) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        let target = if own_group { -pid } else { pid };
        // SAFETY: kill has no memory effects; a process or group that is gone gives ESRCH.
        unsafe {
            libc::kill(target, sig);
        }
    }
}

struct Rank {
    child: Child,
    status: Option<ExitStatus>,
}

/// How the children are started.
#[derive(Clone, Copy)]
enum Mode {
    /// One process in the launcher's own process group, so that it keeps the terminal (it may
    /// read from it); a terminal's Ctrl-C reaches it directly and is not sent twice.
    Single,
    /// `devices` ranks of node `node_rank`, each leading its own process group: a terminal's
    /// Ctrl-C reaches the launcher only, which passes it once to every rank.
    Group { devices: usize, node_rank: usize },
}

/// Runs `cmd` as one process, passing on SIGINT/SIGTERM, and returns its exit code.
pub fn run_single(cmd: Command, program: &str) -> ExitCode {
    run(cmd, program, Mode::Single)
}

/// Runs `cmd` as `devices` ranks of node `node_rank` and returns the exit code of the first
/// rank that failed (the others are stopped then), or of the ranks after an interrupt.
pub fn run_group(cmd: Command, program: &str, devices: usize, node_rank: usize) -> ExitCode {
    run(cmd, program, Mode::Group { devices, node_rank })
}

fn run(mut cmd: Command, program: &str, mode: Mode) -> ExitCode {
    let (count, own_group) = match mode {
        Mode::Single => (1, false),
        Mode::Group { devices, .. } => (devices, true),
    };
    if count > MAX_DEVICES {
        eprintln!("fabric: {count} processes asked for: at most {MAX_DEVICES} per machine");
        return ExitCode::from(2);
    }
    install_handlers();
    die_with_parent(&mut cmd);
    let mut ranks: Vec<Rank> = Vec::with_capacity(count);
    for local in 0..count {
        if let Mode::Group { devices, node_rank } = mode {
            let rank = node_rank.saturating_mul(devices).saturating_add(local);
            cmd.env("RANK", rank.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("GROUP_RANK", node_rank.to_string())
                .process_group(0);
        }
        match cmd.spawn() {
            Ok(child) => ranks.push(Rank {
                child,
                status: None,
            }),
            Err(e) => {
                match mode {
                    Mode::Single => eprintln!("fabric: cannot run {program}: {e}"),
                    Mode::Group { .. } => {
                        eprintln!("fabric: cannot run {program} as rank {local}: {e}")
                    }
                }
                stop_all(&mut ranks, libc::SIGKILL, own_group);
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
            let from_tty = FROM_KERNEL.load(Ordering::SeqCst);
            // A single child shares the terminal's process group: a Ctrl-C reached it already.
            if own_group || !from_tty {
                if interrupted.is_none() && own_group {
                    eprintln!("fabric: signal {sig}: passing it to every rank");
                }
                stop_all(&mut ranks, sig, own_group);
            }
            interrupted = Some(sig);
            // Ranks may wait for each other in a collective: they are killed after the grace
            // period. A single program decides itself how long it takes to stop.
            if own_group {
                deadline.get_or_insert(Instant::now() + GRACE);
            }
        }
        for (local, r) in ranks.iter_mut().enumerate() {
            if r.status.is_some() {
                continue;
            }
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    r.status = Some(status);
                    if let Mode::Group { devices, node_rank } = mode {
                        if !status.success() && failure.is_none() && interrupted.is_none() {
                            failure = Some((
                                node_rank.saturating_mul(devices).saturating_add(local),
                                status,
                            ));
                        }
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
                stop_all(&mut ranks, libc::SIGTERM, own_group);
                deadline = Some(Instant::now() + GRACE);
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop_all(&mut ranks, libc::SIGKILL, own_group);
            reap(&mut ranks, Instant::now() + GRACE);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    if let Mode::Single = mode {
        let Some(status) = ranks.first().and_then(|r| r.status) else {
            return ExitCode::from(1);
        };
        if status.code().is_none() {
            eprintln!("fabric: {program} {}", describe(status));
        }
        return ExitCode::from(code_of(status));
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
fn stop_all(ranks: &mut [Rank], sig: libc::c_int, own_group: bool) {
    for r in ranks.iter().filter(|r| r.status.is_none()) {
        signal(&r.child, sig, own_group);
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

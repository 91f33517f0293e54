//! `fabric run`: Lightning's launcher for tch-fabric programs. It validates the values, sets
//! the `LT_*` environment variables that `Fabric` reads (and `LT_CLI_USED=1`), and runs the
//! program: once, or with `--devices N` as N processes with torchrun's rendezvous variables
//! (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `LOCAL_RANK`, `WORLD_SIZE`). When a rank fails, the
//! others are stopped and the launcher says which rank failed and how.
mod args;
mod launch;

use args::{parse, ArgError, Launch};
use launch::{free_port, run_group, run_single};
use std::process::{Command, ExitCode};

fn fail(msg: &str) -> ExitCode {
    eprintln!("fabric: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    match parse(std::env::args_os()) {
        Ok(launch) => run(launch),
        // --help and --version exit 0, malformed arguments 2, with clap's message.
        Err(ArgError::Clap(e)) => e.exit(),
        Err(ArgError::Invalid(msg)) => fail(&msg),
    }
}

fn run(l: Launch) -> ExitCode {
    let mut cmd = Command::new(&l.program[0]);
    cmd.args(&l.program[1..])
        .env("LT_CLI_USED", "1")
        .env("LT_DEVICES", l.devices.to_string())
        .env("LT_NUM_NODES", l.num_nodes.to_string());
    if let Some(p) = &l.precision {
        cmd.env("LT_PRECISION", p);
    }
    if let Some(a) = &l.accelerator {
        cmd.env("LT_ACCELERATOR", a);
    }
    if let Some(s) = l
        .strategy
        .clone()
        .or_else(|| (l.world > 1).then(|| "ddp".to_string()))
    {
        cmd.env("LT_STRATEGY", s);
    }
    if l.world == 1 {
        return run_single(cmd, &l.program[0]);
    }

    let addr = l
        .main_address
        .or_else(|| std::env::var("MASTER_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let port = match l.main_port {
        Some(p) => p,
        None => match std::env::var("MASTER_PORT") {
            // A MASTER_PORT that is set but not a port is a mistake to report, not to replace.
            Ok(v) => match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return fail(&format!("MASTER_PORT={v:?} is not a TCP port (1..65535)")),
            },
            Err(_) => match free_port() {
                Ok(p) => p,
                Err(e) => return fail(&format!("cannot find a free port for the rendezvous: {e}")),
            },
        },
    };
    cmd.env("MASTER_ADDR", &addr)
        .env("MASTER_PORT", port.to_string())
        .env("WORLD_SIZE", l.world.to_string())
        .env("LOCAL_WORLD_SIZE", l.devices.to_string())
        .env("NODE_RANK", l.node_rank.to_string());
    run_group(cmd, &l.program[0], l.devices, l.node_rank)
}

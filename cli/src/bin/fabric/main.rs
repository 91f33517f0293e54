//! `fabric run`: Lightning's launcher for tch-fabric programs. It validates the values, sets
//! the `LT_*` environment variables that `Fabric` reads (and `LT_CLI_USED=1`), and runs the
//! program: once, or with `--devices N` as N processes with torchrun's rendezvous variables
//! (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `LOCAL_RANK`, `WORLD_SIZE`). When a rank fails, the
//! others are stopped and the launcher says which rank failed and how.
mod launch;

use clap::{Parser, Subcommand};
use launch::{code_of, describe, free_port, run_group};
use std::process::{Command, ExitCode};
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

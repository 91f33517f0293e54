//! `fabric run`: Lightning's launcher for tch-fabric programs. It validates the values, sets
//! the `LT_*` environment variables that `Fabric` reads (and `LT_CLI_USED=1`), runs the
//! program and exits with its exit code.
use clap::{Parser, Subcommand};
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
Legacy spellings: 64, 32, 16 (= 16-mixed), bf16 (= bf16-mixed).";

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
        /// Number of devices.
        #[arg(long, default_value_t = 1)]
        devices: usize,
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
    if devices == 0 {
        return fail("invalid devices 0: must be at least 1");
    }

    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..])
        .env("LT_CLI_USED", "1")
        .env("LT_DEVICES", devices.to_string());
    if let Some(p) = &precision {
        cmd.env("LT_PRECISION", p);
    }
    if let Some(a) = &accelerator {
        cmd.env("LT_ACCELERATOR", a);
    }
    match cmd.status() {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
            None => {
                // Killed by a signal: report it the way shells do.
                use std::os::unix::process::ExitStatusExt;
                let sig = status.signal().unwrap_or(0);
                eprintln!("fabric: {} was killed by signal {sig}", program[0]);
                ExitCode::from((128 + sig).clamp(0, 255) as u8)
            }
        },
        Err(e) => {
            eprintln!("fabric: cannot run {}: {e}", program[0]);
            ExitCode::from(127)
        }
    }
}

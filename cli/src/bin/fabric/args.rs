//! The command line of `fabric run`: clap's parsing plus every range check, as one function
//! from arguments to a validated [`Launch`], so that tests (and the property tests below) can
//! drive it without starting a process.
use crate::launch::MAX_DEVICES;
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use tch_fabric::Precision;

/// The most machines one run spans: with [`MAX_DEVICES`] per machine the world size stays far
/// below c10d's limit (ranks are 32-bit integers there).
pub const MAX_NODES: usize = 65536;

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
error, the others are stopped and fabric exits with that rank's exit code. SIGINT and SIGTERM
are passed to the program (every rank); if fabric itself is killed, so are they.";

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
        /// Number of devices on this machine: one process each (1 to 1024).
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// auto, ddp or single_device (default: ddp with several devices).
        #[arg(long)]
        strategy: Option<String>,
        /// Number of machines taking part (1 to 65536).
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

/// A checked `fabric run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub precision: Option<String>,
    pub accelerator: Option<String>,
    /// 1 ..= [`MAX_DEVICES`].
    pub devices: usize,
    pub strategy: Option<String>,
    /// 1 ..= [`MAX_NODES`].
    pub num_nodes: usize,
    /// Below `num_nodes`.
    pub node_rank: usize,
    pub main_address: Option<String>,
    /// Never 0.
    pub main_port: Option<u16>,
    /// Not empty.
    pub program: Vec<String>,
    /// `devices * num_nodes`.
    pub world: usize,
}

/// Why the arguments were refused.
#[derive(Debug)]
pub enum ArgError {
    /// clap's own: a malformed or missing argument, or `--help` / `--version` (which clap
    /// prints and exits 0 for).
    Clap(clap::Error),
    /// A value out of range, in one line.
    Invalid(String),
}

/// Parses and checks the command line (`args[0]` is the program name).
pub fn parse<I, T>(args: I) -> Result<Launch, ArgError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
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
    } = Cli::try_parse_from(args).map_err(ArgError::Clap)?.command;
    let invalid = |m: String| Err(ArgError::Invalid(m));

    if let Some(p) = &precision {
        if let Err(e) = p.parse::<Precision>() {
            return invalid(e.to_string());
        }
    }
    if let Some(a) = &accelerator {
        if !matches!(a.as_str(), "cpu" | "cuda" | "gpu" | "auto") {
            return invalid(format!(
                "invalid accelerator '{a}': must be one of cpu, cuda, gpu, auto"
            ));
        }
    }
    if let Some(s) = &strategy {
        if !matches!(s.as_str(), "auto" | "ddp" | "single_device") {
            return invalid(format!(
                "invalid strategy '{s}': must be one of auto, ddp, single_device"
            ));
        }
    }
    if devices == 0 || devices > MAX_DEVICES {
        return invalid(format!(
            "invalid devices {devices}: must be in 1..={MAX_DEVICES} (one process per device on \
             this machine)"
        ));
    }
    if num_nodes == 0 || num_nodes > MAX_NODES {
        return invalid(format!(
            "invalid num_nodes {num_nodes}: must be in 1..={MAX_NODES}"
        ));
    }
    if node_rank >= num_nodes {
        return invalid(format!(
            "invalid node rank {node_rank} of {num_nodes} nodes: need 0 <= node_rank < num_nodes"
        ));
    }
    if main_port == Some(0) {
        return invalid("invalid main port 0: must be in 1..65535".into());
    }
    let Some(world) = devices.checked_mul(num_nodes) else {
        return invalid(format!(
            "devices {devices} x num_nodes {num_nodes} is too many processes"
        ));
    };
    if program.first().map_or(true, |p| p.is_empty()) {
        return invalid("no program to run: fabric run [OPTIONS] -- PROGRAM [ARGS]".into());
    }
    Ok(Launch {
        precision,
        accelerator,
        devices,
        strategy,
        num_nodes,
        node_rank,
        main_address,
        main_port,
        program,
        world,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    fn run(args: &[&str]) -> Result<Launch, ArgError> {
        parse(std::iter::once("fabric").chain(args.iter().copied()))
    }

    fn refused(args: &[&str], needle: &str) {
        match run(args) {
            Err(ArgError::Invalid(m)) => assert!(m.contains(needle), "{args:?}: {m}"),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn numbers_out_of_range_are_clear_errors() {
        refused(
            &["run", "--devices", "0", "--", "true"],
            "invalid devices 0",
        );
        refused(
            &["run", "--devices", "18446744073709551615", "--", "true"],
            "must be in 1..=1024",
        );
        refused(
            &["run", "--devices", "100000000000", "--", "true"],
            "invalid devices 100000000000",
        );
        refused(
            &[
                "run",
                "--devices",
                "9223372036854775808",
                "--num-nodes",
                "2",
                "--",
                "true",
            ],
            "invalid devices 9223372036854775808",
        );
        refused(
            &["run", "--num-nodes", "4294967296", "--", "true"],
            "invalid num_nodes",
        );
        refused(
            &["run", "--num-nodes", "2", "--node-rank", "2", "--", "true"],
            "invalid node rank 2 of 2",
        );
        refused(&["run", "--main-port", "0", "--", "true"], "main port 0");
        // Beyond usize and negative numbers are clap's errors, not panics.
        for v in ["99999999999999999999999", "-1", "1e3", ""] {
            assert!(
                matches!(
                    run(&["run", "--devices", v, "--", "true"]),
                    Err(ArgError::Clap(_))
                ),
                "{v}"
            );
        }
        let ok = run(&[
            "run",
            "--devices",
            "1024",
            "--num-nodes",
            "65536",
            "--",
            "x",
        ])
        .unwrap();
        assert_eq!(ok.world, 1024 * 65536);
    }

    /// Command lines of flags, values (numbers at the edges of every range, arbitrary text)
    /// and a program, in any order: `parse` never panics, and whatever it accepts holds its
    /// invariants. `PROPTEST_CASES` sets the number of cases (256 by default; CI runs 10,000).
    #[test]
    fn fuzz_the_argument_parser() {
        let flag = prop_oneof![
            Just("--devices"),
            Just("--num-nodes"),
            Just("--node-rank"),
            Just("--main-port"),
            Just("--precision"),
            Just("--accelerator"),
            Just("--strategy"),
            Just("--main-address"),
            Just("--"),
            Just("run"),
            Just("--help"),
        ]
        .prop_map(String::from);
        let number = prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..70_000).prop_map(|n| n.to_string()),
            Just("18446744073709551615".to_string()),
            Just("18446744073709551616".to_string()),
            Just("9223372036854775808".to_string()),
            Just("-1".to_string()),
            Just("65535".to_string()),
            Just("65536".to_string()),
        ];
        let word = prop_oneof![
            Just("16-mixed".to_string()),
            Just("cpu".to_string()),
            Just("ddp".to_string()),
            "\\PC{0,12}",
        ];
        let token = prop_oneof![3 => flag, 3 => number, 2 => word];
        // Mostly well-formed shapes (`run ... -- program`), so that the range checks are
        // reached and not only clap's errors.
        let args = (
            prop::bool::weighted(0.9),
            prop::collection::vec(token, 0..10),
            prop::bool::weighted(0.7),
        )
            .prop_map(|(run, mut middle, program)| {
                if run {
                    middle.insert(0, "run".into());
                }
                if program {
                    middle.extend(["--".to_string(), "true".to_string()]);
                }
                middle
            });
        let config = Config {
            failure_persistence: None,
            ..Config::default()
        };
        let cases = config.cases;
        let mut runner = TestRunner::new(config);
        let accepted = std::cell::Cell::new(0u32);
        runner
            .run(&args, |args| {
                let argv = std::iter::once("fabric".to_string()).chain(args.iter().cloned());
                if let Ok(l) = parse(argv) {
                    prop_assert!((1..=MAX_DEVICES).contains(&l.devices));
                    prop_assert!((1..=MAX_NODES).contains(&l.num_nodes));
                    prop_assert!(l.node_rank < l.num_nodes);
                    prop_assert_eq!(l.world, l.devices * l.num_nodes);
                    prop_assert!(l.main_port != Some(0));
                    prop_assert!(!l.program.is_empty());
                    accepted.set(accepted.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        eprintln!(
            "launcher arguments: {cases} cases, 0 panics ({} accepted)",
            accepted.get()
        );
    }
}

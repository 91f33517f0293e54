//! Data-parallel training through c10d (Gloo over loopback), launched by `fabric run
//! --devices N`: the same weights as one process on the whole batch, the same skipped steps on
//! every rank, a crashing rank that takes the others down, and bad rendezvous input that fails
//! fast.
//!
//! The ranks are this very test binary: run with `TCH_FABRIC_DDP_WORKER=<json config>` and the
//! filter `worker`, the `worker` test below trains instead of returning at once.
use serde::{Deserialize, Serialize};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tch::{nn, nn::Module, Device, Kind, Tensor};
use tch_fabric::{dist::DistributedSampler, Clip, Fabric, FusedAdamW, GradScalerConfig};

const WORKER_ENV: &str = "TCH_FABRIC_DDP_WORKER";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Config {
    precision: String,
    steps: usize,
    global_batch: i64,
    out: PathBuf,
    /// Steps whose loss is multiplied by inf on `inject_rank` only.
    inject_inf_steps: Vec<usize>,
    inject_rank: usize,
    /// Inject into `inject_rank`'s gradients after `backward` (after the gradient all-reduce)
    /// instead of into the loss: only the found_inf all-reduce can then keep ranks together.
    inject_after_backward: bool,
    crash: Option<(usize, usize)>,
    /// (rank, step): that rank stops making progress (alive, in a sleep) before the step.
    hang: Option<(usize, usize)>,
    /// The collective timeout.
    timeout_ms: u64,
    ckpt_every: usize,
    devices: Option<usize>,
    rendezvous_timeout_ms: u64,
    /// Micro-batches per optimizer step (gradient accumulation; 1: none).
    accumulate: usize,
    /// With accumulation: pause the gradient sync on all micro-batches but the last
    /// (`fabric.no_backward_sync`).
    no_sync: bool,
    /// Give the model a layer ("spare") that the forward never uses.
    unused_layer: bool,
    /// `FabricBuilder::find_unused_parameters`.
    find_unused: bool,
    /// Initial weights (safetensors, VarStore names) instead of rank 0's own initialisation.
    init: Option<PathBuf>,
    /// Also set up a second model that never runs (a GAN's other half on this step).
    idle_model: bool,
    /// (rank, how): that rank builds another model: "wider" (a hidden layer of 17, not 16),
    /// "transposed" (every rank has an extra [3, 4] weight, this one [4, 3]).
    variant: Option<(usize, String)>,
    /// (rank, step, how): that rank misuses the loop at that step: "skip_backward",
    /// "double_backward" (a second forward and backward), "no_sync_alone" (the step's backward
    /// under no_backward_sync on this rank only).
    misuse: Option<(usize, usize, String)>,
}

impl Config {
    fn new(precision: &str, out: &Path) -> Self {
        Config {
            precision: precision.into(),
            steps: 20,
            global_batch: 12,
            out: out.to_path_buf(),
            inject_inf_steps: vec![],
            inject_rank: 0,
            inject_after_backward: false,
            crash: None,
            hang: None,
            timeout_ms: 60_000,
            ckpt_every: 0,
            devices: None,
            rendezvous_timeout_ms: 20_000,
            accumulate: 1,
            no_sync: false,
            unused_layer: false,
            find_unused: false,
            init: None,
            idle_model: false,
            variant: None,
            misuse: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RankReport {
    rank: usize,
    world_size: usize,
    weights: Vec<f32>,
    skipped: Vec<usize>,
    scales: Vec<f64>,
    /// The step stored in the last checkpoint, as every rank loaded it at the end.
    loaded_step: Option<usize>,
    /// All-reduce collectives issued in each step.
    all_reduces: Vec<u64>,
}

fn mlp(vs: &nn::Path, hidden: i64) -> impl Module {
    nn::seq()
        .add(nn::linear(vs / "l1", 8, hidden, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs / "l2", hidden, 4, Default::default()))
}

/// The whole batch of step `step`, identical on every rank.
fn global_batch(step: usize, n: i64) -> (Tensor, Tensor) {
    tch::manual_seed(1000 + step as i64);
    let x = Tensor::randn([n, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([n, 4], (Kind::Float, Device::Cpu));
    (x, y)
}

fn train_rank(cfg: &Config) -> anyhow::Result<()> {
    // One thread per rank, as the Python reference runs (and the ranks share the cores).
    tch::set_num_threads(1);
    let mut builder = Fabric::builder()
        .precision(cfg.precision.as_str())
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(
            GradScalerConfig::default()
                .init_scale(1024.0)
                .growth_interval(4),
        )
        .rendezvous_timeout(Duration::from_millis(cfg.rendezvous_timeout_ms))
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .find_unused_parameters(cfg.find_unused);
    if let Some(d) = cfg.devices {
        builder = builder.devices(d);
    }
    let fabric = builder.clone().build()?;
    let (rank, world) = (fabric.global_rank(), fabric.world_size());
    // A second Fabric in the same process shares the group instead of joining again.
    let again = builder.build()?;
    assert_eq!((again.global_rank(), again.world_size()), (rank, world));
    drop(again);
    std::fs::write(
        cfg.out.join(format!("pid{rank}")),
        std::process::id().to_string(),
    )?;
    // A different initialisation on every rank: setup must broadcast rank 0's.
    tch::manual_seed(7 + 1000 * rank as i64);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let variant = cfg
        .variant
        .as_ref()
        .map(|(r, how)| (*r == rank, how.as_str()));
    let hidden = if variant == Some((true, "wider")) {
        17
    } else {
        16
    };
    let model = mlp(&vs.root(), hidden);
    if let Some((mine, "transposed")) = variant {
        let _ = vs
            .root()
            .zeros("extra", if mine { &[4, 3] } else { &[3, 4] });
    }
    if cfg.unused_layer {
        let _spare = nn::linear(vs.root() / "spare", 4, 4, Default::default());
    }
    if let Some(init) = &cfg.init {
        vs.load(init)?;
    }
    let opt = FusedAdamW::new(&vs, 1e-2).unwrap();
    let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    let mut idle_vs = nn::VarStore::new(Device::Cpu);
    let _idle = if cfg.idle_model {
        let m = nn::linear(idle_vs.root() / "idle", 4, 4, Default::default());
        Some(fabric.setup_module_named("idle", m, &mut idle_vs)?)
    } else {
        None
    };
    let rows: Vec<i64> = DistributedSampler::new(cfg.global_batch as usize, world, rank)?
        .shuffle(false)
        .indices()
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let rows = Tensor::from_slice(&rows);

    let mut skipped = Vec::new();
    let mut scales = Vec::new();
    let mut all_reduces = Vec::new();
    for step in 0..cfg.steps {
        let calls_before = fabric.process_group().all_reduce_calls();
        if cfg.crash == Some((rank, step)) {
            std::process::exit(3);
        }
        if cfg.hang == Some((rank, step)) {
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let (x, y) = global_batch(step, cfg.global_batch);
        let (x, y) = (x.index_select(0, &rows), y.index_select(0, &rows));
        opt.zero_grad().unwrap();
        let inject = rank == cfg.inject_rank && cfg.inject_inf_steps.contains(&step);
        let micro = cfg.accumulate.max(1);
        let (xs, ys) = (x.chunk(micro as i64, 0), y.chunk(micro as i64, 0));
        let misuse = match &cfg.misuse {
            Some((r, at, how)) if (*r, *at) == (rank, step) => how.as_str(),
            _ => "",
        };
        for (k, (x, y)) in xs.iter().zip(&ys).enumerate() {
            let alone = misuse == "no_sync_alone";
            let _sync = fabric.no_backward_sync(&model, alone || (cfg.no_sync && k + 1 < micro))?;
            if misuse == "skip_backward" {
                continue;
            }
            if misuse == "double_backward" {
                let again = model.forward(x).mse_loss(y, tch::Reduction::Mean);
                fabric.backward(&again)?;
            }
            let out = model.forward(x);
            let mut loss = {
                let _ac = fabric.autocast()?;
                out.mse_loss(y, tch::Reduction::Mean)
            };
            if micro > 1 {
                loss /= micro as f64;
            }
            if inject && !cfg.inject_after_backward {
                loss *= f64::INFINITY;
            }
            fabric.backward(&loss)?;
        }
        if inject && cfg.inject_after_backward {
            let (_, g) = &opt.gradients().unwrap()[0];
            let _ = g.shallow_clone().fill_(f64::INFINITY);
        }
        fabric.clip_gradients(&mut opt, Clip::norm(0.5))?;
        if opt.step()?.is_skipped() {
            skipped.push(step);
        }
        scales.push(fabric.loss_scale().unwrap());
        all_reduces.push(fabric.process_group().all_reduce_calls() - calls_before);
        if cfg.ckpt_every > 0 && (step + 1) % cfg.ckpt_every == 0 {
            fabric.save(cfg.out.join("ckpt.safetensors"), &(step + 1))?;
        }
    }
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut weights = Vec::new();
    for (_, t) in named {
        weights.extend(Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1))?);
    }
    // Rank 0 wrote the checkpoint; every rank reads it back.
    let loaded_step = if cfg.ckpt_every > 0 {
        Some(fabric.load::<usize>(cfg.out.join("ckpt.safetensors"))?)
    } else {
        None
    };
    let report = RankReport {
        rank,
        world_size: world,
        weights,
        skipped,
        scales,
        loaded_step,
        all_reduces,
    };
    std::fs::write(
        cfg.out.join(format!("rank{rank}.json")),
        serde_json::to_string(&report)?,
    )?;
    Ok(())
}

/// Not a test of its own: the entry point of the ranks (see the module docs).
#[test]
fn worker() {
    let Ok(json) = std::env::var(WORKER_ENV) else {
        return;
    };
    let cfg: Config = serde_json::from_str(&json).expect("worker config");
    if let Err(e) = train_rank(&cfg) {
        // One write, so that the ranks' lines do not interleave (tests count them).
        let line = format!("worker error: {e:#}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        std::process::exit(1);
    }
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tch-fabric-ddp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn clean_env(cmd: &mut Command) -> &mut Command {
    for v in [
        "LT_PRECISION",
        "LT_ACCELERATOR",
        "LT_DEVICES",
        "LT_STRATEGY",
        "LT_NUM_NODES",
        "LT_CLI_USED",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NODEID",
        "SLURM_JOB_NAME",
        "SLURM_JOB_ID",
        "SLURM_NODELIST",
        "TORCHELASTIC_USE_AGENT_STORE",
        "TORCHELASTIC_RESTART_COUNT",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// This test binary as a rank: `worker` only, quiet harness, one thread.
fn worker_args() -> Vec<String> {
    let exe = std::env::current_exe().unwrap().display().to_string();
    vec![
        exe,
        "worker".into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ]
}

/// Runs `cfg` on `devices` processes through `fabric run` (or alone when `devices` is 0) and
/// returns the launcher's output and how long it took.
fn launch(cfg: &Config, devices: usize, extra_env: &[(&str, String)]) -> (Output, Duration) {
    let mut cmd = if devices == 0 {
        let args = worker_args();
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        c
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
        c.args(["run", "--devices", &devices.to_string(), "--"])
            .args(worker_args());
        c
    };
    clean_env(&mut cmd).env(WORKER_ENV, serde_json::to_string(cfg).unwrap());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().expect("launch");
    (out, t0.elapsed())
}

fn report(dir: &Path, rank: usize) -> RankReport {
    let path = dir.join(format!("rank{rank}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the reference on one process and DDP on 2 and 3, and compares the final weights.
fn check_parity(precision: &str, tol: f32) {
    let single_dir = out_dir(&format!("single-{precision}"));
    let (out, _) = launch(&Config::new(precision, &single_dir), 0, &[]);
    assert_ok(&out, "single-process run");
    let single = report(&single_dir, 0);
    assert_eq!(single.world_size, 1);
    for world in [2, 3] {
        let dir = out_dir(&format!("ddp{world}-{precision}"));
        let (out, took) = launch(&Config::new(precision, &dir), world, &[]);
        assert_ok(&out, &format!("{precision} on {world} processes"));
        let rank0 = report(&dir, 0);
        assert_eq!(rank0.world_size, world);
        for r in 1..world {
            // Every rank stepped on the same averaged gradient: the same bits everywhere.
            assert_eq!(report(&dir, r).weights, rank0.weights, "rank {r} diverged");
        }
        let diff = max_abs_diff(&rank0.weights, &single.weights);
        eprintln!("{precision} x{world}: max |ddp - single| = {diff:e} ({took:.1?})");
        assert!(
            diff <= tol,
            "{precision} on {world} processes differs from one process by {diff}"
        );
    }
}

/// Gradient accumulation over 3 micro-batches per rank on 2 ranks, with
/// `fabric.no_backward_sync` on all but the last: one all-reduce per optimizer step (the
/// model fits one bucket) instead of 3, and the weights of one process on the whole batch.
#[test]
fn accumulation_with_no_backward_sync_syncs_once_per_step() {
    let single_dir = out_dir("accum-single");
    let (out, _) = launch(&Config::new("32-true", &single_dir), 0, &[]);
    assert_ok(&out, "single-process run");
    let single = report(&single_dir, 0);
    let mut results = Vec::new();
    for no_sync in [true, false] {
        let dir = out_dir(&format!("accum-{no_sync}"));
        let mut cfg = Config::new("32-true", &dir);
        (cfg.accumulate, cfg.no_sync) = (3, no_sync);
        let (out, _) = launch(&cfg, 2, &[]);
        assert_ok(&out, "accumulation on 2 processes");
        let (r0, r1) = (report(&dir, 0), report(&dir, 1));
        assert_eq!(r0.weights, r1.weights, "the ranks agree");
        let per_step = if no_sync { 1 } else { 3 };
        assert_eq!(
            r0.all_reduces,
            vec![per_step; cfg.steps],
            "no_sync={no_sync}"
        );
        let diff = max_abs_diff(&r0.weights, &single.weights);
        eprintln!("accumulate 3 x 2 ranks, no_sync={no_sync}: max |ddp - single| = {diff:e}");
        assert!(diff <= 1e-5, "differs from one process by {diff}");
        results.push(r0.weights);
    }
    let diff = max_abs_diff(&results[0], &results[1]);
    assert!(diff <= 1e-6, "syncing once or every micro-batch: {diff}");
}

/// Against Lightning Fabric's own DDP (PyTorch's DistributedDataParallel and its Reducer) on 2
/// processes, from the same weights and batches: libtorch's Reducer here too, so the averaged
/// gradients (multiplied by 1/2, then summed) and the weights agree to float32 rounding.
#[test]
fn ddp_matches_lightnings_ddp_32_true() {
    let dir = out_dir("lightning-ddp");
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = mlp(&vs.root(), 16);
    let init = dir.join("init.safetensors");
    vs.save(&init).unwrap();
    let mut cfg = Config::new("32-true", &dir);
    cfg.init = Some(init.clone());
    let reference = dir.join("lightning.safetensors");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ddp_reference.py");
    let out = clean_env(&mut Command::new(&python))
        .arg(&script)
        .arg(&init)
        .arg(&reference)
        .arg(cfg.steps.to_string())
        .arg(cfg.global_batch.to_string())
        .output()
        .expect("start python");
    assert_ok(&out, "Lightning's DDP");
    let (out, _) = launch(&cfg, 2, &[]);
    assert_ok(&out, "tch-fabric's DDP");
    // The report's weights are in VarStore name order: l1.bias, l1.weight, l2.bias, l2.weight.
    let want = Tensor::read_safetensors(&reference).unwrap();
    let mut want: Vec<(String, Tensor)> = want.into_iter().collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    let mut flat = Vec::new();
    for (_, t) in want {
        flat.extend(Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap());
    }
    let diff = max_abs_diff(&report(&dir, 0).weights, &flat);
    eprintln!("2 ranks, 20 AdamW steps: max |tch-fabric DDP - Lightning DDP| = {diff:e}");
    assert!(diff <= 2e-7, "differs from Lightning's DDP by {diff}");
}

/// PyTorch 2.13's torchrun serves the rendezvous store from its agent and says so
/// (`TORCHELASTIC_USE_AGENT_STORE=True`): the ranks join it as clients, rank 0 included, with
/// and without `--standalone`, and train as `fabric run`'s ranks do.
#[test]
fn torchrun_ranks_join_its_agent_store() {
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/torchrun");
    let single_dir = out_dir("torchrun-single");
    let (out, _) = launch(&Config::new("32-true", &single_dir), 0, &[]);
    assert_ok(&out, "single-process run");
    let single = report(&single_dir, 0);
    for standalone in [true, false] {
        let dir = out_dir(&format!("torchrun-{standalone}"));
        let mut cmd = Command::new(&torchrun);
        cmd.args(["--nproc-per-node", "2"]);
        if standalone {
            cmd.arg("--standalone");
        } else {
            let port = free_port().to_string();
            cmd.args(["--master-addr", "127.0.0.1", "--master-port", &port]);
        }
        cmd.arg("--no-python").args(worker_args());
        let cfg = Config::new("32-true", &dir);
        clean_env(&mut cmd).env(WORKER_ENV, serde_json::to_string(&cfg).unwrap());
        let out = cmd.output().expect("start torchrun");
        assert_ok(&out, &format!("torchrun (standalone: {standalone})"));
        let (r0, r1) = (report(&dir, 0), report(&dir, 1));
        assert_eq!((r0.world_size, r1.world_size), (2, 2));
        assert_eq!(r0.weights, r1.weights, "the ranks diverged");
        let diff = max_abs_diff(&r0.weights, &single.weights);
        assert!(diff <= 1e-5, "differs from one process by {diff}");
    }
}

#[test]
fn ddp_matches_one_process_on_the_whole_batch_32_true() {
    check_parity("32-true", 1e-5);
}

/// Not float32's tolerance: under bf16 autocast the weight gradient is a bfloat16 matmul whose
/// sum over the batch is rounded to bfloat16 on each rank before the ranks' halves are averaged,
/// so it rounds differently from one sum over the whole batch (measured: 4e-4 after 20 AdamW
/// steps of lr 1e-2, about 0.2% of how far the weights moved). Lightning's DDP has the same
/// property. The ranks still agree bit for bit.
#[test]
fn ddp_matches_one_process_on_the_whole_batch_bf16_mixed() {
    check_parity("bf16-mixed", 2e-3);
}

#[test]
fn fp16_overflow_on_one_rank_skips_the_same_steps_everywhere() {
    let dir = out_dir("fp16-skips");
    let mut cfg = Config::new("16-mixed", &dir);
    cfg.inject_inf_steps = vec![3, 9, 10];
    cfg.inject_rank = 1;
    cfg.ckpt_every = 5;
    for after_backward in [false, true] {
        cfg.inject_after_backward = after_backward;
        let (out, _) = launch(&cfg, 2, &[]);
        assert_ok(&out, "16-mixed with overflows");
        let (r0, r1) = (report(&dir, 0), report(&dir, 1));
        assert_eq!(
            r0.skipped,
            vec![3, 9, 10],
            "after backward: {after_backward}"
        );
        assert_eq!(r1.skipped, r0.skipped);
        assert_eq!(r1.scales, r0.scales, "loss scales diverged");
        assert_eq!(r1.weights, r0.weights);
        // Backed off at each overflow and grew after every 4 clean steps.
        assert_eq!(r0.scales[3], 512.0, "{:?}", r0.scales);
        // The checkpoint of step 20, written by rank 0, loads on both ranks.
        assert_eq!((r0.loaded_step, r1.loaded_step), (Some(20), Some(20)));
    }
}

fn alive(pid: &str) -> bool {
    // A reaped process has no /proc entry; a zombie would still say "Z" in its stat line.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn a_crashing_rank_stops_the_others_and_keeps_the_last_checkpoint() {
    let dir = out_dir("crash");
    let mut cfg = Config::new("32-true", &dir);
    cfg.crash = Some((1, 12));
    cfg.ckpt_every = 5;
    let (out, took) = launch(&cfg, 3, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("rank 1 exited with code 3"),
        "the launcher must name the failed rank:\n{stderr}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    for r in 0..3 {
        let pid = std::fs::read_to_string(dir.join(format!("pid{r}"))).unwrap();
        assert!(!alive(pid.trim()), "rank {r} (pid {pid}) is still running");
        assert!(!dir.join(format!("rank{r}.json")).exists());
    }
    // The checkpoint of step 10 is whole and loads.
    let fabric = Fabric::builder().accelerator("cpu").build().unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs.root(), 16);
    let opt = FusedAdamW::new(&vs, 1e-2).unwrap();
    let _ = fabric.setup(model, &mut vs, opt).unwrap();
    let step: usize = fabric.load(dir.join("ckpt.safetensors")).unwrap();
    assert_eq!(step, 10);
}

#[test]
fn a_port_in_use_is_a_clear_error_not_a_hang() {
    let dir = out_dir("port");
    let taken = TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cfg = Config::new("32-true", &dir);
    cfg.rendezvous_timeout_ms = 5_000;
    let (out, took) = launch(&cfg, 2, &[("MASTER_PORT", port.to_string())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rank 0 could not serve the rendezvous") && stderr.contains("rank 0"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn a_world_size_mismatch_is_a_clear_error_not_a_hang() {
    let dir = out_dir("mismatch");
    let free = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let rank0_of_2 = [
        ("WORLD_SIZE", "2".to_string()),
        ("RANK", "0".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ];

    // The program asks for 3 devices but was launched as one of 2 processes: refused at once.
    let mut cfg = Config::new("32-true", &dir);
    cfg.devices = Some(3);
    let (out, took) = launch(&cfg, 0, &rank0_of_2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("world size mismatch: WORLD_SIZE=2"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");

    // Through the launcher the same disagreement is Lightning's CLI conflict.
    let (out, _) = launch(&cfg, 2, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("conflicts with the value `--devices=2`"),
        "{stderr}"
    );

    // WORLD_SIZE says 2 but only rank 0 starts: the rendezvous times out with a message.
    cfg.devices = None;
    cfg.rendezvous_timeout_ms = 3_000;
    let (out, took) = launch(&cfg, 0, &rank0_of_2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rendezvous") && stderr.contains("world size 2"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// A parameter the loss never uses: with `find_unused_parameters(true)` the Reducer finds it
/// each backward and training goes on; without, the next backward fails naming it (c10d alone
/// gives only its index).
#[test]
fn unused_parameters_are_found_or_named() {
    let dir = out_dir("unused-found");
    let mut cfg = Config::new("32-true", &dir);
    cfg.steps = 4;
    cfg.unused_layer = true;
    cfg.find_unused = true;
    let (out, _) = launch(&cfg, 2, &[]);
    assert_ok(&out, "find_unused_parameters(true)");
    let (a, b) = (report(&dir, 0), report(&dir, 1));
    assert_eq!(a.weights, b.weights, "the ranks agree");

    // A second model set up but never run (a GAN's other half on this step): none of its
    // parameters is in the graph, so its Reducer has nothing to wait for.
    let dir = out_dir("idle-model");
    let mut cfg = Config::new("32-true", &dir);
    cfg.steps = 4;
    cfg.idle_model = true;
    let (out, _) = launch(&cfg, 2, &[]);
    assert_ok(&out, "a second model that never runs");

    let dir = out_dir("unused-named");
    let mut cfg = Config::new("32-true", &dir);
    cfg.steps = 4;
    cfg.unused_layer = true;
    let (out, _) = launch(&cfg, 2, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("spare.weight")
            && stderr.contains("spare.bias")
            && stderr.contains("find_unused_parameters(true)"),
        "the error names the unused parameters:\n{stderr}"
    );
    if let Some(line) = stderr.lines().find(|l| l.contains("spare.weight")) {
        eprintln!("without find_unused_parameters: {line}");
    }
}

/// A rank that hangs (alive, never reaching the next collective) ends the job within the
/// collective timeout, and the error names it.
#[test]
fn a_hung_rank_ends_the_job_within_the_timeout_and_is_named() {
    let dir = out_dir("hang");
    let mut cfg = Config::new("32-true", &dir);
    cfg.hang = Some((1, 5));
    cfg.timeout_ms = 3_000;
    let (out, took) = launch(&cfg, 3, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 1 (last at collective #") && stderr.contains("did not arrive"),
        "the error must name the hung rank:\n{stderr}"
    );
    assert!(
        !stderr.contains("rank 2 (last"),
        "rank 2 arrived and is not named:\n{stderr}"
    );
    let named = stderr
        .lines()
        .find(|l| l.contains("did not arrive"))
        .unwrap();
    eprintln!("a hung rank with a 3 s timeout: the job ended after {took:.1?}: {named}");
    // Start-up, five steps and the timeout; far less than the 30-minute default.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    for r in 0..3 {
        let pid = std::fs::read_to_string(dir.join(format!("pid{r}"))).unwrap();
        assert!(!alive(pid.trim()), "rank {r} (pid {pid}) is still running");
    }
}

/// The rendezvous store listens on MASTER_ADDR only: with a loopback master, nothing listens
/// on the machine's other addresses.
#[test]
fn the_rendezvous_store_binds_to_master_addr() {
    let dir = out_dir("bind");
    let free = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    // Rank 0 alone with WORLD_SIZE 2: it serves the store and waits for rank 1 meanwhile.
    let mut cfg = Config::new("32-true", &dir);
    cfg.rendezvous_timeout_ms = 20_000;
    let mut cmd = {
        let args = worker_args();
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        c
    };
    clean_env(&mut cmd)
        .env(WORKER_ENV, serde_json::to_string(&cfg).unwrap())
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stderr(std::process::Stdio::null());
    let mut rank0 = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rank 0 never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap()
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    rank0.kill().unwrap();
    rank0.wait().unwrap();
    // /proc/net/tcp lists "local_address:port" in hex; state 0A is LISTEN.
    let hex_port = format!(":{port:04X}");
    let mut bound = Vec::new();
    for line in listening.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 3 && fields[1].ends_with(&hex_port) && fields[3] == "0A" {
            bound.push(fields[1].to_string());
        }
    }
    assert_eq!(
        bound,
        vec![format!("0100007F{hex_port}")],
        "the store listens on 127.0.0.1 only"
    );
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for every child and checks that the 2 ranks formed one group and trained as one
/// process on the whole batch does.
fn check_two_ranks(children: Vec<std::process::Child>, dir: &Path, what: &str) {
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert_ok(&out, what);
    }
    let single_dir = out_dir(&format!("{what}-single"));
    let (out, _) = launch(&Config::new("32-true", &single_dir), 0, &[]);
    assert_ok(&out, "single-process run");
    let single = report(&single_dir, 0);
    let (r0, r1) = (report(dir, 0), report(dir, 1));
    assert_eq!(
        (r0.world_size, r1.world_size),
        (2, 2),
        "{what}: one group of 2"
    );
    assert_eq!(r0.weights, r1.weights, "{what}: the ranks agree");
    let diff = max_abs_diff(&r0.weights, &single.weights);
    assert!(diff <= 1e-5, "{what}: differs from one process by {diff}");
}

/// Two "machines" on loopback, each a `fabric run --num-nodes 2 --node-rank R` with
/// Lightning's flags, join one group of 2.
#[test]
fn two_nodes_on_loopback_join_one_group() {
    let dir = out_dir("two-nodes");
    let cfg = Config::new("32-true", &dir);
    let port = free_port().to_string();
    let children = (0..2)
        .map(|node| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
            c.args(["run", "--devices", "1", "--num-nodes", "2", "--node-rank"])
                .arg(node.to_string())
                .args(["--main-address", "127.0.0.1", "--main-port", &port, "--"])
                .args(worker_args());
            clean_env(&mut c)
                .env(WORKER_ENV, serde_json::to_string(&cfg).unwrap())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    check_two_ranks(children, &dir, "two nodes");
}

/// Two tasks started as SLURM's srun starts them (only SLURM's variables, set by hand) join
/// one group of 2.
#[test]
fn slurm_tasks_join_one_group() {
    let dir = out_dir("slurm");
    let cfg = Config::new("32-true", &dir);
    let port = free_port().to_string();
    let args = worker_args();
    let children = (0..2)
        .map(|rank| {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            clean_env(&mut c)
                .env(WORKER_ENV, serde_json::to_string(&cfg).unwrap())
                .env("SLURM_NTASKS", "2")
                .env("SLURM_NTASKS_PER_NODE", "2")
                .env("SLURM_PROCID", rank.to_string())
                .env("SLURM_LOCALID", rank.to_string())
                .env("SLURM_NODEID", "0")
                .env("SLURM_JOB_NAME", "train")
                .env("SLURM_NODELIST", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    check_two_ranks(children, &dir, "slurm");
}

/// Ranks that set up different models fail at setup, on every rank, naming the first parameter
/// that differs: different sizes used to abort rank 0 inside Gloo at the first backward, the
/// same element count in another shape to train and average mismatched layouts.
#[test]
fn ranks_with_different_models_fail_at_setup() {
    for (how, words) in [
        (
            "wider",
            "parameter 0 is 'l1.bias' [17] Float on rank 1 but 'l1.bias' [16] Float on rank 0",
        ),
        (
            "transposed",
            "'extra' [4, 3] Float on rank 1 but 'extra' [3, 4] Float on rank 0",
        ),
    ] {
        let dir = out_dir(&format!("variant-{how}"));
        let mut cfg = Config::new("32-true", &dir);
        cfg.steps = 2;
        cfg.variant = Some((1, how.to_string()));
        let (out, took) = launch(&cfg, 2, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{how}: {stderr}");
        assert!(
            !stderr.contains("terminate called"),
            "{how}: an abort\n{stderr}"
        );
        // Both ranks report it (each rank's error line starts with "worker error").
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(words)).collect();
        assert!(
            lines.len() >= 2,
            "{how}: every rank names the difference:\n{stderr}"
        );
        eprintln!("{how}: {} ({took:?})", lines[0]);
    }
}

/// A rank that skips a backward, runs two, or pauses the gradient sync alone fails on every
/// rank before any gradient is exchanged (these used to return Ok while the weights drifted
/// apart until a collective timed out, or never).
#[test]
fn call_order_mistakes_fail_on_every_rank_before_averaging() {
    for how in ["skip_backward", "double_backward", "no_sync_alone"] {
        let dir = out_dir(&format!("misuse-{how}"));
        let mut cfg = Config::new("32-true", &dir);
        cfg.steps = 4;
        cfg.misuse = Some((1, 1, how.to_string()));
        let (out, took) = launch(&cfg, 2, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{how}: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("different points of the training loop"))
            .collect();
        assert!(lines.len() >= 2, "{how}: every rank names it:\n{stderr}");
        assert!(
            took < Duration::from_millis(cfg.timeout_ms),
            "{how}: {took:?}"
        );
        eprintln!("{how}: {} ({took:?})", lines[0]);
    }
}

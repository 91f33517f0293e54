//! The `fabric run` launcher: values checked, LT_* variables set, exit codes passed through.
use std::process::Command;

fn fabric(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .env_remove("LT_PRECISION")
        .env_remove("LT_ACCELERATOR")
        .env_remove("LT_DEVICES")
        .env_remove("LT_CLI_USED")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .output()
        .expect("run fabric")
}

#[test]
fn run_sets_the_environment_and_returns_the_exit_code() {
    let out = fabric(&[
        "run",
        "--precision",
        "bf16-mixed",
        "--accelerator",
        "cpu",
        "--",
        "sh",
        "-c",
        "echo $LT_PRECISION $LT_ACCELERATOR $LT_DEVICES $LT_CLI_USED; exit 7",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "bf16-mixed cpu 1 1"
    );
    assert_eq!(out.status.code(), Some(7));

    let out = fabric(&["run", "--", "sh", "-c", "echo ${LT_PRECISION:-unset}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unset");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn bad_values_fail_before_running_anything() {
    for (args, needle) in [
        (
            vec!["run", "--precision", "fp16", "--", "true"],
            "Did you mean '16-mixed'?",
        ),
        (
            vec!["run", "--accelerator", "tpu", "--", "true"],
            "invalid accelerator 'tpu'",
        ),
        (
            vec!["run", "--devices", "0", "--", "true"],
            "invalid devices 0",
        ),
    ] {
        let out = fabric(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}"
        );
    }
    let out = fabric(&["run", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127));
    let out = fabric(&["run", "--precision", "16-mixed"]);
    assert_eq!(out.status.code(), Some(2), "a program is required");
}

#[test]
fn help_documents_the_precisions() {
    let out = fabric(&["run", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for p in [
        "64-true",
        "32-true",
        "16-mixed",
        "bf16-mixed",
        "16-true",
        "bf16-true",
    ] {
        assert!(help.contains(p), "{p} missing from --help");
    }
}

#[test]
fn devices_start_one_process_per_rank_with_torchrun_variables() {
    let out = fabric(&[
        "run",
        "--devices",
        "3",
        "--",
        "sh",
        "-c",
        "echo $RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $LT_DEVICES $LT_STRATEGY $MASTER_PORT",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines.len(), 3, "{stdout}");
    let port = lines[0].rsplit(' ').next().unwrap();
    assert!(port.parse::<u16>().unwrap() > 0);
    for (rank, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("{rank} {rank} 3 127.0.0.1 3 ddp {port}"),
            "every rank gets the same rendezvous"
        );
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    let t0 = std::time::Instant::now();
    let out = fabric(&[
        "run",
        "--devices",
        "2",
        "--",
        "sh",
        "-c",
        "if [ $RANK = 1 ]; then sleep 1; exit 5; fi; sleep 120",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("rank 1 exited with code 5"), "{stderr}");
    // Rank 0 (and the sleep it started, in its process group) was stopped, not waited for.
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn ctrl_c_is_passed_once_to_every_rank() {
    use std::io::Read;
    let dir = std::env::temp_dir().join(format!("tch-fabric-cli-int-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Each rank counts the SIGINTs it receives and exits 7 on the first one, after a moment.
    let script = format!(
        "trap 'echo int >> {d}/rank$RANK; sleep 1; exit 7' INT; touch {d}/ready$RANK; \
         while true; do sleep 0.1; done",
        d = dir.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["run", "--devices", "2", "--", "sh", "-c", &script])
        .env_remove("MASTER_PORT")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !(dir.join("ready0").exists() && dir.join("ready1").exists()) {
        assert!(t0.elapsed().as_secs() < 30, "the ranks did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(7), "the ranks' own exit code: {stderr}");
    for r in 0..2 {
        let got = std::fs::read_to_string(dir.join(format!("rank{r}"))).unwrap();
        assert_eq!(got, "int\n", "rank {r} got the signal exactly once");
    }
    assert!(
        !stderr.contains("failed"),
        "an interrupt is not a failure: {stderr}"
    );
}

#[test]
fn huge_numbers_are_clean_errors_not_panics() {
    for (args, needle) in [
        (
            vec!["run", "--devices", "18446744073709551615", "--", "true"],
            "invalid devices 18446744073709551615: must be in 1..=1024",
        ),
        (
            vec![
                "run",
                "--devices",
                "9223372036854775808",
                "--num-nodes",
                "2",
                "--",
                "true",
            ],
            "invalid devices 9223372036854775808",
        ),
        (
            vec!["run", "--devices", "100000000000", "--", "true"],
            "invalid devices 100000000000",
        ),
        (
            vec![
                "run",
                "--devices",
                "2",
                "--num-nodes",
                "100000",
                "--",
                "true",
            ],
            "invalid num_nodes 100000: must be in 1..=65536",
        ),
        (
            vec!["run", "--devices", "99999999999999999999999", "--", "true"],
            "invalid value",
        ),
    ] {
        let out = fabric(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing ran");
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-fabric-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for(paths: &[std::path::PathBuf]) {
    let t0 = std::time::Instant::now();
    while !paths.iter().all(|p| p.exists()) {
        assert!(t0.elapsed().as_secs() < 60, "{paths:?} did not appear");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `fabric run` of one process passes SIGTERM and SIGINT on (sent with `kill` to the launcher
/// alone), and exits with the program's own code once it stopped.
#[test]
fn a_single_process_gets_the_signals_sent_to_the_launcher() {
    for (sig, name) in [("-TERM", "TERM"), ("-INT", "INT")] {
        let dir = scratch(&format!("single-{name}"));
        let script = format!(
            "trap 'echo {name} >> {d}/got; exit 9' {name}; touch {d}/ready; \
             while true; do sleep 0.1; done",
            d = dir.display()
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_fabric"))
            .args(["run", "--", "sh", "-c", &script])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&[dir.join("ready")]);
        let sent = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(9),
            "{name}: the program's own exit code"
        );
        let got = std::fs::read_to_string(dir.join("got")).unwrap();
        assert_eq!(got, format!("{name}\n"), "{name} arrived exactly once");
    }
}

fn alive(pid: &str) -> bool {
    // A reaped process has no /proc entry; a zombie would still say "Z" in its stat line.
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// SIGKILL cannot be caught or passed on: the children die with the launcher through their
/// parent-death signal, in both modes.
#[test]
fn killing_the_launcher_with_sigkill_leaves_no_process_running() {
    for devices in ["1", "2"] {
        let dir = scratch(&format!("pdeath-{devices}"));
        let script = format!(
            "echo $$ > {}/pid${{RANK:-0}}; exec sleep 120",
            dir.display()
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_fabric"))
            .args(["run", "--devices", devices, "--", "sh", "-c", &script])
            .env_remove("MASTER_PORT")
            .spawn()
            .unwrap();
        let n: usize = devices.parse().unwrap();
        let pids: Vec<_> = (0..n).map(|r| dir.join(format!("pid{r}"))).collect();
        wait_for(&pids);
        // The files appear before the write ends: wait until each holds a pid.
        let read = |p: &std::path::PathBuf| loop {
            let s = std::fs::read_to_string(p).unwrap();
            if s.ends_with('\n') {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let pids: Vec<String> = pids.iter().map(read).collect();
        assert!(pids.iter().all(|p| alive(p)));
        child.kill().unwrap();
        child.wait().unwrap();
        let t0 = std::time::Instant::now();
        while pids.iter().any(|p| alive(p)) {
            assert!(
                t0.elapsed().as_secs() < 30,
                "devices {devices}: {pids:?} outlived the launcher"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

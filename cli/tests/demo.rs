//! The demo binary: argument errors are one clear line, user text trains, and an interrupted
//! run resumes along the very same trajectory.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SMALL: &[&str] = &[
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--block",
    "32",
    "--batch",
    "8",
];

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(args)
        .env_remove("LT_PRECISION")
        .env_remove("LT_CLI_USED")
        .output()
        .expect("run the demo")
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tch-fabric-demo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let d = dir("errors");
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = d.join("short.txt");
    std::fs::write(&short, "hello").unwrap();
    let exact = d.join("exact.txt");
    std::fs::write(&exact, "abcdefghij".repeat(33)).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--precision".into(), "fp16".into()],
            "Did you mean '16-mixed'?",
        ),
        (
            vec![
                "--precision".into(),
                "32-true".into(),
                "--data".into(),
                d.join("missing.txt").display().to_string(),
            ],
            "cannot read",
        ),
        (
            vec![
                "--precision".into(),
                "32-true".into(),
                "--data".into(),
                empty.display().to_string(),
            ],
            "empty",
        ),
        (
            vec![
                "--precision".into(),
                "32-true".into(),
                "--data".into(),
                short.display().to_string(),
            ],
            "at least",
        ),
        (
            vec![
                "--d-model".into(),
                "30".into(),
                "--heads".into(),
                "4".into(),
            ],
            "multiple of --heads",
        ),
        (
            vec!["--steps".into(), "0".into()],
            "--steps must be at least 1",
        ),
        (
            vec![
                "--precision".into(),
                "32-true".into(),
                "--resume".into(),
                "--out".into(),
                d.join("nothing").display().to_string(),
            ],
            "resuming 32-true",
        ),
        // Inputs that made the demo panic or abort (division by zero, overflow, an
        // allocation failing inside libtorch).
        (
            vec!["--checkpoint-every".into(), "0".into()],
            "--checkpoint-every must be at least 1",
        ),
        (
            vec!["--batch".into(), "200000".into()],
            "--batch must be in 1..=65536, not 200000",
        ),
        (
            vec!["--batch".into(), "1000000000000".into()],
            "--batch must be in 1..=65536",
        ),
        (
            vec!["--d-model".into(), "1000000".into()],
            "--d-model must be in 1..=65536",
        ),
        (
            vec!["--block".into(), "9223372036854775807".into()],
            "--block must be in 2..=65536",
        ),
        (
            vec!["--steps".into(), "18446744073709551615".into()],
            "--steps must be at most 1000000",
        ),
        (
            vec!["--devices".into(), "100000000000".into()],
            "--devices must be in 1..=1024",
        ),
        (
            vec!["--lr".into(), "NaN".into()],
            "--lr must be a finite number",
        ),
        (vec!["--eps=-1".into()], "--eps must be a finite number"),
        (
            vec!["--layers".into(), "0".into()],
            "--layers must be in 1..=1024",
        ),
        (
            vec![
                "--batch".into(),
                "65536".into(),
                "--block".into(),
                "4096".into(),
            ],
            "this machine has",
        ),
        (
            vec!["--data".into(), "/dev/zero".into()],
            "not a regular file",
        ),
        (
            // Exactly 10 x (block + 1) characters: no validation sequence fits.
            vec![
                "--precision".into(),
                "32-true".into(),
                "--block".into(),
                "32".into(),
                "--data".into(),
                exact.display().to_string(),
            ],
            "at least 340 are needed",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = demo(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    }
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn trains_on_a_users_text_file() {
    let d = dir("data");
    let text = d.join("poem.txt");
    std::fs::write(
        &text,
        "the rain in spain falls mainly on the plain. ".repeat(40),
    )
    .unwrap();
    let rep = d.join("r.json");
    let mut args = vec!["--precision", "bf16-mixed", "--steps", "15"];
    args.extend_from_slice(SMALL);
    let (t, o, r) = (
        text.display().to_string(),
        d.display().to_string(),
        rep.display().to_string(),
    );
    args.extend_from_slice(&["--data", &t, "--out", &o, "--report", &r]);
    let out = demo(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let rep = report(&rep);
    assert_eq!(rep["precision"], "bf16-mixed");
    let losses = rep["losses"].as_array().unwrap();
    assert_eq!(losses.len(), 15);
    let first = losses[0].as_f64().unwrap();
    let last = losses[14].as_f64().unwrap();
    assert!(last < first, "the loss falls: {first} -> {last}");
}

/// An uninterrupted run, and the same run stopped midway (Ctrl-C or a shorter --steps) then
/// resumed, give the same loss at every step, bit for bit.
#[test]
fn resume_continues_the_same_trajectory() {
    let full_dir = dir("full");
    let part_dir = dir("part");
    let run = |out: &Path, steps: &str, resume: bool, rep: &Path| {
        let (o, r) = (out.display().to_string(), rep.display().to_string());
        let mut args = vec![
            "--precision",
            "16-mixed",
            "--steps",
            steps,
            "--checkpoint-every",
            "5",
        ];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&["--out", &o, "--report", &r]);
        if resume {
            args.push("--resume");
        }
        let out = demo(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    run(&full_dir, "30", false, &full_dir.join("r.json"));
    run(&part_dir, "12", false, &part_dir.join("r.json"));
    run(&part_dir, "30", true, &part_dir.join("r2.json"));
    let a = report(&full_dir.join("r.json"));
    let b = report(&part_dir.join("r2.json"));
    assert_eq!(
        a["losses"], b["losses"],
        "the resumed run follows the same losses"
    );
    assert_eq!(a["loss_scale"], b["loss_scale"]);
    assert_eq!(a["val_loss"], b["val_loss"]);
    // The chart's history survives the resume: a time and the skips for every step.
    assert_eq!(a["skipped_at"], b["skipped_at"]);
    assert_eq!(b["step_s"].as_array().map(Vec::len), Some(30));
}

/// `--compare` trains 32-true and every precision that saves in a child process each, prints
/// the machine and where the tensor memory goes, and draws them all in one SVG, which parses
/// as XML and names every precision.
#[test]
fn compare_charts_every_precision() {
    let d = dir("compare");
    let o = d.display().to_string();
    let mut args = vec!["--steps", "4"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--out", &o]);
    let out = demo(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(d.join("compare.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for p in ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"] {
        // In the loss legend, under its tokens/s bar and under its memory bar.
        let n = texts.iter().filter(|t| t.starts_with(p)).count();
        assert!(n >= 3, "{p} appears {n} times: {texts:?}");
        let rep = report(&d.join(format!("{p}.report.json")));
        assert_eq!(rep["step_s"].as_array().map(Vec::len), Some(4), "{p}");
    }
    assert!(texts.contains(&"loss against wall-clock time"), "{texts:?}");
    assert!(texts.contains(&"tokens per second"), "{texts:?}");
    // 64-true saves nothing and is left out of the comparison.
    assert!(!d.join("64-true.report.json").exists());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The machine above the tables, memory in tensor bytes with where it goes.
    assert!(stdout.contains(" cores: "), "{stdout}");
    assert!(
        stdout.contains("Memory in MiB (CPU tensor bytes)"),
        "{stdout}"
    );
    assert!(stdout.contains("| optimizer state |"), "{stdout}");
    let bf16_true = report(&d.join("bf16-true.report.json"));
    let full = report(&d.join("32-true.report.json"));
    let half = |key: &str| bf16_true[key].as_f64().unwrap() / full[key].as_f64().unwrap();
    for key in ["params_mib", "grads_mib", "optimizer_mib"] {
        assert!((half(key) - 0.5).abs() < 0.01, "{key}: {}", half(key));
    }
}

fn interrupt(child: &std::process::Child) {
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn ctrl_c_keeps_a_checkpoint_to_resume_from() {
    use std::io::BufRead;
    let d = dir("sigint");
    let o = d.display().to_string();
    let ckpt = d.join("32-true.ckpt.safetensors");
    let mut args = vec![
        "--precision",
        "32-true",
        "--steps",
        "100000",
        "--checkpoint-every",
        "5",
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--out", &o]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The first periodic checkpoint shows training (and the Ctrl-C handler) is running.
    let t0 = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before = std::fs::metadata(&ckpt).unwrap().modified().unwrap();
    interrupt(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "a clean stop");
    assert!(std::fs::metadata(&ckpt).unwrap().modified().unwrap() >= before);

    // The resumed run starts where the stopped one ended.
    let mut args = vec![
        "--precision",
        "32-true",
        "--steps",
        "100000",
        "--resume",
        "--out",
        &o,
    ];
    args.extend_from_slice(SMALL);
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("resuming 32-true at step "), "{first}");
    interrupt(&child);
    assert_eq!(child.wait().unwrap().code(), Some(130));
}

/// `--devices 2`: two processes, each on half of every batch, follow the one-process run
/// (float32 tolerance: averaging two half-batch gradients rounds differently from one sum).
#[test]
fn two_processes_train_like_one() {
    let d = dir("ddp");
    let o = d.display().to_string();
    let run = |devices: &str, rep: &Path| {
        let r = rep.display().to_string();
        let mut args = vec![
            "--precision",
            "32-true",
            "--steps",
            "8",
            "--devices",
            devices,
        ];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&["--out", &o, "--report", &r]);
        let out = demo(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        report(rep)
    };
    let one = run("1", &d.join("one.json"));
    let two = run("2", &d.join("two.json"));
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "{a:?} vs {b:?}");
    }
    let (va, vb) = (
        one["val_loss"].as_f64().unwrap(),
        two["val_loss"].as_f64().unwrap(),
    );
    assert!((va - vb).abs() <= 1e-4 * va.abs(), "{va} vs {vb}");
}

/// The smallest text the demo accepts, 10 x (block + 2) characters, trains (its validation
/// split holds exactly one sequence).
#[test]
fn the_smallest_accepted_text_trains() {
    let d = dir("smallest");
    let text = d.join("t.txt");
    std::fs::write(&text, &"the cat. ".repeat(40)[..340]).unwrap();
    let (t, o, r) = (
        text.display().to_string(),
        d.display().to_string(),
        d.join("r.json").display().to_string(),
    );
    let mut args = vec!["--precision", "32-true", "--steps", "3"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--data", &t, "--out", &o, "--report", &r]);
    let out = demo(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(report(&d.join("r.json"))["val_loss"].as_f64().is_some());
}

/// Resuming with fewer --steps than the checkpoint holds is refused and leaves it untouched
/// (it used to be rewritten as the earlier step holding the later weights); resuming at
/// exactly its step trains nothing and rewrites nothing.
#[test]
fn resume_never_relabels_a_checkpoint_with_an_earlier_step() {
    let d = dir("fewer-steps");
    let o = d.display().to_string();
    let r = d.join("r.json").display().to_string();
    let run = |steps: &str, resume: bool| {
        let mut args = vec!["--precision", "32-true", "--steps", steps];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&["--out", &o, "--report", &r]);
        if resume {
            args.push("--resume");
        }
        demo(&args)
    };
    let out = run("4", false);
    assert!(out.status.success(), "{}", stderr(&out));
    let ckpt = d.join("32-true.ckpt.safetensors");
    let saved = std::fs::read(&ckpt).unwrap();

    let out = run("2", true);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is at step 4, past --steps 2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        saved,
        "the checkpoint is untouched"
    );

    let out = run("4", true);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        saved,
        "nothing to train, nothing rewritten"
    );
    assert_eq!(
        report(&d.join("r.json"))["losses"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

//! The `fabric run` launcher: values checked, LT_* variables set, exit codes passed through.
use std::process::Command;

fn fabric(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .env_remove("LT_PRECISION")
        .env_remove("LT_ACCELERATOR")
        .env_remove("LT_DEVICES")
        .env_remove("LT_CLI_USED")
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

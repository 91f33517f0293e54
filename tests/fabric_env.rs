//! `LT_*` environment variables, as Lightning reads them. The environment is process-wide, so
//! everything runs in one test of its own binary.
use tch_fabric::{Error, Fabric, Precision};

fn clear() {
    for k in [
        "LT_PRECISION",
        "LT_ACCELERATOR",
        "LT_DEVICES",
        "LT_STRATEGY",
        "LT_NUM_NODES",
        "WORLD_SIZE",
        "RANK",
        "LT_CLI_USED",
    ] {
        std::env::remove_var(k);
    }
}

#[test]
fn environment_overrides_code_and_cli_conflicts_fail() {
    clear();
    // The environment overrides what the code says, even without the CLI.
    std::env::set_var("LT_PRECISION", "64-true");
    std::env::set_var("LT_ACCELERATOR", "cpu");
    let f = Fabric::builder().build().unwrap();
    assert_eq!(f.precision(), Precision::F64True);
    assert_eq!(f.device(), tch::Device::Cpu);
    let f = Fabric::new("bf16-mixed").unwrap();
    assert_eq!(
        f.precision(),
        Precision::F64True,
        "env wins without LT_CLI_USED"
    );

    // Through the CLI, an explicit conflicting value is Lightning's error...
    std::env::set_var("LT_CLI_USED", "1");
    let e = Fabric::new("bf16-mixed").unwrap_err();
    assert!(matches!(e, Error::Usage(_)));
    assert_eq!(
        e.to_string(),
        "Your code has `Fabric(precision='bf16-mixed', ...)` but it conflicts with the value \
         `--precision=64-true` set through the CLI.  Remove it either from the CLI or from the \
         Lightning Fabric object."
    );
    let e = Fabric::new(16).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Your code has `Fabric(precision=16, ...)`"),
        "{e}"
    );
    // ... an equal value or no value is fine.
    assert_eq!(
        Fabric::new("64-true").unwrap().precision(),
        Precision::F64True
    );
    assert_eq!(
        Fabric::builder().build().unwrap().precision(),
        Precision::F64True
    );
    // Lightning's own default ("auto") is no conflict; another explicit value is.
    assert!(Fabric::builder().accelerator("auto").build().is_ok());
    let e = Fabric::builder().accelerator("gpu").build().unwrap_err();
    assert!(
        e.to_string().contains("`Fabric(accelerator='gpu', ...)`"),
        "{e}"
    );

    // Devices from the environment; a bad value names the variable's field, and several
    // devices without the launcher's rendezvous variables say how to launch.
    std::env::set_var("LT_DEVICES", "many");
    let e = Fabric::builder().build().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "devices",
                ..
            }
        ),
        "{e}"
    );
    std::env::set_var("LT_DEVICES", "2");
    let e = Fabric::builder().build().unwrap_err();
    assert!(
        matches!(&e, Error::Distributed(m) if m.contains("one per device")),
        "{e}"
    );
    std::env::set_var("LT_DEVICES", "1");
    assert!(Fabric::builder().build().is_ok());

    std::env::set_var("LT_PRECISION", "fp16");
    let e = Fabric::builder().build().unwrap_err();
    assert!(matches!(e, Error::InvalidPrecision { .. }), "{e}");

    // devices x num_nodes that does not fit in usize is refused, not wrapped (it wrapped to 0
    // for 2^63 x 2, and overflowed in debug builds).
    clear();
    std::env::set_var("LT_NUM_NODES", "2");
    std::env::set_var("LT_DEVICES", "9223372036854775808");
    let e = Fabric::builder().build().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "devices x num_nodes",
                ..
            }
        ),
        "{e}"
    );
    clear();
    let e = Fabric::builder()
        .devices(usize::MAX)
        .num_nodes(2)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("devices x num_nodes"), "{e}");

    // A variable set to bytes that are not UTF-8 is an error naming it, not ignored (which ran
    // 32-true on the CPU instead of what the launcher asked: #28). WORLD_SIZE likewise.
    for var in ["LT_PRECISION", "LT_ACCELERATOR", "WORLD_SIZE"] {
        clear();
        std::env::set_var(
            var,
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bf16-mixed\xff"),
        );
        let e = Fabric::builder().build().unwrap_err().to_string();
        assert!(e.contains(var) && e.contains("UTF-8"), "{var}: {e}");
    }
    clear();
}

//! `Precision`: every accepted value, aliases and their warnings, round trips, bad values.
mod common;

use common::warnings_of;
use tch::Kind;
use tch_fabric::{Error, Precision};

#[test]
fn canonical_values_parse_display_and_round_trip() {
    let expected = [
        ("64-true", Precision::F64True),
        ("32-true", Precision::F32True),
        ("16-mixed", Precision::F16Mixed),
        ("bf16-mixed", Precision::Bf16Mixed),
        ("16-true", Precision::F16True),
        ("bf16-true", Precision::Bf16True),
    ];
    for (s, p) in expected {
        let (parsed, warnings) = warnings_of(|| s.parse::<Precision>().unwrap());
        assert_eq!(parsed, p);
        assert!(warnings.is_empty(), "{s} must not warn: {warnings:?}");
        assert_eq!(p.to_string(), s);
        assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<Precision>(&json).unwrap(), p);
    }
    assert_eq!(Precision::ALL.len(), 6);
    assert_eq!(Precision::default(), Precision::F32True);
}

#[test]
fn aliases_map_as_lightning_and_warn_for_16_and_bf16() {
    let msg16 = "`precision=16` is supported for historical reasons but its usage is discouraged. \
                 Please set your precision to 16-mixed instead!";
    let msgbf16 =
        "`precision=bf16` is supported for historical reasons but its usage is discouraged. \
                   Please set your precision to bf16-mixed instead!";
    let cases: [(&str, Precision, Option<&str>); 4] = [
        ("64", Precision::F64True, None),
        ("32", Precision::F32True, None),
        ("16", Precision::F16Mixed, Some(msg16)),
        ("bf16", Precision::Bf16Mixed, Some(msgbf16)),
    ];
    for (s, p, warning) in cases {
        let (parsed, warnings) = warnings_of(|| s.parse::<Precision>().unwrap());
        assert_eq!(parsed, p, "{s}");
        assert_eq!(
            warnings,
            warning.map(str::to_string).into_iter().collect::<Vec<_>>(),
            "{s}"
        );
        // The alias does not survive a round trip: Display prints the canonical value.
        assert_eq!(parsed.to_string(), p.as_str());
    }
    let ints: [(i64, Precision, bool); 3] = [
        (64, Precision::F64True, false),
        (32, Precision::F32True, false),
        (16, Precision::F16Mixed, true),
    ];
    for (i, p, warns) in ints {
        let (parsed, warnings) = warnings_of(|| Precision::try_from(i).unwrap());
        assert_eq!(parsed, p);
        assert_eq!(warnings.len(), usize::from(warns), "{i}: {warnings:?}");
        if warns {
            assert_eq!(warnings[0], msg16);
        }
    }
}

const ALLOWED: &str =
    "Allowed precision values: ('16-true', '16-mixed', 'bf16-true', 'bf16-mixed', \
                       '32-true', '64-true', 64, 32, 16, '64', '32', '16', 'bf16')";

#[test]
fn bad_values_list_every_allowed_value_and_suggest() {
    let cases: [(&str, Option<&str>); 6] = [
        ("", None),
        ("16-mix", Some("16-mixed")),
        ("fp16", Some("16-mixed")),
        ("BF16-MIXED", Some("bf16-mixed")),
        ("128", None),
        ("transformer-engine", None),
    ];
    for (s, suggestion) in cases {
        let e = s.parse::<Precision>().unwrap_err();
        assert!(matches!(e, Error::InvalidPrecision { .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("Precision '{s}' is invalid. ")),
            "{msg}"
        );
        assert!(msg.contains(ALLOWED), "{msg}");
        match suggestion {
            Some(sug) => assert!(msg.ends_with(&format!("Did you mean '{sug}'?")), "{msg}"),
            None => assert!(!msg.contains("Did you mean"), "{msg}"),
        }
    }
    for i in [128i64, 0, -16, 8] {
        let msg = Precision::try_from(i).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("Precision {i} is invalid. ")),
            "{msg}"
        );
        assert!(msg.contains(ALLOWED), "{msg}");
    }
    assert!(serde_json::from_str::<Precision>("\"fp16\"").is_err());
    assert!(
        serde_json::from_str::<Precision>("16").is_err(),
        "serde uses strings only"
    );
}

#[test]
fn dtype_queries() {
    use Precision::*;
    let table = [
        (F64True, None, Kind::Double, Kind::Double, false),
        (F32True, None, Kind::Float, Kind::Float, false),
        (F16Mixed, Some(Kind::Half), Kind::Float, Kind::Half, true),
        (
            Bf16Mixed,
            Some(Kind::BFloat16),
            Kind::Float,
            Kind::BFloat16,
            false,
        ),
        (F16True, None, Kind::Half, Kind::Half, false),
        (Bf16True, None, Kind::BFloat16, Kind::BFloat16, false),
    ];
    for (p, autocast, param, input, scaler) in table {
        assert_eq!(p.autocast_dtype(), autocast, "{p}");
        assert_eq!(p.param_dtype(), param, "{p}");
        assert_eq!(p.input_dtype(), input, "{p}");
        assert_eq!(p.needs_grad_scaler(), scaler, "{p}");
        assert_eq!(p.is_mixed(), autocast.is_some(), "{p}");
    }
}

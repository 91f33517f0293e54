//! Every PyTorch GradScaler error, every refused configuration and every refused state.
mod common;

use common::scaler::Probe;
use tch::{nn, Device, Kind, Tensor};
use tch_fabric::{
    scaler::{AtMinScale, GradScalerState, ScalePolicy},
    Error, GradScaler, GradScalerConfig, TchOptimizer,
};

fn one() -> Tensor {
    Tensor::ones([], (Kind::Float, Device::Cpu))
}

fn ready() -> (GradScaler, Probe) {
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    let _ = scaler.scale(&one()).unwrap();
    let mut probe = Probe::new();
    probe.set_grad(b'0');
    (scaler, probe)
}

fn usage(e: Error) -> String {
    assert!(
        matches!(e, Error::Usage(_)),
        "expected a usage error, got {e:?}"
    );
    e.to_string()
}

#[test]
fn pytorch_usage_errors() {
    let (mut scaler, mut probe) = ready();
    scaler.unscale(&mut probe.opt).unwrap();
    assert_eq!(
        usage(scaler.unscale(&mut probe.opt).unwrap_err()),
        "unscale_() has already been called on this optimizer since the last update()."
    );
    scaler.step(&mut probe.opt).unwrap();
    assert_eq!(
        usage(scaler.unscale(&mut probe.opt).unwrap_err()),
        "unscale_() is being called after step()."
    );
    assert_eq!(
        usage(scaler.step(&mut probe.opt).unwrap_err()),
        "step() has already been called since the last update()."
    );
    scaler.update().unwrap();
    // After update every optimizer is ready again.
    scaler.step(&mut probe.opt).unwrap();
    scaler.update().unwrap();

    assert_eq!(
        usage(scaler.update().unwrap_err()),
        "No inf checks were recorded prior to update."
    );

    // An optimizer without gradients records no inf check.
    let vs = nn::VarStore::new(Device::Cpu);
    let _w = vs.root().zeros("w", &[3]);
    let mut empty = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    assert_eq!(
        usage(scaler.step(&mut empty).unwrap_err()),
        "No inf checks were recorded for this optimizer."
    );
}

#[test]
fn calls_before_scale_name_the_missing_scale() {
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    let mut probe = Probe::new();
    probe.set_grad(b'0');
    for (msg, what) in [
        (scaler.unscale(&mut probe.opt).unwrap_err(), "unscale_"),
        (scaler.step(&mut probe.opt).unwrap_err(), "step"),
        (scaler.update().unwrap_err(), "update"),
        (scaler.unscale_grads(&[one()]).unwrap_err(), "unscale_grads"),
    ] {
        let msg = usage(msg);
        assert!(
            msg.starts_with(&format!("Attempted {what} but _scale is None.")),
            "{msg}"
        );
    }
}

#[test]
fn fp16_gradients_are_refused_unless_allowed() {
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    let _ = scaler.scale(&one()).unwrap();
    let g = Tensor::ones([4], (Kind::Half, Device::Cpu));
    assert_eq!(
        usage(scaler.unscale_grads(&[g.shallow_clone()]).unwrap_err()),
        "Attempting to unscale FP16 gradients."
    );
    assert_eq!(g.double_value(&[0]), 1.0, "nothing was unscaled");

    let mut allowed = GradScaler::new(GradScalerConfig::default().allow_fp16_grads(true)).unwrap();
    let _ = allowed.scale(&one()).unwrap();
    allowed.unscale_grads(&[g.shallow_clone()]).unwrap();
    assert_eq!(g.double_value(&[0]), 1.0 / 65536.0);
}

#[test]
fn bad_configs_name_the_field_and_the_range() {
    let cases: Vec<(GradScalerConfig, &str)> = vec![
        (GradScalerConfig::default().init_scale(0.0), "init_scale"),
        (GradScalerConfig::default().init_scale(-1.0), "init_scale"),
        (
            GradScalerConfig::default().init_scale(f64::NAN),
            "init_scale",
        ),
        (
            GradScalerConfig::default().init_scale(f64::INFINITY),
            "init_scale",
        ),
        (GradScalerConfig::default().init_scale(1e39), "init_scale"),
        (
            GradScalerConfig::default().growth_factor(1.0),
            "growth_factor",
        ),
        (
            GradScalerConfig::default().growth_factor(0.5),
            "growth_factor",
        ),
        (
            GradScalerConfig::default().growth_factor(f64::INFINITY),
            "growth_factor",
        ),
        (
            GradScalerConfig::default().backoff_factor(1.0),
            "backoff_factor",
        ),
        (
            GradScalerConfig::default().backoff_factor(0.0),
            "backoff_factor",
        ),
        (
            GradScalerConfig::default().backoff_factor(-0.5),
            "backoff_factor",
        ),
        (
            GradScalerConfig::default().backoff_factor(f64::NAN),
            "backoff_factor",
        ),
        (
            GradScalerConfig::default().growth_interval(0),
            "growth_interval",
        ),
        (
            GradScalerConfig::default().growth_interval(-5),
            "growth_interval",
        ),
        (
            GradScalerConfig::default().growth_interval(1 << 40),
            "growth_interval",
        ),
        (
            GradScalerConfig::default().policy(ScalePolicy::default().min_scale(0.0)),
            "min_scale",
        ),
        (
            GradScalerConfig::default()
                .policy(ScalePolicy::default().min_scale(4.0).max_scale(2.0)),
            "max_scale",
        ),
        (
            GradScalerConfig::default().policy(ScalePolicy::default().hysteresis(0)),
            "hysteresis",
        ),
    ];
    for (config, field) in cases {
        let e = GradScaler::new(config.clone()).unwrap_err();
        match &e {
            Error::InvalidConfig { field: f, .. } => assert_eq!(*f, field, "{e}"),
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("invalid {field} = ")), "{msg}");
        assert!(msg.contains("must be"), "{msg}");
    }
}

#[test]
fn bad_states_are_refused_and_nothing_is_half_applied() {
    let (mut scaler, mut probe) = ready();
    common::scaler::run(&mut scaler, &mut probe, b"0010");
    let before = scaler.state_dict().unwrap();

    let e = scaler
        .load_state_dict(&GradScalerState::default())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot load state: The source state dict is empty, possibly because it was saved from a \
         disabled instance of GradScaler."
    );
    let e = GradScalerState::from_json("{}")
        .map(|s| scaler.load_state_dict(&s))
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("The source state dict is empty"));

    let mut missing = before.clone();
    missing.growth_tracker = None;
    missing.scale = Some(8.0);
    let e = scaler.load_state_dict(&missing).unwrap_err();
    assert!(
        e.to_string().contains("missing key '_growth_tracker'"),
        "{e}"
    );

    for (patch, field) in [
        (r#"{"backoff_factor": 1.5}"#, "backoff_factor"),
        (r#"{"growth_factor": 0.9}"#, "growth_factor"),
        (r#"{"growth_interval": 0}"#, "growth_interval"),
        (r#"{"scale": -2.0}"#, "scale"),
        (r#"{"_growth_tracker": -1}"#, "_growth_tracker"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&before.to_json()).unwrap();
        let p: serde_json::Value = serde_json::from_str(patch).unwrap();
        for (k, x) in p.as_object().unwrap() {
            v[k] = x.clone();
        }
        let state = GradScalerState::from_json(&v.to_string()).unwrap();
        let e = scaler.load_state_dict(&state).unwrap_err();
        assert!(matches!(e, Error::InvalidState(_)), "{e:?}");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    // Wrong types and unknown keys fail to parse.
    assert!(GradScalerState::from_json(r#"{"scale": "big"}"#).is_err());
    assert!(GradScalerState::from_json(r#"{"growth_interval": 2.5}"#).is_err());
    assert!(GradScalerState::from_json(r#"{"scales": 2.0}"#).is_err());
    assert!(GradScalerState::from_json("[1, 2]").is_err());

    assert_eq!(
        scaler.state_dict().unwrap(),
        before,
        "failed loads changed nothing"
    );
    assert_eq!(scaler.config().clone(), GradScalerConfig::default());
}

#[test]
fn update_to_sets_the_scale_and_refuses_bad_values() {
    let (mut scaler, mut probe) = ready();
    common::scaler::run(&mut scaler, &mut probe, b"00");
    scaler.update_to(1024.0).unwrap();
    assert_eq!(scaler.get_scale().unwrap(), 1024.0);
    assert_eq!(
        scaler.growth_tracker().unwrap(),
        2,
        "update_to leaves the tracker alone"
    );
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = scaler.update_to(bad).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    field: "new_scale",
                    ..
                }
            ),
            "{e}"
        );
    }
    assert_eq!(scaler.get_scale().unwrap(), 1024.0);
}

#[test]
fn disabled_scaler_passes_through() {
    let mut scaler = GradScaler::new(GradScalerConfig::default().enabled(false)).unwrap();
    assert!(!scaler.is_enabled());
    let loss = Tensor::from(3.0f32);
    assert_eq!(scaler.scale(&loss).unwrap().double_value(&[]), 3.0);
    assert_eq!(scaler.get_scale().unwrap(), 1.0);
    let mut probe = Probe::new();
    probe.set_grad(b'1');
    assert!(!scaler.step(&mut probe.opt).unwrap().is_skipped());
    scaler.update().unwrap();
    assert!(scaler.state_dict().unwrap().is_empty());
    assert_eq!(scaler.state_dict().unwrap().to_json(), "{}");
}

#[test]
fn policy_at_minimum_errors_without_changing_state() {
    let policy = ScalePolicy::default()
        .min_scale(16.0)
        .at_min(AtMinScale::Error);
    let mut scaler =
        GradScaler::new(GradScalerConfig::default().init_scale(32.0).policy(policy)).unwrap();
    let mut probe = Probe::new();
    common::scaler::run(&mut scaler, &mut probe, b"1");
    assert_eq!(scaler.get_scale().unwrap(), 16.0);
    scaler.step(&mut probe.opt).unwrap();
    let e = scaler.update().unwrap_err();
    assert!(e.to_string().contains("already at minimum"), "{e}");
    assert_eq!(scaler.get_scale().unwrap(), 16.0);
}

//! Autocast scopes: nesting, the cast cache, panic safety, per-thread state, refused inputs.
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{Device, Kind, Tensor};
use tch_fabric::{
    autocast,
    autocast::{autocast_state, AutocastState},
    Autocast, Error,
};

fn cpu_state() -> AutocastState {
    autocast_state(Device::Cpu).unwrap()
}

fn ones() -> Tensor {
    Tensor::ones([2, 2], (Kind::Float, Device::Cpu))
}

#[test]
fn cpu_defaults_and_restore() {
    let before = cpu_state();
    assert_eq!(
        before,
        AutocastState {
            enabled: false,
            dtype: Some(Kind::BFloat16),
            cache_enabled: true
        }
    );
    {
        let _g = autocast(Device::Cpu, Kind::Half).unwrap();
        let s = cpu_state();
        assert!(s.enabled);
        assert_eq!(s.dtype, Some(Kind::Half));
        assert_eq!(ones().mm(&ones()).kind(), Kind::Half);
    }
    assert_eq!(cpu_state(), before);
    assert_eq!(ones().mm(&ones()).kind(), Kind::Float);
}

#[test]
fn nesting_inner_disabled_and_inner_other_dtype() {
    let _outer = autocast(Device::Cpu, Kind::BFloat16).unwrap();
    assert_eq!(ones().mm(&ones()).kind(), Kind::BFloat16);
    {
        let _inner = Autocast::new(Device::Cpu, Kind::BFloat16)
            .enabled(false)
            .enter()
            .unwrap();
        assert_eq!(ones().mm(&ones()).kind(), Kind::Float);
        {
            let _innermost = autocast(Device::Cpu, Kind::Half).unwrap();
            assert_eq!(ones().mm(&ones()).kind(), Kind::Half);
        }
        assert_eq!(ones().mm(&ones()).kind(), Kind::Float);
    }
    assert_eq!(ones().mm(&ones()).kind(), Kind::BFloat16);
    assert!(cpu_state().enabled);
}

#[test]
fn state_is_restored_after_a_panic() {
    let before = cpu_state();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _g = autocast(Device::Cpu, Kind::Half).unwrap();
        assert!(cpu_state().enabled);
        panic!("boom inside the scope");
    }));
    assert!(r.is_err());
    assert_eq!(cpu_state(), before);
    assert_eq!(ones().mm(&ones()).kind(), Kind::Float);

    let r = catch_unwind(AssertUnwindSafe(|| {
        Autocast::new(Device::Cpu, Kind::BFloat16)
            .run(|| panic!("boom in the closure form"))
            .unwrap()
    }));
    assert!(r.is_err());
    assert_eq!(cpu_state(), before);
}

#[test]
fn state_is_per_thread() {
    let _g = autocast(Device::Cpu, Kind::BFloat16).unwrap();
    let other = std::thread::spawn(|| (cpu_state().enabled, ones().mm(&ones()).kind()))
        .join()
        .unwrap();
    assert_eq!(other, (false, Kind::Float));
    assert!(cpu_state().enabled);
}

#[test]
fn closure_form_returns_the_value() {
    let k = Autocast::new(Device::Cpu, Kind::BFloat16)
        .run(|| ones().mm(&ones()).kind())
        .unwrap();
    assert_eq!(k, Kind::BFloat16);
    assert!(!cpu_state().enabled);
}

#[test]
fn unsupported_combinations_are_errors() {
    for kind in [Kind::Float, Kind::Double, Kind::Int64] {
        let e = autocast(Device::Cpu, kind).unwrap_err();
        assert!(matches!(e, Error::UnsupportedAutocast { .. }), "{e}");
        assert!(e.to_string().contains("BFloat16"), "{e}");
    }
    if !tch::Cuda::is_available() {
        let e = autocast(Device::Cuda(0), Kind::Half).unwrap_err();
        assert!(e.to_string().contains("no CUDA device"), "{e}");
    }
    let e = autocast(Device::Cuda(1000), Kind::Half).unwrap_err();
    assert!(matches!(e, Error::UnsupportedAutocast { .. }), "{e}");
    let e = autocast(Device::Mps, Kind::Half).unwrap_err();
    assert!(
        e.to_string().contains("Device::Cpu and Device::Cuda"),
        "{e}"
    );
    // A refused scope leaves no trace.
    assert!(!cpu_state().enabled);
}

//! The autocast weight-cast cache. libtorch keeps one cache per process and clears it whenever
//! any thread's outermost scope ends, so this test lives alone in its own test binary: a
//! parallel test leaving a scope would clear the cache under it.
use tch::{Device, Kind, Tensor};
use tch_fabric::{autocast, autocast::autocast_state, Autocast};

fn ones() -> Tensor {
    Tensor::ones([2, 2], (Kind::Float, Device::Cpu))
}

/// The weight-cast cache keeps the low-precision copy of a float32 leaf that requires grad,
/// without looking at later in-place changes: a stale result shows the cache is alive, a fresh
/// one that it was cleared.
#[test]
fn cache_lives_across_inner_scopes_and_is_cleared_at_the_outermost_exit() {
    let w = Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let x = ones();
    let change_w = |v: f64| {
        tch::no_grad(|| {
            let _ = w.shallow_clone().fill_(v);
        })
    };
    let first = |t: Tensor| t.double_value(&[0, 0]);

    {
        let _outer = autocast(Device::Cpu, Kind::BFloat16).unwrap();
        assert_eq!(first(x.mm(&w)), 2.0); // caches bf16(w)
        {
            let _inner = autocast(Device::Cpu, Kind::BFloat16).unwrap();
            change_w(3.0);
            assert_eq!(first(x.mm(&w)), 2.0, "inner scope sees the cached cast");
        }
        // The inner exit was not the outermost: the cache survives.
        assert_eq!(first(x.mm(&w)), 2.0, "cache must survive an inner exit");
    }
    {
        let _again = autocast(Device::Cpu, Kind::BFloat16).unwrap();
        assert_eq!(
            first(x.mm(&w)),
            6.0,
            "cache must be cleared at the outermost exit"
        );
    }

    // With the cache off, every cast is fresh.
    let _nocache = Autocast::new(Device::Cpu, Kind::BFloat16)
        .cache_enabled(false)
        .enter()
        .unwrap();
    assert!(!autocast_state(Device::Cpu).unwrap().cache_enabled);
    assert_eq!(first(x.mm(&w)), 6.0);
    change_w(1.0);
    assert_eq!(first(x.mm(&w)), 2.0);
}

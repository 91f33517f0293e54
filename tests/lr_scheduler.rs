//! PyTorch's learning-rate schedulers against `torch.optim.lr_scheduler` itself: the rates (and
//! OneCycleLR's momenta) over 1,000 steps must be the same bits. Also: skipped steps do not
//! advance a schedule, state round-trips through serde, bad options and states are typed
//! errors that change nothing.
//!
//! The PyTorch side runs live through the provisioned Python (`.venv/bin/python`, a second).
mod common;

use std::f64::consts::PI;
use tch::{nn, Device};
use tch_fabric::lr_scheduler::{
    Anneal, ConstantLR, CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR, MultiStepLR,
    OneCycle, OneCycleLR, Scheduler, SchedulerState, SequentialLR, StepLR,
};
use tch_fabric::optim::Group;
use tch_fabric::{AdamW, Error, Fabric, FabricOptimizer, Sgd, StepOutcome, TchOptimizer};

const N: usize = 1000;

const PYTHON: &str = r#"
import json, math, struct, warnings, torch
from torch.optim import lr_scheduler as L
warnings.filterwarnings("ignore")
N = 1000
def bits(v): return struct.unpack("<Q", struct.pack("<d", v))[0]
def lam(s): return min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / N))
cases = {
    "lambda": ("sgd", lambda o: L.LambdaLR(o, lam)),
    "step": ("sgd", lambda o: L.StepLR(o, 30, 0.7)),
    "multistep": ("sgd", lambda o: L.MultiStepLR(o, [100, 300, 300, 700], 0.5)),
    "constant": ("sgd", lambda o: L.ConstantLR(o, 0.25, 40)),
    "linear": ("sgd", lambda o: L.LinearLR(o, 0.01, 1.0, 100)),
    "exponential": ("sgd", lambda o: L.ExponentialLR(o, 0.995)),
    "cosine": ("sgd", lambda o: L.CosineAnnealingLR(o, 300, 1e-5)),
    "onecycle": ("sgd", lambda o: L.OneCycleLR(o, 0.5, total_steps=N + 1)),
    "onecycle_adam_linear_three_phase": ("adam", lambda o: L.OneCycleLR(
        o, 0.5, total_steps=N + 1, anneal_strategy="linear", three_phase=True, pct_start=0.25)),
    "warmup_cosine": ("sgd", lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, 1.0, 50), L.CosineAnnealingLR(o, 950, 0.0)], [50])),
    "constant_exponential_step": ("sgd", lambda o: L.SequentialLR(
        o, [L.ConstantLR(o, 0.1, 20), L.ExponentialLR(o, 0.99), L.StepLR(o, 100, 0.5)], [20, 400])),
}
out = {}
for name, (kind, make) in cases.items():
    # Two param groups with their own rates: every schedule runs per group.
    p, q = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    groups = [{"params": [p]}, {"params": [q], "lr": 0.03}]
    o = torch.optim.Adam(groups, lr=0.1) if kind == "adam" else torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    mom = (lambda: o.param_groups[0]["betas"][0]) if kind == "adam" else (lambda: o.param_groups[0]["momentum"])
    rates = lambda: [g["lr"] for g in o.param_groups]
    s = make(o)
    lrs, moms = [rates()], [mom()]
    for _ in range(N):
        o.step()
        s.step()
        lrs.append(rates())
        moms.append(mom())
    out[name] = {"lr": [[bits(v) for v in r] for r in lrs], "momentum": [bits(v) for v in moms]}
print(json.dumps(out))
"#;

fn lam(s: i64) -> f64 {
    ((s + 1) as f64 / 50.0).min(1.0) * 0.5 * (1.0 + (PI * s as f64 / N as f64).cos())
}

/// A Fabric optimizer over one parameter: SGD(lr=0.1, momentum=0.9), or Adam(lr=0.1) (its
/// beta1 is the momentum OneCycleLR cycles).
fn optimizer(adam: bool) -> FabricOptimizer {
    let fabric = Fabric::new("32-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _p = vs.root().zeros("p", &[1]);
    if adam {
        let opt = AdamW::new(&vs, 0.1).unwrap().weight_decay(0.0);
        fabric.setup((), &mut vs, opt).unwrap().1
    } else {
        let opt = Sgd::new(&vs, 0.1).unwrap().momentum(0.9);
        fabric.setup((), &mut vs, opt).unwrap().1
    }
}

/// The same over two parameters in two param groups, the second at rate 0.03.
fn grouped_optimizer(adam: bool) -> FabricOptimizer {
    let fabric = Fabric::new("32-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _p = vs.root().zeros("p", &[1]);
    let _q = vs.root().zeros("q", &[1]);
    let groups = || [Group::names(["p"]), Group::names(["q"]).lr(0.03)];
    if adam {
        let opt = AdamW::new(&vs, 0.1).unwrap().weight_decay(0.0);
        let opt = opt.param_groups(groups()).unwrap();
        fabric.setup((), &mut vs, opt).unwrap().1
    } else {
        let opt = Sgd::new(&vs, 0.1).unwrap().momentum(0.9);
        let opt = opt.param_groups(groups()).unwrap();
        fabric.setup((), &mut vs, opt).unwrap().1
    }
}

fn scheduler(name: &str, o: &mut FabricOptimizer) -> Box<dyn Scheduler> {
    let n = N as i64;
    match name {
        "lambda" => Box::new(LambdaLR::new(o, lam).unwrap()),
        "step" => Box::new(StepLR::new(o, 30, 0.7).unwrap()),
        "multistep" => Box::new(MultiStepLR::new(o, vec![100, 300, 300, 700], 0.5).unwrap()),
        "constant" => Box::new(ConstantLR::new(o, 0.25, 40).unwrap()),
        "linear" => Box::new(LinearLR::new(o, 0.01, 1.0, 100).unwrap()),
        "exponential" => Box::new(ExponentialLR::new(o, 0.995).unwrap()),
        "cosine" => Box::new(CosineAnnealingLR::new(o, 300, 1e-5).unwrap()),
        // total_steps one more than the steps taken: PyTorch's step number total_steps goes
        // past the last phase, and its linear extrapolation is a negative rate, which
        // tch-fabric's optimizers refuse.
        "onecycle" => Box::new(OneCycleLR::new(o, OneCycle::new(0.5, n + 1)).unwrap()),
        "onecycle_adam_linear_three_phase" => {
            let mut c = OneCycle::new(0.5, n + 1);
            (c.anneal_strategy, c.three_phase, c.pct_start) = (Anneal::Linear, true, 0.25);
            Box::new(OneCycleLR::new(o, c).unwrap())
        }
        "warmup_cosine" => {
            let warmup = LinearLR::new(o, 0.1, 1.0, 50).unwrap();
            let cosine = CosineAnnealingLR::new(o, 950, 0.0).unwrap();
            Box::new(
                SequentialLR::new(o, vec![Box::new(warmup), Box::new(cosine)], vec![50]).unwrap(),
            )
        }
        "constant_exponential_step" => {
            let a = ConstantLR::new(o, 0.1, 20).unwrap();
            let b = ExponentialLR::new(o, 0.99).unwrap();
            let c = StepLR::new(o, 100, 0.5).unwrap();
            Box::new(
                SequentialLR::new(
                    o,
                    vec![Box::new(a), Box::new(b), Box::new(c)],
                    vec![20, 400],
                )
                .unwrap(),
            )
        }
        other => panic!("no case {other}"),
    }
}

fn bits_of(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn rates_and_momenta_match_torch_over_1000_steps() {
    let want: serde_json::Value =
        serde_json::from_str(common::run_python(PYTHON, "").trim()).unwrap();
    let cases = want.as_object().unwrap();
    assert_eq!(cases.len(), 11);
    for (name, want) in cases {
        // Two param groups with rates 0.1 and 0.03: each scheduled from its own base rate.
        let mut o = grouped_optimizer(name.contains("adam"));
        let mut s = scheduler(name, &mut o);
        let rates = |o: &FabricOptimizer| -> Vec<u64> {
            o.group_lrs().iter().map(|v| v.to_bits()).collect()
        };
        let (mut lrs, mut moms) = (vec![rates(&o)], vec![o.momentum().unwrap().to_bits()]);
        for _ in 0..N {
            s.step(&StepOutcome::Stepped, &mut o).unwrap();
            lrs.push(rates(&o));
            moms.push(o.momentum().unwrap().to_bits());
        }
        let want_lr: Vec<Vec<u64>> = want["lr"].as_array().unwrap().iter().map(bits_of).collect();
        let want_mom = bits_of(&want["momentum"]);
        if let Some(k) = (0..=N).find(|&k| lrs[k] != want_lr[k]) {
            panic!(
                "{name}: rates at step {k} are {:?}, PyTorch's {:?}",
                lrs[k]
                    .iter()
                    .map(|b| f64::from_bits(*b))
                    .collect::<Vec<_>>(),
                want_lr[k]
                    .iter()
                    .map(|b| f64::from_bits(*b))
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(moms, want_mom, "{name}: momenta differ");
        let last: Vec<u64> = s.get_last_lr().iter().map(|v| v.to_bits()).collect();
        assert_eq!(last, want_lr[N], "{name}: get_last_lr");
    }
}

#[test]
fn a_skipped_step_does_not_advance_the_schedule() {
    let mut a = optimizer(false);
    let mut b = optimizer(false);
    let mut sa = scheduler("warmup_cosine", &mut a);
    let mut sb = scheduler("warmup_cosine", &mut b);
    let skipped = StepOutcome::Skipped {
        scale_before: 2.0,
        scale_after: 1.0,
        consecutive: 1,
        nonfinite: vec![],
    };
    for k in 0..200 {
        sa.step(&StepOutcome::Stepped, &mut a).unwrap();
        if k % 3 == 0 {
            let before = (b.lr(), sb.last_epoch());
            sb.step(&skipped, &mut b).unwrap();
            assert_eq!((b.lr(), sb.last_epoch()), before);
        }
        sb.step(&StepOutcome::Queued, &mut b).unwrap();
        assert_eq!(a.lr().to_bits(), b.lr().to_bits());
    }
    assert_eq!(sa.last_epoch(), 200);
}

#[test]
fn state_round_trips_through_serde_and_resumes_exactly() {
    let mut full_o = optimizer(false);
    let mut full = scheduler("constant_exponential_step", &mut full_o);
    let mut saved = None;
    let mut lrs = Vec::new();
    for k in 0..N {
        if k == 450 {
            saved = Some(serde_json::to_string(&full.state_dict()).unwrap());
        }
        full.step(&StepOutcome::Stepped, &mut full_o).unwrap();
        lrs.push(full_o.lr().to_bits());
    }
    let state: SchedulerState = serde_json::from_str(&saved.unwrap()).unwrap();
    assert_eq!(state.schedulers.len(), 3);
    let mut o = optimizer(false);
    let mut s = scheduler("constant_exponential_step", &mut o);
    s.load_state_dict(&state).unwrap();
    // The rate itself comes back with the optimizer, as in PyTorch.
    o.set_lr(s.get_last_lr()[0]).unwrap();
    for lr in &lrs[450..] {
        s.step(&StepOutcome::Stepped, &mut o).unwrap();
        assert_eq!(o.lr().to_bits(), *lr);
    }
}

#[test]
fn bad_options_and_states_are_typed_errors_that_change_nothing() {
    let mut o = optimizer(false);
    let config = |r: Result<StepLR, Error>, field: &str| match r {
        Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected InvalidConfig for {field}, got {other:?}"),
    };
    config(StepLR::new(&mut o, 0, 0.1), "step_size");
    config(StepLR::new(&mut o, 10, f64::NAN), "gamma");
    assert!(matches!(
        LinearLR::new(&mut o, 0.0, 1.0, 5),
        Err(Error::InvalidConfig {
            field: "start_factor",
            ..
        })
    ));
    assert!(matches!(
        ConstantLR::new(&mut o, 1.5, 5),
        Err(Error::InvalidConfig {
            field: "factor",
            ..
        })
    ));
    assert!(matches!(
        CosineAnnealingLR::new(&mut o, 0, 0.0),
        Err(Error::InvalidConfig { field: "T_max", .. })
    ));
    let mut c = OneCycle::new(0.5, 10);
    c.pct_start = 1.5;
    assert!(matches!(
        OneCycleLR::new(&mut o, c),
        Err(Error::InvalidConfig {
            field: "pct_start",
            ..
        })
    ));
    let exp = ExponentialLR::new(&mut o, 0.9).unwrap();
    assert!(matches!(
        SequentialLR::new(&mut o, vec![Box::new(exp)], vec![5]),
        Err(Error::InvalidConfig {
            field: "milestones",
            ..
        })
    ));
    assert!(matches!(
        SequentialLR::new(&mut o, vec![], vec![]),
        Err(Error::InvalidConfig {
            field: "schedulers",
            ..
        })
    ));
    // No refusal changed the rate.
    assert_eq!(o.lr(), 0.1, "the refusals left the rate alone");

    // An optimizer without momentum cannot have it cycled.
    let fabric = Fabric::new("32-true").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _p = vs.root().zeros("p", &[1]);
    let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.1).unwrap();
    let mut tch_opt = fabric.setup((), &mut vs, opt).unwrap().1;
    match OneCycleLR::new(&mut tch_opt, OneCycle::new(0.5, 10)) {
        Err(Error::Usage(m)) => assert!(m.contains("momentum or beta1"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut c = OneCycle::new(0.5, 10);
    c.cycle_momentum = false;
    assert!(OneCycleLR::new(&mut tch_opt, c).is_ok());

    // Past the end of a OneCycleLR: PyTorch's error, and nothing moves.
    let mut o = optimizer(false);
    let mut s = OneCycleLR::new(&mut o, OneCycle::new(0.5, 10)).unwrap();
    for _ in 0..10 {
        s.step(&StepOutcome::Stepped, &mut o).unwrap();
    }
    let before = (o.lr(), o.momentum(), s.state_dict());
    match s.step(&StepOutcome::Stepped, &mut o) {
        Err(Error::Usage(m)) => assert!(m.starts_with("Tried to step 11 times"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!((o.lr(), o.momentum(), s.state_dict()), before);

    // A state of another kind, or with impossible values, is refused and changes nothing.
    let mut o = optimizer(false);
    let mut step = StepLR::new(&mut o, 10, 0.5).unwrap();
    step.step(&StepOutcome::Stepped, &mut o).unwrap();
    let before = step.state_dict();
    let mut other = ExponentialLR::new(&mut optimizer(false), 0.9)
        .unwrap()
        .state_dict();
    assert!(matches!(
        step.load_state_dict(&other),
        Err(Error::InvalidState(_))
    ));
    other.kind = "StepLR".into();
    other.last_lrs = vec![f64::NAN];
    assert!(matches!(
        step.load_state_dict(&other),
        Err(Error::InvalidState(_))
    ));
    assert_eq!(step.state_dict(), before);

    // SequentialLR: a child's bad state restores the children already loaded.
    let mut o = optimizer(false);
    let mut seq = scheduler("warmup_cosine", &mut o);
    for _ in 0..60 {
        seq.step(&StepOutcome::Stepped, &mut o).unwrap();
    }
    let before = seq.state_dict();
    let mut bad = before.clone();
    bad.last_epoch = 3;
    bad.schedulers[0].last_epoch = 1;
    bad.schedulers[1].kind = "StepLR".into();
    assert!(matches!(
        seq.load_state_dict(&bad),
        Err(Error::InvalidState(_))
    ));
    assert_eq!(seq.state_dict(), before);
}

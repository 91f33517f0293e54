//! Stochastic rounding and Kahan summation of the fused optimizers (`.stochastic_rounding(seed)`,
//! `.kahan_summation(true)`, `optim::stochastic_round`): the rounding is unbiased and never
//! leaves the two neighbouring bfloat16 values, at the edges of the grid too; the bits do not
//! depend on the thread count and survive a save and load in both checkpoint formats; the
//! updates that round to nearest drops survive; bad combinations are refused before anything
//! changes. The default of every optimizer stays bit for bit PyTorch's: the parity tests
//! (torch_optim.rs, fused_adamw.rs, fused_sgd.rs) run unchanged.
mod common;

use common::{same, weights};
use tch::{nn, nn::Module, Device, Kind, Tensor};
use tch_fabric::optim::stochastic_round;
use tch_fabric::{Error, Fabric, FusedAdamW, FusedSgd, Optimizer};

/// The bfloat16 neighbours of a float32 value: (towards zero, away from zero) by truncation.
fn neighbours(x: f32) -> (f32, f32) {
    let u = x.to_bits() & 0xFFFF_0000;
    (f32::from_bits(u), f32::from_bits(u + 0x1_0000))
}

/// `n` stochastic roundings of `x`, each under another step (fresh random bits).
fn roundings(x: f32, n: usize, seed: u64) -> Vec<f32> {
    let input = Tensor::from_slice(&[x]);
    (0..n)
        .map(|step| {
            let r = stochastic_round(&input, seed, 3, step as u32).unwrap();
            r.to_kind(Kind::Float).double_value(&[0]) as f32
        })
        .collect()
}

#[test]
fn stochastic_rounding_is_unbiased_and_stays_between_the_neighbours() {
    // Values across the grid: ordinary ones (both signs), a tie (exactly half an ulp), values
    // a sixteenth and fifteen sixteenths of the way, a float32 subnormal, the smallest float32,
    // just above the largest finite bfloat16 (its upper neighbour is infinity).
    let max_bf16 = f32::from_bits(0x7F7F_0000);
    let cases = [
        0.1f32,
        -0.1,
        1.0 + 1.0 / 256.0, // a tie: half of bfloat16's ulp at 1 (2^-7)
        -(1.0 + 1.0 / 256.0),
        1.0 + 1.0 / 2048.0,          // 1/16 of the way
        1.0 + 15.0 / 2048.0,         // 15/16
        3.0e-39,                     // subnormal
        f32::from_bits(1),           // the smallest subnormal
        f32::from_bits(0x7F7F_8000), // half-way from the largest bfloat16 to infinity
        std::f32::consts::PI * 1e30,
    ];
    const N: usize = 4000;
    for &x in &cases {
        let (lo, hi) = neighbours(x);
        let got = roundings(x, N, 11);
        assert!(
            got.iter().all(|&r| r == lo || r == hi),
            "{x:e}: a rounding left {{{lo:e}, {hi:e}}}"
        );
        // The count of "away from zero" is Binomial(N, p), p = distance to lo / ulp: within
        // 5 standard deviations (a false failure about once in 3.5 million runs per case).
        let p = f64::from((x.to_bits() & 0xFFFF) as u16) / 65536.0;
        let ups = got.iter().filter(|&&r| r == hi).count() as f64;
        let sd = (N as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (ups - N as f64 * p).abs() <= 5.0 * sd + 1.0,
            "{x:e}: {ups} of {N} rounded away from zero, expected {:.1} +- {:.1}",
            N as f64 * p,
            sd
        );
        if hi.is_finite() {
            // Unbiased: the mean is x within the same bound, in units of the ulp.
            let mean = got.iter().map(|&r| f64::from(r)).sum::<f64>() / N as f64;
            let ulp = f64::from(hi) - f64::from(lo);
            assert!(
                (mean - f64::from(x)).abs() <= (5.0 * sd + 1.0) / N as f64 * ulp.abs(),
                "{x:e}: mean {mean:e}"
            );
        } else {
            assert_eq!(lo, max_bf16);
        }
    }
    // Exact bfloat16 values, zeros and infinities never move; NaN stays NaN.
    for x in [
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        max_bf16,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        assert!(
            roundings(x, 200, 5)
                .iter()
                .all(|r| r.to_bits() == x.to_bits()),
            "{x}"
        );
    }
    assert!(roundings(f32::NAN, 50, 5).iter().all(|r| r.is_nan()));
}

#[test]
fn the_random_bits_are_a_function_of_the_key_only() {
    // Holds the lock: it changes libtorch's thread count, which the bit comparisons of the
    // training tests depend on.
    let _x = common::exclusive();
    let x = Tensor::randn([100_003], (Kind::Float, Device::Cpu));
    let a = stochastic_round(&x, 1, 0, 1).unwrap();
    // The same key gives the same bits, whatever the threads (libtorch's parallel_for splits
    // the tensor differently); another seed, position or step gives other bits.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let one = stochastic_round(&x, 1, 0, 1).unwrap();
    tch::set_num_threads(threads);
    assert!(a.equal(&one));
    assert!(a.equal(&stochastic_round(&x, 1, 0, 1).unwrap()));
    for other in [
        stochastic_round(&x, 2, 0, 1).unwrap(),
        stochastic_round(&x, 1, 1, 1).unwrap(),
        stochastic_round(&x, 1, 0, 2).unwrap(),
    ] {
        let differ = a.ne_tensor(&other).sum(Kind::Int64).int64_value(&[]);
        assert!(differ > 1000, "only {differ} elements differ");
    }
    // A slice rounds as the same elements of the whole tensor would (element i's bits depend
    // on i, not on where a thread's chunk starts).
    let head = stochastic_round(&x.narrow(0, 0, 777), 1, 0, 1).unwrap();
    assert!(head.equal(&a.narrow(0, 0, 777)));
    assert!(matches!(
        stochastic_round(&x.to_kind(Kind::Double), 1, 0, 1),
        Err(Error::InvalidConfig { field: "x", .. })
    ));
}

/// A bf16-true regression model: two linear layers, weights of a fixed init.
struct Run {
    vs: nn::VarStore,
    model: nn::Sequential,
}

fn run() -> Run {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::seq()
        .add(nn::linear(vs.root() / "l1", 64, 256, Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(vs.root() / "l2", 256, 8, Default::default()));
    // Weights of a fixed formula, not of libtorch's global generator (which the tests running
    // beside this one draw from too).
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            let k = name.len() as f64;
            let n = v.numel() as i64;
            let w = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.7 + k / 10.0)).sin() * 0.1;
            v.copy_(&w.reshape(v.size()));
        }
    });
    vs.bfloat16();
    Run { vs, model }
}

fn data() -> (Tensor, Tensor) {
    let g = Tensor::arange(32 * 64, (Kind::Float, Device::Cpu)).reshape([32, 64]);
    let x = (g.shallow_clone() * 0.37).sin();
    let y = (g.narrow(1, 0, 8) * 0.11).cos();
    (x.to_kind(Kind::BFloat16), y.to_kind(Kind::BFloat16))
}

fn train(r: &Run, opt: &mut impl Optimizer, steps: usize) {
    let (x, y) = data();
    for _ in 0..steps {
        opt.zero_grad().unwrap();
        let loss = r.model.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        loss.backward();
        opt.step().unwrap();
    }
}

#[test]
fn bits_do_not_depend_on_the_thread_count() {
    let _x = common::exclusive();
    let threads = tch::get_num_threads();
    let mut results = Vec::new();
    for n in [1, 2] {
        tch::set_num_threads(n);
        let r = run();
        let mut opt = FusedAdamW::new(&r.vs, 1e-3).unwrap().stochastic_rounding(9);
        train(&r, &mut opt, 5);
        results.push(weights(&r.vs));
    }
    tch::set_num_threads(threads);
    assert!(same(&results[0], &results[1]));
}

fn bf16_fabric() -> Fabric {
    Fabric::builder()
        .precision("bf16-true")
        .accelerator("cpu")
        .build()
        .unwrap()
}

/// A bf16-true Fabric run of `steps` steps with the optimizer `make(vs, seed)` builds, loading
/// `load` first and saving to `save` at the end when given; returns the weights.
fn fabric_run<O: Optimizer + 'static>(
    make: &dyn Fn(&nn::VarStore, u64) -> O,
    seed: u64,
    steps: usize,
    load: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> Vec<(String, Tensor)> {
    let fabric = bf16_fabric();
    let mut r = run();
    let opt = make(&r.vs, seed);
    let (m, mut opt) = fabric.setup(r.model, &mut r.vs, opt).unwrap();
    if let Some(path) = load {
        let _: serde_json::Value = fabric.load(path).unwrap();
    }
    let (x, y) = data();
    for _ in 0..steps {
        opt.zero_grad().unwrap();
        let loss = m.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        fabric.backward(&loss).unwrap();
        opt.step().unwrap();
    }
    if let Some(path) = save {
        fabric.save(path, &serde_json::json!({})).unwrap();
    }
    weights(&r.vs)
}

fn adam(vs: &nn::VarStore, seed: u64, kahan: bool) -> FusedAdamW {
    let o = FusedAdamW::new(vs, 1e-3).unwrap();
    if kahan {
        o.kahan_summation(true)
    } else {
        o.stochastic_rounding(seed)
    }
}

fn sgd(vs: &nn::VarStore, seed: u64, kahan: bool) -> FusedSgd {
    let o = FusedSgd::new(vs, 0.05).unwrap().momentum(0.9);
    if kahan {
        o.kahan_summation(true)
    } else {
        o.stochastic_rounding(seed)
    }
}

/// 3 steps, a save, a load into a fresh run built with another seed, 3 more steps: the same
/// bits as 6 steps straight (the checkpoint's seed and step counts are used).
fn check_resume<O: Optimizer + 'static>(make: &dyn Fn(&nn::VarStore, u64) -> O, name: &str) {
    let dir = std::env::temp_dir().join(format!("tch-fabric-rounding-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let straight = fabric_run(make, 77, 6, None, None);
    assert!(!same(&straight, &fabric_run(make, 78, 6, None, None)) || name.contains("kahan"));
    for ext in ["safetensors", "pt"] {
        let path = dir.join(format!("{name}.{ext}"));
        fabric_run(make, 77, 3, None, Some(&path));
        let resumed = fabric_run(make, 1, 3, Some(&path), None);
        assert!(
            same(&resumed, &straight),
            "{name}.{ext}: the resumed run differs"
        );
    }
}

#[test]
fn a_resumed_run_continues_bit_exactly_in_both_formats() {
    let _x = common::exclusive();
    check_resume(&|vs, seed| adam(vs, seed, false), "adam-stochastic");
    check_resume(&|vs, seed| adam(vs, seed, true), "adam-kahan");
    check_resume(&|vs, seed| sgd(vs, seed, false), "sgd-stochastic");
    check_resume(&|vs, seed| sgd(vs, seed, true), "sgd-kahan");
}

/// `loss = sum(p) * k`: every element's gradient is `k`, so SGD moves each weight by `lr * k`.
fn small_updates(opt: &mut dyn FnMut(&nn::VarStore) -> Box<dyn Optimizer>, steps: usize) -> Tensor {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root().ones("p", &[4096]);
    vs.bfloat16();
    let mut o = opt(&vs);
    for _ in 0..steps {
        o.zero_grad().unwrap();
        (vs.root().get("p").unwrap().sum(Kind::Float) * 1e-3).backward();
        o.step().unwrap();
    }
    drop(p);
    vs.root().get("p").unwrap().to_kind(Kind::Float)
}

#[test]
fn updates_under_half_an_ulp_survive() {
    // 1e-3 a step on weights of 1.0, where bfloat16's ulp is 2^-7 (0.0078): round to nearest
    // drops every one of the 200 updates; stochastic rounding keeps them in expectation
    // (mean 0.8), Kahan summation keeps them up to the buffer's own rounding.
    let steps = 200;
    let plain = small_updates(&mut |vs| Box::new(FusedSgd::new(vs, 1.0).unwrap()), steps);
    assert!(
        plain.eq(1.0).all().int64_value(&[]) == 1,
        "round to nearest moved a weight"
    );
    let sr = small_updates(
        &mut |vs| Box::new(FusedSgd::new(vs, 1.0).unwrap().stochastic_rounding(3)),
        steps,
    );
    let mean = sr.mean(Kind::Float).double_value(&[]);
    // Each weight is a sum of 200 independent roundings with a spread of at most one ulp each:
    // standard deviation <= 2^-7 * sqrt(200) / 2 per weight, / 64 over 4096 weights.
    let sd = 2f64.powi(-7) * (steps as f64).sqrt() / 2.0 / 64.0;
    assert!(
        (mean - 0.8).abs() < 5.0 * sd,
        "stochastic rounding: mean {mean}"
    );
    let kahan = small_updates(
        &mut |vs| Box::new(FusedSgd::new(vs, 1.0).unwrap().kahan_summation(true)),
        steps,
    );
    let worst = (kahan - 0.8).abs().max().double_value(&[]);
    assert!(worst <= 2f64.powi(-8), "Kahan summation: off by {worst}");
    // The same through AdamW (lr 1e-3, constant gradient: every step moves by ~lr).
    let adam_plain = small_updates(
        &mut |vs| Box::new(FusedAdamW::new(vs, 1e-3).unwrap().weight_decay(0.0)),
        steps,
    );
    assert!(adam_plain.eq(1.0).all().int64_value(&[]) == 1);
    let adam_sr = small_updates(
        &mut |vs| {
            Box::new(
                FusedAdamW::new(vs, 1e-3)
                    .unwrap()
                    .weight_decay(0.0)
                    .stochastic_rounding(3),
            )
        },
        steps,
    );
    let mean = adam_sr.mean(Kind::Float).double_value(&[]);
    assert!(
        (mean - 0.8).abs() < 0.01,
        "AdamW stochastic rounding: mean {mean}"
    );
}

#[test]
fn the_moments_are_those_of_libtorchs_kernel_and_the_weights_one_ulp_away() {
    // One AdamW step from the same state: the rounded kernel computes the moments as
    // libtorch's _fused_adamw_ does (float32, stored to nearest), and each new weight is one
    // of the two bfloat16 neighbours of the float32 result, so at most one ulp from libtorch's
    // round-to-nearest weight.
    let _x = common::exclusive();
    let mut outs = Vec::new();
    for sr in [false, true] {
        let r = run();
        let mut o = FusedAdamW::new(&r.vs, 1e-2).unwrap();
        if sr {
            o = o.stochastic_rounding(5);
        }
        train(&r, &mut o, 1);
        outs.push((
            weights(&r.vs),
            tch_fabric::optim::OptimizerState::state_tensors(&o).unwrap(),
        ));
    }
    let (plain_state, sr_state) = (&outs[0].1, &outs[1].1);
    assert_eq!(plain_state.len(), sr_state.len());
    for ((n1, a), (n2, b)) in plain_state.iter().zip(sr_state) {
        assert_eq!(n1, n2);
        assert!(a.equal(b), "{n1}");
    }
    let mut moved = 0;
    for ((name, a), (_, b)) in outs[0].0.iter().zip(&outs[1].0) {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        let ulp = a.abs().clamp_min(1e-30).log2().floor().exp2() * 2f64.powi(-7);
        let far = (&a - &b).abs().gt_tensor(&(ulp * 2.0 + 1e-30));
        assert_eq!(far.sum(Kind::Int64).int64_value(&[]), 0, "{name}");
        moved += a.ne_tensor(&b).sum(Kind::Int64).int64_value(&[]);
    }
    assert!(
        moved > 100,
        "stochastic rounding changed only {moved} weights"
    );
}

#[test]
fn bad_combinations_are_refused_and_change_nothing() {
    // Both options.
    let r = run();
    let before = weights(&r.vs);
    let mut o = FusedAdamW::new(&r.vs, 1e-3)
        .unwrap()
        .stochastic_rounding(1)
        .kahan_summation(true);
    assert!(matches!(
        o.validate(),
        Err(Error::InvalidConfig {
            field: "kahan_summation",
            ..
        })
    ));
    let (x, y) = data();
    r.model
        .forward(&x)
        .mse_loss(&y, tch::Reduction::Mean)
        .backward();
    assert!(o.step().is_err());
    assert!(same(&weights(&r.vs), &before));

    // An option that needs new state, set after the first step: refused, nothing changed.
    let mut o = FusedAdamW::new(&r.vs, 1e-3).unwrap();
    r.model
        .forward(&x)
        .mse_loss(&y, tch::Reduction::Mean)
        .backward();
    o.step().unwrap();
    let mut o = o.kahan_summation(true);
    let stepped = weights(&r.vs);
    let e = o.step().unwrap_err();
    assert!(
        matches!(&e, Error::Usage(m) if m.contains("kahan_summation")),
        "{e}"
    );
    assert!(same(&weights(&r.vs), &stepped));

    // float16 parameters: refused before any parameter steps (the float32 ones included).
    let mut vs = nn::VarStore::new(Device::Cpu);
    let a = vs.root().ones("a", &[8]);
    let b = vs.root().ones("b", &[8]);
    vs.half();
    let _ = (a, b);
    let b32 = vs.root().get("b").unwrap();
    let _ = b32.set_requires_grad(false);
    let f32_vs = nn::VarStore::new(Device::Cpu);
    let c = f32_vs.root().ones("c", &[8]);
    let params = || {
        tch_fabric::optim::Params::new(vec![
            ("c".to_string(), c.shallow_clone()),
            ("a".to_string(), vs.root().get("a").unwrap()),
        ])
        .unwrap()
    };
    for sgd in [false, true] {
        let mut o: Box<dyn Optimizer> = if sgd {
            Box::new(
                FusedSgd::with_params(params(), 0.1)
                    .unwrap()
                    .stochastic_rounding(1),
            )
        } else {
            Box::new(
                FusedAdamW::with_params(params(), 0.1)
                    .unwrap()
                    .kahan_summation(true),
            )
        };
        o.zero_grad().unwrap();
        (c.sum(Kind::Float) + vs.root().get("a").unwrap().sum(Kind::Float)).backward();
        let e = o.step().unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig { value, .. } if value.contains("float16")),
            "{e}"
        );
        assert!(
            c.eq(1.0).all().int64_value(&[]) == 1,
            "a float32 weight stepped"
        );
    }

    // A checkpoint of a stochastic-rounding run loaded into an optimizer without it, and a
    // Kahan one into an optimizer without Kahan: refused, with what to build instead.
    let dir = std::env::temp_dir().join(format!("tch-fabric-rounding-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (kahan, ext) in [(false, "pt"), (true, "safetensors"), (false, "safetensors")] {
        let path = dir.join(format!("ckpt-{kahan}.{ext}"));
        fabric_run(&|vs, seed| adam(vs, seed, kahan), 4, 2, None, Some(&path));
        let fabric = bf16_fabric();
        let mut r = run();
        let opt = FusedAdamW::new(&r.vs, 1e-3).unwrap();
        let (_m, _o) = fabric.setup(r.model, &mut r.vs, opt).unwrap();
        let before = weights(&r.vs);
        let e = fabric
            .load::<serde_json::Value>(&path)
            .unwrap_err()
            .to_string();
        let wanted = if kahan {
            "kahan_summation(true)"
        } else {
            "stochastic_rounding(seed)"
        };
        assert!(e.contains(wanted), "{e}");
        assert!(same(&weights(&r.vs), &before));
    }
}

#[test]
fn the_kahan_buffer_is_optimizer_state_in_the_memory_report() {
    let mut bytes = Vec::new();
    for kahan in [false, true] {
        let fabric = bf16_fabric();
        let mut r = run();
        let opt = FusedAdamW::new(&r.vs, 1e-3).unwrap().kahan_summation(kahan);
        let (m, mut o) = fabric.setup(r.model, &mut r.vs, opt).unwrap();
        let (x, y) = data();
        o.zero_grad().unwrap();
        fabric
            .backward(&m.forward(&x).mse_loss(&y, tch::Reduction::Mean))
            .unwrap();
        o.step().unwrap();
        let report = fabric.memory_report(&m, &o).unwrap();
        bytes.push((report.parameters_bytes, report.optimizer_state_bytes));
    }
    let params = bytes[0].0;
    // AdamW: two bfloat16 moments and a 4-byte step per parameter tensor (4 tensors); Kahan
    // adds one bfloat16 buffer of the parameters' size.
    assert_eq!(bytes[0].1, 2 * params + 16);
    assert_eq!(bytes[1].1, 3 * params + 16);
}

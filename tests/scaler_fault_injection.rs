//! 10,000 steps with inf/NaN injected into random gradients: a skipped step never changes a
//! weight, and exactly the injected steps are skipped (and diagnosed by parameter name).
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{GradScaler, GradScalerConfig, Optimizer, StepOutcome, TchOptimizer};

/// A small deterministic generator, so the injection pattern is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn skipped_steps_change_nothing_and_only_injected_steps_skip() {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = nn::seq()
        .add(nn::linear(vs.root() / "l1", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 16, 1, Default::default()));
    let mut opt = TchOptimizer::new(&vs, nn::Adam::default(), 1e-3).unwrap();
    let mut scaler = GradScaler::new(
        GradScalerConfig::default()
            .growth_interval(10)
            .diagnose_skips(true),
    )
    .unwrap();
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([16, 1], (Kind::Float, Device::Cpu));
    let names: Vec<String> = opt.params().names().to_vec();
    let mut rng = Lcg(2026);
    let mut injected_total = 0u64;

    for step in 0..10_000 {
        opt.zero_grad().unwrap();
        let loss = model.forward(&x).mse_loss(&y, Reduction::Mean);
        scaler.scale(&loss).unwrap().backward();

        let inject = rng.next() % 20 == 0;
        let mut target = String::new();
        if inject {
            injected_total += 1;
            target = names[(rng.next() as usize) % names.len()].clone();
            let i = names.iter().position(|n| *n == target).unwrap();
            let grad = opt.params().tensors()[i].grad();
            let value = [f64::INFINITY, f64::NAN, f64::NEG_INFINITY][(rng.next() % 3) as usize];
            let flat = grad.view([-1]);
            let idx = (rng.next() as i64) % flat.size()[0];
            tch::no_grad(|| {
                let _ = flat.get(idx).fill_(value);
            });
        }

        let before: Vec<Tensor> = opt.params().tensors().iter().map(|p| p.copy()).collect();
        let outcome = scaler.step(&mut opt).unwrap();
        scaler.update().unwrap();

        assert_eq!(outcome.is_skipped(), inject, "step {step}");
        if let StepOutcome::Skipped { nonfinite, .. } = &outcome {
            assert_eq!(nonfinite, &vec![target.clone()], "step {step}");
            let params = opt.params();
            for ((name, p), b) in params.names().iter().zip(params.tensors()).zip(&before) {
                assert!(
                    p.view_dtype(Kind::Int).equal(&b.view_dtype(Kind::Int)),
                    "step {step}: {name} changed on a skipped step"
                );
            }
        }
    }
    assert_eq!(scaler.steps_skipped().unwrap(), injected_total);
    assert_eq!(scaler.steps_taken().unwrap(), 10_000 - injected_total);
    assert!(injected_total > 300, "the pattern injects about 500 faults");
    // With a short growth interval the scale recovers between faults: it neither decayed to 0
    // (PyTorch's quirk, which would have made every later step NaN) nor overflowed.
    let scale = scaler.get_scale().unwrap();
    assert!(scale > 1.0 && scale.is_finite(), "final scale {scale}");
}

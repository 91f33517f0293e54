//! A one-parameter optimizer whose gradient the test sets directly, for driving a GradScaler
//! through the same overflow pattern as the Python reference.
use tch::{nn, Device, Kind, Tensor};
use tch_fabric::{GradScaler, TchOptimizer};

pub struct Probe {
    pub vs: nn::VarStore,
    pub opt: TchOptimizer,
    grad: Tensor,
}

/// The gradient value of each flag in the reference data: clean, +inf, NaN, -inf.
pub fn flag_value(flag: u8) -> f64 {
    match flag {
        b'0' => 1.0,
        b'1' => f64::INFINITY,
        b'2' => f64::NAN,
        b'3' => f64::NEG_INFINITY,
        other => panic!("unknown flag {other}"),
    }
}

impl Probe {
    pub fn new() -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().zeros("p", &[2]);
        // One backward defines the gradient tensor; later steps overwrite it in place.
        p.sum(Kind::Float).backward();
        let grad = p.grad();
        let opt = TchOptimizer::new(&vs, nn::Sgd::default(), 0.0).unwrap();
        Probe { vs, opt, grad }
    }

    pub fn set_grad(&mut self, flag: u8) {
        let v = Tensor::from_slice(&[0.5f32, flag_value(flag) as f32]);
        tch::no_grad(|| self.grad.copy_(&v));
    }
}

/// Runs `flags` through step + update; returns (scale bits, tracker, stepped) per step.
pub fn run(scaler: &mut GradScaler, probe: &mut Probe, flags: &[u8]) -> Vec<(u32, i64, bool)> {
    if scaler.scale_tensor().is_none() {
        let _ = scaler
            .scale(&Tensor::ones([], (Kind::Float, Device::Cpu)))
            .unwrap();
    }
    flags
        .iter()
        .map(|&f| {
            probe.set_grad(f);
            let outcome = scaler.step(&mut probe.opt).unwrap();
            scaler.update().unwrap();
            let scale = scaler.get_scale().unwrap() as f32;
            if let tch_fabric::StepOutcome::Skipped { scale_after, .. } = outcome {
                assert_eq!(
                    (scale_after as f32).to_bits(),
                    scale.to_bits(),
                    "StepOutcome::scale_after predicts the update"
                );
            }
            (
                scale.to_bits(),
                scaler.growth_tracker().unwrap(),
                !outcome.is_skipped(),
            )
        })
        .collect()
}

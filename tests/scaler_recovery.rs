//! A step that fails leaves the GradScaler as it was: the same step retried gives exactly what a
//! run without the failure gives. (The first wave took the folded-clipping divisor out of the
//! scaler's record before the optimizer ran; a failing step left it without one, and the next
//! step panicked.)
mod common;

use common::{same, weights};

use std::cell::Cell;
use std::rc::Rc;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{
    optim::{Amp, GradBatch, OptimizerState, Params},
    Clip, Error, Fabric, FusedAdamW, GradScaler, GradScalerConfig, Optimizer, TchOptimizer,
};

/// An optimizer that fails while `failures` is above zero (counting it down), as one that
/// validates lazily or whose state allocation fails would, then behaves as the one it wraps.
#[derive(Debug)]
struct Flaky<O> {
    inner: O,
    failures: Rc<Cell<u32>>,
}

impl<O: Optimizer> OptimizerState for Flaky<O> {}

impl<O: Optimizer> Optimizer for Flaky<O> {
    fn params(&self) -> &Params {
        self.inner.params()
    }

    fn step_with(&mut self, grads: &GradBatch, amp: Amp<'_>) -> tch_fabric::Result<()> {
        if self.failures.get() > 0 {
            self.failures.set(self.failures.get() - 1);
            return Err(Error::Usage("injected failure".into()));
        }
        self.inner.step_with(grads, amp)
    }

    fn supports_amp_scaling(&self) -> bool {
        self.inner.supports_amp_scaling()
    }

    fn lr(&self) -> f64 {
        self.inner.lr()
    }

    fn set_lr(&mut self, lr: f64) -> tch_fabric::Result<()> {
        self.inner.set_lr(lr)
    }
}

fn net(vs: &nn::VarStore) -> nn::Sequential {
    nn::seq()
        .add(nn::linear(vs.root() / "l1", 4, 8, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "l2", 8, 2, Default::default()))
}

/// How the steps of a bare-scaler run are driven (the Fabric run folds its clipping).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// `GradScaler::step` on a fused optimizer: the inf check, then the optimizer's own
    /// unscale and skip.
    Fused,
    /// `GradScaler::unscale`, then the step of one of tch's optimizers.
    Unscaled,
}

/// What a run ends with: the weights, the scale and the growth tracker.
type End = (Vec<(String, Tensor)>, f64, i64);

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(3);
    (
        Tensor::randn([16, 4], (Kind::Float, Device::Cpu)),
        Tensor::randn([16, 2], (Kind::Float, Device::Cpu)),
    )
}

fn config() -> GradScalerConfig {
    GradScalerConfig::default()
        .init_scale(2f64.powi(10))
        .growth_interval(3)
}

/// Ten steps through a Fabric (folded clipping); at `fail_at` the step fails twice first.
fn run_fabric(fail_at: Option<usize>) -> End {
    let (x, y) = data();
    let fabric = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .grad_scaler(config())
        .build()
        .unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let failures = Rc::new(Cell::new(0));
    let opt = Flaky {
        inner: FusedAdamW::new(&vs, 1e-2).unwrap(),
        failures: Rc::clone(&failures),
    };
    let (model, mut opt) = fabric.setup(model, &mut vs, opt).unwrap();
    for step in 0..10 {
        opt.zero_grad().unwrap();
        let out = x.apply(&model);
        let loss = {
            let _ac = fabric.autocast().unwrap();
            out.mse_loss(&y, Reduction::Mean)
        };
        fabric.backward(&loss).unwrap();
        fabric.clip_gradients(&mut opt, Clip::norm(0.5)).unwrap();
        if fail_at == Some(step) {
            let before = (fabric.scaler_state().unwrap(), weights(&vs));
            failures.set(2);
            for _ in 0..2 {
                let e = opt.step().unwrap_err();
                assert_eq!(e.to_string(), "injected failure");
                assert_eq!(fabric.scaler_state().unwrap(), before.0, "scaler unchanged");
                assert!(same(&weights(&vs), &before.1), "no weight changed");
            }
        }
        opt.step().unwrap();
    }
    let state = fabric.scaler_state().unwrap();
    (
        weights(&vs),
        state.scale.unwrap(),
        state.growth_tracker.unwrap(),
    )
}

/// Ten steps with a bare GradScaler; at `fail_at` the step fails twice first.
fn run_scaler(path: Path, fail_at: Option<usize>) -> End {
    let (x, y) = data();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = net(&vs);
    let failures = Rc::new(Cell::new(0));
    let mut scaler = GradScaler::new(config()).unwrap();
    let mut opt: Box<dyn Optimizer> = match path {
        Path::Fused => Box::new(Flaky {
            inner: FusedAdamW::new(&vs, 1e-2).unwrap(),
            failures: Rc::clone(&failures),
        }),
        Path::Unscaled => Box::new(Flaky {
            inner: TchOptimizer::new(&vs, nn::Adam::default(), 1e-2).unwrap(),
            failures: Rc::clone(&failures),
        }),
    };
    for step in 0..10 {
        opt.zero_grad().unwrap();
        let loss = {
            let _ac = tch_fabric::autocast(Device::Cpu, Kind::Half).unwrap();
            model
                .forward(&x.to_kind(Kind::Half))
                .to_kind(Kind::Float)
                .mse_loss(&y, Reduction::Mean)
        };
        scaler.scale(&loss).unwrap().backward();
        if path == Path::Unscaled {
            scaler.unscale(&mut *opt).unwrap();
        }
        if fail_at == Some(step) {
            let before = scaler.state_dict().unwrap();
            let taken = scaler.steps_taken().unwrap();
            let w = weights(&vs);
            failures.set(2);
            for _ in 0..2 {
                let e = scaler.step(&mut *opt).unwrap_err();
                assert_eq!(e.to_string(), "injected failure");
                assert_eq!(
                    scaler.state_dict().unwrap(),
                    before,
                    "{path:?}: scaler unchanged"
                );
                assert_eq!(
                    scaler.steps_taken().unwrap(),
                    taken,
                    "{path:?}: no step counted"
                );
                assert!(same(&weights(&vs), &w), "{path:?}: no weight changed");
            }
            if path == Path::Unscaled {
                let e = scaler.unscale(&mut *opt).unwrap_err().to_string();
                assert!(e.contains("already been called"), "still unscaled: {e}");
            }
        }
        scaler.step(&mut *opt).unwrap();
        scaler.update().unwrap();
    }
    (
        weights(&vs),
        scaler.get_scale().unwrap(),
        scaler.growth_tracker().unwrap(),
    )
}

fn assert_same_end(what: &str, clean: End, recovered: End) {
    assert!(same(&clean.0, &recovered.0), "{what}: the same weights");
    assert_eq!(
        (clean.1, clean.2),
        (recovered.1, recovered.2),
        "{what}: scale, tracker"
    );
}

#[test]
fn a_failed_step_leaves_the_scaler_as_it_was() {
    for path in [Path::Fused, Path::Unscaled] {
        assert_same_end(
            &format!("{path:?}"),
            run_scaler(path, None),
            run_scaler(path, Some(4)),
        );
    }
    assert_same_end("Folded", run_fabric(None), run_fabric(Some(4)));
}

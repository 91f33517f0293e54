//! No process-wide side effects: Fabrics of different precisions training at once on their own
//! threads compute exactly what each computes alone, and leave libtorch's default dtype as it
//! was. (The first wave switched the process-wide default dtype around every `-true` forward:
//! a `32-true` Fabric on another thread then computed `int64 / 3` in float64 or bfloat16.)
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{default_dtype::default_dtype, Fabric, FusedAdamW};

const STEPS: usize = 60;

/// A small MLP with a term whose dtype comes from the default dtype (`int64 / n` is a true
/// division), as model code that builds positions or masks does.
#[derive(Debug)]
struct Net {
    l1: nn::Linear,
    l2: nn::Linear,
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let n = xs.size()[1];
        let positions = Tensor::arange(n, (Kind::Int64, Device::Cpu)) / n;
        let xs = xs + positions.to_kind(xs.kind());
        xs.apply(&self.l1).tanh().apply(&self.l2)
    }
}

/// What one training run produced: the bits of every loss and final weight, and the dtype a
/// metric computed in the loop (`int64 / 3`) came out as at each step.
#[derive(Debug, PartialEq)]
struct Run {
    losses: Vec<u64>,
    weights: Vec<(String, Vec<u8>)>,
    metric_kinds: Vec<Kind>,
}

fn train(precision: &str) -> Run {
    let fabric = Fabric::builder()
        .precision(precision)
        .accelerator("cpu")
        // `THREADS_OLD_BEHAVIOUR=1 cargo test --test threads` turns on the opt-in process-wide
        // default-dtype scope (the first wave's behaviour) to see what this test catches.
        .process_wide_default_dtype(std::env::var_os("THREADS_OLD_BEHAVIOUR").is_some())
        .build()
        .unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Net {
        l1: nn::linear(vs.root() / "l1", 16, 32, Default::default()),
        l2: nn::linear(vs.root() / "l2", 32, 4, Default::default()),
    };
    // Deterministic weights: the random generator is process-wide, and concurrent runs would
    // draw from it in turns.
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (k, (_, mut t)) in vars.into_iter().enumerate() {
            let n = t.numel() as i64;
            let values = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + k as f64)
                .sin()
                .view(t.size().as_slice())
                * 0.3;
            t.copy_(&values);
        }
    });
    let x = Tensor::linspace(-2.0, 2.0, 32 * 16, (Kind::Float, Device::Cpu)).view([32, 16]);
    let y = x.narrow(1, 0, 4).sin();
    let opt = FusedAdamW::new(&vs, 1e-2).unwrap();
    let (net, mut opt) = fabric.setup(net, &mut vs, opt).unwrap();
    let mut run = Run {
        losses: Vec::new(),
        weights: Vec::new(),
        metric_kinds: Vec::new(),
    };
    for _ in 0..STEPS {
        opt.zero_grad().unwrap();
        let out = x.apply(&net);
        let loss = {
            let _scope = fabric.autocast().unwrap();
            out.mse_loss(&y, Reduction::Mean)
        };
        fabric.backward(&loss).unwrap();
        opt.step().unwrap();
        run.losses.push(loss.double_value(&[]).to_bits());
        run.metric_kinds
            .push((Tensor::from_slice(&[1i64]) / 3).kind());
    }
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    for name in names {
        let t = vs.variables()[&name].to_kind(Kind::Double);
        let mut bytes = vec![0u8; t.numel() * 8];
        t.copy_data_u8(&mut bytes, t.numel());
        run.weights.push((name, bytes));
    }
    run
}

#[test]
fn three_precisions_on_three_threads_equal_their_solo_runs() {
    let before = default_dtype().unwrap();
    let precisions = ["bf16-true", "32-true", "64-true"];
    let solo: Vec<Run> = precisions.iter().map(|p| train(p)).collect();
    for (p, run) in precisions.iter().zip(&solo) {
        assert!(
            run.metric_kinds.iter().all(|k| *k == Kind::Float),
            "{p} alone: int64 / 3 is float32"
        );
    }
    for round in 0..3 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(precisions.len()));
        let handles: Vec<_> = precisions
            .iter()
            .map(|p| {
                let barrier = std::sync::Arc::clone(&barrier);
                let p = p.to_string();
                std::thread::spawn(move || {
                    barrier.wait();
                    train(&p)
                })
            })
            .collect();
        let together: Vec<Run> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for ((p, alone), with_others) in precisions.iter().zip(&solo).zip(&together) {
            assert_eq!(
                alone.metric_kinds, with_others.metric_kinds,
                "round {round}, {p}: the default dtype seen in the loop"
            );
            assert_eq!(
                alone.losses, with_others.losses,
                "round {round}, {p}: losses, bit for bit"
            );
            assert_eq!(
                alone.weights, with_others.weights,
                "round {round}, {p}: final weights, bit for bit"
            );
        }
    }
    assert_eq!(
        default_dtype().unwrap(),
        before,
        "the default dtype is as it was"
    );
}

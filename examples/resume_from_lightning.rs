//! The Rust half of a Lightning script ported mid-run (`scripts/lightning_resume.py` is the
//! Python half): load the `fabric.save` checkpoint Python wrote at step 10, train steps 11-20
//! with the same optimizer (`torch.optim.AdamW()`'s defaults), schedule and clipping, and save a
//! checkpoint Lightning's `fabric.load` resumes from. The losses equal the Python script's own
//! steps 11-20 (`lightning_resume.py train-all`) bit for bit.
//!
//!     .venv/bin/python scripts/lightning_resume.py train target/lightning/step10.ckpt
//!     cargo run --example resume_from_lightning -- target/lightning/step10.ckpt target/lightning/step20.ckpt
//!     .venv/bin/python scripts/lightning_resume.py resume target/lightning/step20.ckpt
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::lr_scheduler::{
    CosineAnnealingLR, LinearLR, Scheduler, SchedulerState, SequentialLR,
};
use tch_fabric::{AdamW, Clip, Fabric};

const STEPS: i64 = 20;

/// The checkpoint's entries besides "model" and "optimizer", as the Python script saves them.
#[derive(Serialize, Deserialize)]
struct Resume {
    step: i64,
    scheduler: SchedulerState,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let from = args
        .next()
        .context("usage: resume_from_lightning FROM.ckpt TO.ckpt")?;
    let to = args
        .next()
        .context("usage: resume_from_lightning FROM.ckpt TO.ckpt")?;
    tch::set_num_threads(1);

    // x = torch.arange(128, dtype=torch.float32).reshape(16, 8) / 37.0 - 1.5
    // y = x[:, :4] * 2.0 - x[:, 4:]
    let x = Tensor::arange(128, (Kind::Float, Device::Cpu)).reshape([16, 8]) / 37.0 - 1.5;
    let y = x.narrow(1, 0, 4) * 2.0 - x.narrow(1, 4, 4);

    // fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    let fabric = Fabric::builder()
        .accelerator("cpu")
        .precision("32-true")
        .build()?;
    // model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)): the VarStore paths
    // are PyTorch's state_dict names ("0.weight", "2.bias").
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::seq()
        .add(nn::linear(vs.root() / "0", 8, 16, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(vs.root() / "2", 16, 4, Default::default()));
    // optimizer = torch.optim.AdamW(model.parameters())
    let optimizer = AdamW::new(&vs, 1e-3)?;
    let (model, mut optimizer) = fabric.setup(model, &mut vs, optimizer)?;
    let warmup = LinearLR::new(&mut optimizer, 0.1, 1.0, 5)?;
    let cosine = CosineAnnealingLR::new(&mut optimizer, STEPS - 5, 0.0)?;
    let mut scheduler = SequentialLR::new(
        &mut optimizer,
        vec![Box::new(warmup), Box::new(cosine)],
        vec![5],
    )?;

    // rest = fabric.load(path, {"model": model, "optimizer": optimizer, "scheduler": scheduler})
    let rest: Resume = fabric.load(&from)?;
    scheduler.load_state_dict(&rest.scheduler)?;
    println!(
        "resumed {from} at step {}, lr {:.3e}",
        rest.step,
        optimizer.lr()
    );

    for step in rest.step + 1..=STEPS {
        optimizer.zero_grad()?;
        let loss = model.forward(&x).mse_loss(&y, Reduction::Mean);
        fabric.backward(&loss)?;
        fabric.clip_gradients(&mut optimizer, Clip::norm(1.0))?;
        let outcome = optimizer.step()?;
        scheduler.step(&outcome, &mut optimizer)?;
        println!(
            "step {step:2}  loss {:.8}  lr {:.3e}",
            loss.double_value(&[]),
            optimizer.lr()
        );
    }

    // fabric.save(path, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 20})
    let state = Resume {
        step: STEPS,
        scheduler: scheduler.state_dict(),
    };
    fabric.save(&to, &state)?;
    println!("saved {to}");
    Ok(())
}

//! Lightning's "Save memory with mixed precision" page, ported line by line to Rust. Each
//! Python line from the page sits above its Rust twin as a comment.
//!
//!     cargo run --example lightning_port
//!     cargo run --bin fabric -- run --precision=bf16 -- target/debug/examples/lightning_port
//!     cargo run --bin fabric -- run --devices 2 -- target/debug/examples/lightning_port  # DDP
//!     (another --precision conflicts with the code and is refused, as in Lightning; a Fabric
//!     built without a precision takes the CLI's)
use anyhow::Result;
use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
use tch_fabric::{Fabric, Precision, TchOptimizer};

fn main() -> Result<()> {
    // tch-fabric reports Lightning's warnings (CPU fp16 fallback, legacy spellings) via `log`.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Under `fabric run`, a value in the code that differs from the CLI's is an error (Lightning's
    // rule), so the tour of spellings runs only without the CLI.
    if std::env::var_os("LT_CLI_USED").is_none() {
        spellings()?;
    }

    // fabric = Fabric(precision="bf16")
    // (`fabric run --precision=bf16` agrees with it; LT_PRECISION is read as Lightning reads it.)
    let fabric = Fabric::new("bf16")?;

    // model = ...
    // optimizer = ...
    let mut vs = nn::VarStore::new(fabric.device());
    let model = nn::seq()
        .add(nn::linear(vs.root() / "l1", 32, 64, Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(vs.root() / "l2", 64, 10, Default::default()));
    let optimizer = TchOptimizer::new(&vs, nn::AdamW::default(), 1e-3)?;

    // # Here, Fabric sets up the `model.forward` for precision auto-casting
    // model, optimizer = fabric.setup(model, optimizer)
    let (model, mut optimizer) = fabric.setup(model, &mut vs, optimizer)?;

    let input = fabric.to_device(&Tensor::randn([64, 32], (Kind::Float, Device::Cpu)))?;
    let target = fabric.to_device(&Tensor::randint(10, [64], (Kind::Int64, Device::Cpu)))?;
    for step in 0..20 {
        optimizer.zero_grad()?;
        // # Precision casting gets handled in your forward, no code changes required
        // output = model.forward(input)
        let output = model.forward(&input);

        // # Precision now gets also handled in this part of the code:
        // with fabric.autocast():
        //     loss = loss_function(output, target)
        let loss = {
            let _autocast = fabric.autocast()?;
            output.cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, -100, 0.0)
        };

        // fabric.backward(loss)
        fabric.backward(&loss)?;
        // optimizer.step()  (tch-fabric also says whether the step was taken)
        let outcome = optimizer.step()?;
        // (Under DDP every rank trains; rank 0 reports, as Lightning's `fabric.print`.)
        if step % 5 == 0 && fabric.is_global_zero() {
            println!(
                "[{}] step {step:2}  loss {:.4}  {outcome:?}",
                fabric.precision(),
                loss.double_value(&[])
            );
        }
    }
    Ok(())
}

/// The precision values of the page's first block.
fn spellings() -> Result<()> {
    // from lightning.fabric import Fabric
    // fabric = Fabric(precision=32)  # This is the default
    let fabric = Fabric::new(32)?;
    assert_eq!(fabric.precision(), Precision::F32True);
    // fabric = Fabric(precision=16)  # FP16 mixed precision (on a CPU: bf16-mixed, with a warning)
    let _fabric = Fabric::new(16)?;
    // fabric = Fabric(precision="16")  # Precision values can also be set as a string
    let _fabric = Fabric::new("16")?;
    // fabric = Fabric(precision="bf16")  # BFloat16 precision
    let _fabric = Fabric::new("bf16")?;
    // fabric = Fabric(precision=64)  # Double precision
    let _fabric = Fabric::new(64)?;
    Ok(())
}

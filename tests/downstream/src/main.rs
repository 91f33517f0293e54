fn main() -> anyhow::Result<()> {
    use tch::{nn, nn::Module, Device, Kind, Tensor};
    use tch_fabric::{Clip, Fabric, FusedAdamW};
    let fabric = Fabric::builder()
        .precision("16-mixed")
        .accelerator("cpu")
        .cpu_fp16_autocast(true)
        .build()?;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 8, 4, Default::default());
    let opt = FusedAdamW::new(&vs, 1e-3);
    let (model, mut opt) = fabric.setup(model, &mut vs, opt)?;
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
    let loss = model.forward(&x).pow_tensor_scalar(2).mean(Kind::Float);
    fabric.backward(&loss)?;
    fabric.clip_gradients(&mut opt, Clip::norm(1.0))?;
    println!("{:?}", opt.step()?);
    Ok(())
}

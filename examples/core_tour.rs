//! A tour of grad-core on a tiny candle model: named gradients, fused global norms with a
//! finiteness check, in-place gradient scaling, a seeded generator and gradcheck.
//!
//! Run with `cargo run --release --example core_tour`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap};
use grad_core::{
    GradcheckConfig, NamedVars, NormType, Philox, gradcheck, multi_norm, scale_in_place,
};

fn main() -> grad_core::Result<()> {
    // Keep freed step buffers for reuse (glibc) and stop candle recounting the cores on every
    // matmul: see README, "Training speed on the CPU".
    grad_core::tune_allocator();
    grad_core::tune_threads();
    let dev = Device::Cpu;
    let mut rng = Philox::new(7);

    // A 3-layer tanh MLP in f64 on a random regression problem, built the candle way.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
    let net = candle_nn::seq()
        .add(candle_nn::linear(8, 16, vb.pp("layer.0"))?)
        .add(candle_nn::Activation::Sigmoid)
        .add(candle_nn::linear(16, 16, vb.pp("layer.1"))?)
        .add(candle_nn::Activation::Sigmoid)
        .add(candle_nn::linear(16, 1, vb.pp("layer.2"))?);
    let x = rng.normal((64, 8), 0.0, 1.0, DType::F64, &dev)?;
    let y = rng.normal((64, 1), 0.0, 1.0, DType::F64, &dev)?;

    let params = NamedVars::from_var_map(&map);
    let mut sgd = candle_nn::SGD::new(params.vars().to_vec(), 0.1)?;
    println!("step  loss      grad L2   grad inf  (clipped to 1.0 when above)");
    for step in 0..6 {
        let loss = candle_nn::loss::mse(&net.forward(&x)?, &y)?;
        let mut store = loss.backward()?;
        let mut grads = params.grads(&store)?;
        // One read of every gradient: per-parameter norms, the total and NaN/Inf counts.
        let norms = multi_norm(&grads.tensors(), NormType::L2)?;
        let inf_norm = multi_norm(&grads.tensors(), NormType::Inf)?.total;
        if norms.non_finite_count() > 0 {
            println!("step {step}: non-finite gradients, skipping");
            continue;
        }
        if norms.total > 1.0 {
            for g in grads.iter_mut() {
                if let Some(g) = g.grad_mut() {
                    scale_in_place(g, 1.0 / norms.total)?;
                }
            }
            grads.write_back(&mut store);
        }
        println!(
            "{step:>4}  {:<8.5}  {:<8.5}  {inf_norm:<8.5}",
            loss.to_scalar::<f64>()?,
            norms.total
        );
        sgd.step(&store)?;
    }

    let grads = params.grads(&candle_nn::loss::mse(&net.forward(&x)?, &y)?.backward()?)?;
    let norms = multi_norm(&grads.tensors(), NormType::L2)?;
    println!("\nper-parameter gradient norms (network order):");
    for ((name, _), n) in grads.present().zip(&norms.per_tensor) {
        println!("  {name:<16} {:.3e}", n.norm);
    }

    // gradcheck: the loss as a function of the first layer's weight and the input batch.
    let w0 = params.get("layer.0.weight").map(|v| v.as_tensor().clone());
    let Some(w0) = w0 else {
        return Err(grad_core::Error::UnknownName {
            name: "layer.0.weight".into(),
        });
    };
    let small_x = x.narrow(0, 0, 4)?;
    let report = gradcheck(
        |args: &[Tensor]| {
            let h = args[1].matmul(&args[0].t()?)?;
            candle_nn::ops::sigmoid(&h)?.sqr()?.mean_all()
        },
        &[w0, small_x],
        &GradcheckConfig::default(),
    )?;
    println!("\ngradcheck of sigmoid(x W^T)^2: {report}");
    Ok(())
}

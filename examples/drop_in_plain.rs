//! A plain candle training loop, written the way candle's own `mnist-training` example writes it
//! (an MLP, full-batch SGD on the NLL of a log-softmax), on the digits data.
//! `examples/drop_in.rs` is the same loop with gradkit added in five lines; the README shows the
//! diff.
//!
//! ```sh
//! cargo run --release --example drop_in_plain
//! ```

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, SGD, VarBuilder, VarMap, loss, ops};

struct Mlp {
    ln1: Linear,
    ln2: Linear,
}

impl Mlp {
    fn new(vs: VarBuilder) -> candle_core::Result<Self> {
        let ln1 = candle_nn::linear(64, 100, vs.pp("ln1"))?;
        let ln2 = candle_nn::linear(100, 10, vs.pp("ln2"))?;
        Ok(Self { ln1, ln2 })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.ln1.forward(xs)?;
        let xs = xs.relu()?;
        self.ln2.forward(&xs)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let m = grad_testkit::digits::load(&grad_testkit::digits::default_path(), &dev)?;
    let (train_images, train_labels) = (m.train.images, m.train.labels);
    let (test_images, test_labels) = (m.test.images, m.test.labels);
    let varmap = VarMap::new();
    let vs = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = Mlp::new(vs)?;
    let mut sgd = SGD::new(varmap.all_vars(), 0.5)?;
    for epoch in 1..=200 {
        let logits = model.forward(&train_images)?;
        let log_sm = ops::log_softmax(&logits, D::Minus1)?;
        let loss = loss::nll(&log_sm, &train_labels)?;
        sgd.backward_step(&loss)?;
        let test_logits = model.forward(&test_images)?;
        let sum_ok = test_logits
            .argmax(D::Minus1)?
            .eq(&test_labels)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let test_accuracy = sum_ok / test_labels.dims1()? as f32;
        if epoch % 20 == 0 {
            println!(
                "{epoch:4} train loss: {:8.5} test acc: {:5.2}%",
                loss.to_scalar::<f32>()?,
                100. * test_accuracy
            );
        }
    }
    Ok(())
}

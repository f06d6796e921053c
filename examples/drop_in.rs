//! `examples/drop_in_plain.rs` with gradkit added in five lines: global-norm clipping around the
//! optimizer and a gradient monitor whose report is printed at the end. The README shows the
//! diff; `tests/drop_in_diff.rs` keeps it at five lines.
//!
//! ```sh
//! cargo run --release --example drop_in
//! ```

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, SGD, VarBuilder, VarMap, loss, ops};

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
    let mut sgd = gradkit::regularize::Clipped::<SGD>::with_max_norm(&varmap, 0.5, 1.0)?;
    let mut monitor = gradkit::diagnostics::GradMonitor::from_var_map(&varmap)?;
    for epoch in 1..=200 {
        let logits = model.forward(&train_images)?;
        let log_sm = ops::log_softmax(&logits, D::Minus1)?;
        let loss = loss::nll(&log_sm, &train_labels)?;
        monitor.backward_step(epoch, &loss, &mut sgd)?;
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
    println!("{}", monitor.report().summary_table());
    Ok(())
}

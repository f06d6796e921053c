//! # grad-diagnostics
//!
//! The instrument that tells a candle user whether their network's gradients vanish or explode,
//! and where:
//!
//! - [`GradMonitor`]: after `backward`, per-parameter and per-layer gradient statistics (norm,
//!   largest magnitude, mean, std, zero fraction, NaN/Inf counts), weight norms and
//!   update-to-weight ratios, in a bounded history;
//! - [`Probe`]: a pass-through module recording activation statistics (dead and saturated
//!   units) and the gradient arriving at that point — candle has no hooks;
//! - detectors ([`detect`]) for vanishing and exploding gradients, NaN/Inf, dead and saturated
//!   units and update ratios, each naming the layers and a remedy in gradkit's API;
//! - [`GradMonitor::preflight`]: one forward and backward at initialisation, before any step,
//!   predicting from the depth profile whether the signal vanishes or explodes, with dead and
//!   saturated units, the layers named and the remedy;
//! - [`GradMonitor::gradient_noise`]: the simple noise scale and each layer's gradient
//!   signal-to-noise ratio from the micro-batch gradients of one step;
//! - [`sharpness`]: the top Hessian eigenvalue against the learning rate's limit `2 / lr`;
//! - [`RunReport`] with a plain-text summary, a JSON Lines log ([`JsonlSink`], [`read_log`]),
//!   SVG plots ([`plot`]) and the `gradscope` command-line tool (feature `cli`).
//!
//! Built on [`grad_core`]; never depends on the other gradkit crates.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use gradkit::core::NamedVars;
//! use gradkit::diagnostics::{GradMonitor, MonitorConfig};
//!
//! let map = VarMap::new();
//! let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
//! let mut layers = candle_nn::seq();
//! for i in 0..6 {
//!     layers = layers.add(candle_nn::linear(8, 8, vb.pp(format!("layer.{i}")))?).add(candle_nn::Activation::Sigmoid);
//! }
//! let mut monitor = GradMonitor::new(NamedVars::from_var_map(&map), MonitorConfig::default())?;
//! let x = Tensor::ones((32, 8), DType::F32, &Device::Cpu)?;
//! for step in 0..3 {
//!     let grads = layers.forward(&x)?.sqr()?.mean_all()?.backward()?;
//!     monitor.observe(step, &grads)?;
//! }
//! println!("{}", monitor.report().summary_table());
//! # Ok::<(), gradkit::diagnostics::Error>(())
//! ```

mod detect;
mod error;
mod histogram;
mod jsonl;
mod monitor;
mod noise;
pub mod plot;
mod preflight;
mod probe;
mod record;
mod remedy;
mod report;
mod sharpness;
mod stats;
mod tensorboard;

pub use detect::{DetectorConfig, Detectors, Finding, FindingKind, Severity, detect};
pub use error::{Error, Result};
pub use histogram::{BINS, FIRST_EXPONENT, Histogram};
pub use jsonl::{BadLine, JsonlSink, LogContents, read_log};
pub use monitor::{GradMonitor, LayerGrouping, MonitorConfig, StepContext};
pub use preflight::{ActivationProfile, LayerProfile, Preflight, PreflightConfig, Verdict};
pub use probe::Probe;
pub use record::{
    ClipRecord, LayerNoise, LayerStats, NoiseRecord, ParamStats, ProbeKind, ProbeStats, StepRecord,
};
pub use remedy::Remedy;
pub use report::{LayerSummary, RunReport};
pub use sharpness::{Sharpness, SharpnessConfig, sharpness};
pub use tensorboard::TensorBoardSink;

#[cfg(test)]
mod autotraits {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<crate::GradMonitor>();
        assert_send_sync::<crate::Probe>();
        assert_send_sync::<crate::Error>();
        assert_send_sync::<crate::RunReport>();
    }
}

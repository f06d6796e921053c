//! # gradkit
//!
//! Keep deep networks trainable on [candle](https://github.com/huggingface/candle). This façade
//! re-exports gradkit's crates, each behind a default-on feature:
//!
//! | module | crate | feature |
//! | --- | --- | --- |
//! | [`core`] | `grad-core`: errors, fused norms, in-place updates, seeded RNG, gradcheck | always |
//! | `layers` | `grad-layers`: normalisation, dropout, activations, init | `layers` |
//! | `regularize` | `grad-regularize`: clipping, label smoothing, loss scaling | `regularize` |
//! | `diagnostics` | `grad-diagnostics`: gradient statistics, detectors, logs, plots | `diagnostics` |
//!
//! Users who want one piece can depend on that crate alone.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let g = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
//! assert_eq!(gradkit::core::global_norm(&[g], gradkit::core::NormType::L2)?, 5.0);
//! # Ok::<(), gradkit::core::Error>(())
//! ```

pub use grad_core as core;
#[cfg(feature = "diagnostics")]
pub use grad_diagnostics as diagnostics;
#[cfg(feature = "layers")]
pub use grad_layers as layers;
#[cfg(feature = "regularize")]
pub use grad_regularize as regularize;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

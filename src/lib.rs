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

/// Every item a diagnostics remedy names resolves: each is imported here, and the list must be
/// exactly what [`Remedy::api`](grad_diagnostics::Remedy::api) renders, so a renamed or moved
/// item fails this test instead of sending users to an API that is not there.
///
/// ```
/// macro_rules! resolved {
///     ($($($seg:ident)::+),* $(,)?) => {{
///         $(#[allow(unused_imports)] use $($seg)::+ as _;)*
///         vec![$(vec![$(stringify!($seg)),+].join("::")),*]
///     }};
/// }
/// let checked = resolved![
///     gradkit::layers::batch_norm,
///     gradkit::layers::layer_norm,
///     gradkit::layers::Activation::LeakyRelu,
///     gradkit::layers::init::Initializer::KaimingNormal,
///     gradkit::layers::prelu,
///     gradkit::layers::lsuv,
///     gradkit::layers::init::reinit,
///     gradkit::layers::init::Initializer::XavierNormal,
///     gradkit::layers::init::calculate_gain,
///     gradkit::regularize::Clipped,
///     gradkit::regularize::ClipRule::Norm,
///     gradkit::regularize::ClippedConfig,
///     gradkit::regularize::LossScaler,
///     gradkit::layers::rms_norm,
///     gradkit::layers::ops::layer_norm,
///     candle_nn::ops::softmax,
/// ];
/// let mut rendered: Vec<&str> = gradkit::diagnostics::Remedy::ALL
///     .iter()
///     .flat_map(|r| r.api().iter().copied())
///     .collect();
/// rendered.sort_unstable();
/// rendered.dedup();
/// let mut checked: Vec<&str> = checked.iter().map(String::as_str).collect();
/// checked.sort_unstable();
/// assert_eq!(rendered, checked);
/// ```
#[cfg(doctest)]
struct RemedyPathsResolve;

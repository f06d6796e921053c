//! # grad-layers
//!
//! Layers that keep activations and gradients in a healthy range through depth, for candle,
//! with PyTorch's semantics (checked against PyTorch's own outputs in `conformance/`):
//!
//! - [`BatchNorm`] over `[N, C]` to `[N, C, D, H, W]`, with running statistics, momentum or the
//!   cumulative average, and candle-nn's parameter names;
//! - the batch-independent normalisers [`LayerNorm`], [`GroupNorm`] and [`RmsNorm`], whose
//!   gradients reach every input and weight;
//! - functional forms in [`ops`], each with a composed candle-op oracle.
//!
//! On the CPU every forward and backward is a fused kernel (statistics in one read, the
//! normalisation in one read and one write, the backward in two passes, parallel with rayon);
//! other devices use the composed candle ops. Built on [`grad_core`]; never depends on the other
//! gradkit crates.
//!
//! ```
//! use candle_core::{DType, Device, Module, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use gradkit::layers::{BatchNormConfig, batch_norm, layer_norm};
//!
//! let map = VarMap::new();
//! let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
//! let bn = batch_norm(8, BatchNormConfig::default(), vb.pp("bn"))?;
//! let ln = layer_norm(8, Default::default(), vb.pp("ln"))?;
//! let x = Tensor::randn(0f32, 1.0, (32, 8), &Device::Cpu)?;
//! let y = ln.forward(&bn.forward_t(&x, true)?)?;
//! assert_eq!(y.dims(), [32, 8]);
//! # Ok::<(), gradkit::layers::Error>(())
//! ```

mod activation;
mod batch_norm;
mod check;
mod dropout;
mod error;
mod group_norm;
pub mod init;
mod instance_norm;
mod kernels;
mod layer_norm;
pub mod lsuv;
mod norm_block;
pub mod ops;
mod prelu;
mod residual;
mod reweight;
mod rms_norm;
mod row_norm_block;
mod running;
mod spectral_norm;
mod weight_norm;
mod weight_standardization;

pub use activation::{Activation, GeluApproximation, SELU_ALPHA, SELU_SCALE};
pub use batch_norm::{BatchNorm, BatchNormConfig, batch_norm};
pub use dropout::{Dropout, DropoutConfig, dropout};
pub use error::{Error, Result};
pub use group_norm::{GroupNorm, GroupNormConfig, group_norm};
pub use instance_norm::{InstanceNorm, InstanceNormConfig, InstanceNormDims, instance_norm};
pub use layer_norm::{Affine, LayerNorm, LayerNormConfig, layer_norm};
pub use norm_block::{BatchNormBlock, BatchNormBlockConfig, batch_norm_block};
pub use prelu::{PRelu, PReluConfig, prelu};
pub use residual::{ChannelAxis, LayerScale, LayerScaleConfig, ResidualScale, layer_scale, rezero};
pub use reweight::Reweight;
pub use rms_norm::{RmsNorm, RmsNormConfig, rms_norm};
pub use row_norm_block::{
    GroupNormBlock, GroupNormBlockConfig, LayerNormBlock, LayerNormBlockConfig, group_norm_block,
    layer_norm_block,
};
pub use spectral_norm::{
    SpectralNorm, SpectralNormConfig, spectral_norm_conv2d, spectral_norm_linear,
};
pub use weight_norm::{WeightNorm, WeightNormConfig, weight_norm_conv2d, weight_norm_linear};
pub use weight_standardization::{WeightStandardizationConfig, WeightStandardized, std_conv2d};

#[cfg(test)]
mod autotraits {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn layers_and_errors_are_send_and_sync() {
        assert_send_sync::<crate::Error>();
        assert_send_sync::<crate::BatchNorm>();
        assert_send_sync::<crate::LayerNorm>();
        assert_send_sync::<crate::GroupNorm>();
        assert_send_sync::<crate::InstanceNorm>();
        assert_send_sync::<crate::RmsNorm>();
        assert_send_sync::<crate::Dropout>();
        assert_send_sync::<crate::PRelu>();
        assert_send_sync::<crate::Activation>();
    }
}

//! Functional forms of the layers, in PyTorch's `torch.nn.functional` style, each with its
//! composed candle-op version (`*_composed`): the test oracle, and the path devices without a
//! fused kernel take.

mod activation;
mod batch_norm;
mod dropout;
mod group_norm;
mod layer_norm;
mod norm_block;
mod prelu;
mod reparam;
mod rms_norm;
mod row_norm_block;
mod rows;
mod scale;

pub use activation::{activation, activation_composed};
pub use batch_norm::{
    BatchMoments, BatchNormOutput, BatchNormStats, batch_norm, batch_norm_composed,
};
pub use dropout::{DropoutKind, dropout, dropout_composed, dropout_words};
pub(crate) use group_norm::group_norm_with_moments;
pub use group_norm::{group_norm, group_norm_composed};
pub use layer_norm::{layer_norm, layer_norm_composed};
pub(crate) use norm_block::check_block;
pub use norm_block::{BlockDropout, batch_norm_block, batch_norm_block_composed};
pub use prelu::{prelu, prelu_composed};
pub use reparam::{
    SpectralNormOutput, SpectralNormStep, norm_except_dim, power_vector_lengths, spectral_norm,
    standardize_weight, weight_norm,
};
pub use rms_norm::{default_rms_eps, rms_norm, rms_norm_composed};
pub(crate) use row_norm_block::{check_group_block, check_layer_block};
pub use row_norm_block::{
    group_norm_block, group_norm_block_composed, layer_norm_block, layer_norm_block_composed,
};
pub use scale::{channel_scale, channel_scale_composed};

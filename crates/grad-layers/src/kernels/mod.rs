//! Fused CPU kernels, as candle custom ops. Private: the public entry points in [`crate::ops`]
//! check shapes first and choose between these and the composed versions.

pub(crate) mod activation;
pub(crate) mod batch_norm;
pub(crate) mod channel;
pub(crate) mod dropout;
pub(crate) mod elementwise;
pub(crate) mod norm_block;
pub(crate) mod row_norm;
pub(crate) mod row_norm_block;

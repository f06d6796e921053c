//! Fused CPU kernels, as candle custom ops. Private: the public functions check their inputs
//! first and choose between these and the composed versions.

pub(crate) mod cross_entropy;

//! # grad-layers
//!
//! Layers that keep activations and gradients in a healthy range through depth, for candle:
//! batch norm and the batch-independent normalisers (layer, group and RMS norm), the seeded
//! dropout family, Leaky ReLU and related activations, and weight initialisation. Built on
//! [`grad_core`]; never depends on the other gradkit crates.
//!
//! This crate is being built: see the project's open issues for what lands here next.

pub use grad_core;

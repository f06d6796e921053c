//! # grad-regularize
//!
//! Remedies that act on gradients and targets, for candle: gradient clipping (value, global norm,
//! adaptive), a clipping optimizer wrapper, label-smoothed cross-entropy and dynamic loss
//! scaling. Built on [`grad_core`]; never depends on the other gradkit crates.
//!
//! This crate is being built: see the project's open issues for what lands here next.

pub use grad_core;

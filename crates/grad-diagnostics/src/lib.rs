//! # grad-diagnostics
//!
//! The instrument that tells a candle user whether gradients vanish or explode, and where:
//! gradient, update and activation statistics, detectors naming layers and remedies, JSON Lines
//! logs, SVG plots and the `gradscope` command-line tool. Built on [`grad_core`]; never depends on
//! the other gradkit crates.
//!
//! This crate is being built: see the project's open issues for what lands here next.

pub use grad_core;

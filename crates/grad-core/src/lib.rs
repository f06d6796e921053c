//! # grad-core
//!
//! The foundation every gradkit crate stands on, usable on its own in any candle training loop:
//!
//! - [`Error`] / [`Result`]: one structured error type; [`validate`] holds the hyper-parameter
//!   rules every config shares.
//! - [`global_norm`] / [`multi_norm`]: fused multi-tensor norms (p = 1, 2, inf or any p > 0)
//!   accumulated in f64, with NaN/Inf counts from the same single read, deterministic whatever
//!   the thread count.
//! - [`scale_in_place`] / [`clamp_in_place`]: gradient updates that write into the existing
//!   storage on the CPU instead of allocating per parameter.
//! - [`NamedVars`] / [`NamedGrads`]: the trainable parameters of a `VarMap` (or a list) with
//!   names and a stable order, and exactly their gradients out of a `GradStore`.
//! - [`Philox`]: a seeded counter-based generator (Philox 4x32-10) with parallel, reproducible
//!   uniform, normal and Bernoulli fills; implements `rand_core`'s traits.
//! - [`gradcheck`]: autograd against central finite differences, as `torch.autograd.gradcheck`.
//! - [`cpu`]: the toolkit gradkit's fused CPU kernels are written with (dtype dispatch,
//!   layout-aware element access, parallel maps, vectorisable reductions) — needed only to write
//!   a kernel, not to use one; [`device`]: the seam between the fused and the composed path.
//! - `strategies` (feature `proptest`): proptest strategies for tensors of any shape, dtype,
//!   layout and value class.
//!
//! ```
//! use candle_core::{DType, Device, Var};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use gradkit::core::{NamedVars, NormType, global_norm};
//!
//! let map = VarMap::new();
//! let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
//! let model = candle_nn::linear(3, 2, vb.pp("fc"))?;
//! let x = Var::randn(0f32, 1.0, (4, 3), &Device::Cpu)?; // an input that also gets a gradient
//! let store = model.forward(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
//!
//! let grads = NamedVars::from_var_map(&map).grads(&store)?;
//! assert_eq!(grads.len(), 2); // fc.bias and fc.weight, never the input
//! let norm = global_norm(&grads.tensors(), NormType::L2)?;
//! assert!(norm > 0.0);
//! # Ok::<(), gradkit::core::Error>(())
//! ```

mod alloc;
pub mod cpu;
pub mod device;
mod error;
mod gradcheck;
mod inplace;
pub mod mask;
mod norm;
mod params;
pub mod rng;
pub mod step;
#[cfg(feature = "proptest")]
pub mod strategies;
mod threads;
pub mod validate;

pub use alloc::{AllocatorTuning, tune_allocator};
pub use error::{Error, Result, downcast, to_candle};
pub use gradcheck::{GradcheckConfig, GradcheckReport, InputReport, WorstElement, gradcheck};
pub use inplace::{
    center_rows_in_place, clamp_all_in_place, clamp_in_place, scale_all_in_place, scale_in_place,
    scale_rows_in_place, unit_count, unscale_all_in_place, unscale_in_place,
};
pub use norm::{
    MultiNorm, NormType, TensorNorm, ensure_same_device, global_norm, multi_norm, unit_norm_tensor,
    unit_norms,
};
pub use params::{
    BUFFER_NAMES, NamedGrad, NamedGrads, NamedVars, VarOrder, is_buffer_name, natural_cmp,
};
pub use rng::{Philox, PhiloxState};
pub use threads::{ThreadTuning, tune_threads};

#[cfg(test)]
mod autotraits {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<crate::Error>();
        assert_send_sync::<crate::Philox>();
        assert_send_sync::<crate::NamedVars>();
        assert_send_sync::<crate::NamedGrads>();
        assert_send_sync::<crate::MultiNorm>();
        assert_send_sync::<crate::GradcheckReport>();
    }
}

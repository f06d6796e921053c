//! Running statistics of a normalisation layer, as PyTorch keeps them for `BatchNorm*d` and
//! `InstanceNorm*d` with `track_running_stats`: `running_mean`, `running_var` and
//! `num_batches_tracked`, updated as `running = (1 - f) running + f batch`, where
//! `f = momentum`, or `1 / num_batches_tracked` (the cumulative moving average) when `momentum`
//! is `None`. The update stays on the tensors' device (nothing is read back) and runs under a
//! per-layer lock, so training forwards from several threads each count once.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::Result;

/// The buffer name PyTorch uses for the count of training batches.
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// The running statistics and their batch counter.
#[derive(Debug, Clone)]
pub(crate) struct Running {
    mean: Var,
    var: Var,
    num_batches_tracked: Var,
    /// Held while the three are updated (shared by clones, which share the variables).
    update: Arc<Mutex<()>>,
}

impl Running {
    /// The buffers of `num_features` channels, taken from or created in `vb` (mean 0, variance
    /// 1, counter 0). A checkpoint from candle-nn has no counter: it starts at 0, as PyTorch
    /// does when it loads an old state dict.
    pub(crate) fn new(num_features: usize, vb: &VarBuilder) -> Result<Self> {
        let mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.0))?;
        let var = vb.get_with_hints(num_features, "running_var", Init::Const(1.0))?;
        let nbt =
            match vb.get_with_hints_dtype((), NUM_BATCHES_TRACKED, Init::Const(0.0), DType::I64) {
                Ok(t) => t,
                Err(_) if !vb.contains_tensor(NUM_BATCHES_TRACKED) => {
                    Tensor::zeros((), DType::I64, vb.device())?
                }
                Err(e) => return Err(e.into()),
            };
        Ok(Self {
            mean: Var::from_tensor(&mean)?,
            var: Var::from_tensor(&var)?,
            num_batches_tracked: Var::from_tensor(&nbt)?,
            update: Arc::new(Mutex::new(())),
        })
    }

    /// Counts one training batch and blends in its per-channel `mean` and `var` (`var` times
    /// `var_scale`, the unbiasing factor when `var` is biased).
    pub(crate) fn update(
        &self,
        momentum: Option<f64>,
        mean: &Tensor,
        var: &Tensor,
        var_scale: f64,
    ) -> Result<()> {
        let _guard = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let counter = self.num_batches_tracked.as_tensor();
        let tracked = counter.broadcast_add(&Tensor::ones((), DType::I64, counter.device())?)?;
        self.num_batches_tracked.set(&tracked)?;
        let wide = grad_core::device::wide_dtype(counter.device());
        // f, the newest batch's weight: the momentum, or 1 / num_batches_tracked.
        let f = match momentum {
            Some(m) => grad_core::device::scalar(m, wide, counter.device())?,
            None => tracked.to_dtype(wide)?.recip()?,
        };
        let keep = f.affine(-1.0, 1.0)?;
        let blend = |running: &Var, batch: &Tensor, scale: f64| -> Result<()> {
            let old = running.as_tensor().to_dtype(wide)?.broadcast_mul(&keep)?;
            let new = batch
                .to_dtype(wide)?
                .affine(scale, 0.0)?
                .broadcast_mul(&f)?;
            Ok(running.set(&(old + new)?.to_dtype(running.dtype())?)?)
        };
        blend(&self.mean, mean, 1.0)?;
        blend(&self.var, var, var_scale)
    }

    /// The running mean, `[C]`.
    pub(crate) fn mean(&self) -> &Tensor {
        self.mean.as_tensor()
    }

    /// The running variance, `[C]`.
    pub(crate) fn var(&self) -> &Tensor {
        self.var.as_tensor()
    }

    /// The number of training batches seen (read back from the device).
    pub(crate) fn num_batches_tracked(&self) -> Result<i64> {
        Ok(self.num_batches_tracked.as_tensor().to_scalar::<i64>()?)
    }
}

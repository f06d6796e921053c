//! Pieces the examples share: the digits data, mini-batches, accuracy, the output folder and
//! the one-line error exit. Included by each example with `#[path = "../support/mod.rs"]`.

#![allow(dead_code, reason = "each example uses part of the support module")]

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{D, DType, Device, Tensor};
use grad_core::Philox;
pub use grad_testkit::digits::{Digits, Split};

/// The examples' error: any error, with the context it happened in.
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The examples' result.
pub type Result<T> = std::result::Result<T, BoxError>;

/// Wraps an error with what was being done.
pub fn context<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> BoxError {
    move |e| format!("{what}: {e}").into()
}

/// Prints `error: ...` on one line and returns the failure exit status.
pub fn fail(e: &BoxError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// The repository's copy of the digits set.
pub fn default_data() -> PathBuf {
    grad_testkit::digits::default_path()
}

/// Loads the digits set from `path`, with the path in any error.
pub fn load_digits(path: &Path) -> Result<Digits> {
    grad_testkit::digits::load(path, &Device::Cpu)
        .map_err(context("cannot read the digits data set"))
}

/// The mini-batches of one epoch: `n` row indices in a seeded random order, cut into `batch`-row
/// tensors of u32 indices (the last one shorter).
pub fn epoch_batches(n: usize, batch: usize, rng: &mut Philox) -> Result<Vec<Tensor>> {
    let mut keys = vec![0u32; n];
    rng.fill_u32(&mut keys);
    let mut order: Vec<u32> = (0..u32::try_from(n)?).collect();
    order.sort_by_key(|&i| (keys[i as usize], i));
    order
        .chunks(batch.max(1))
        .map(|c| Ok(Tensor::new(c, &Device::Cpu)?))
        .collect()
}

/// The rows of `split` at `idx`: images and labels.
pub fn rows(split: &Split, idx: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((
        split.images.index_select(idx, 0)?,
        split.labels.index_select(idx, 0)?,
    ))
}

/// The fraction of rows whose largest logit is the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let hits = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F64)?;
    Ok(hits.mean_all()?.to_scalar::<f64>()?)
}

/// An output folder that was checked to be writable before any work starts, so a run never
/// trains for minutes and then fails to save.
#[derive(Debug, Clone)]
pub struct OutDir(PathBuf);

impl OutDir {
    /// Creates `path` (and its parents) and checks a file can be written there.
    pub fn create(path: &Path) -> Result<Self> {
        let unwritable = context(format!(
            "output directory {} is not writable",
            path.display()
        ));
        std::fs::create_dir_all(path).map_err(context(format!(
            "cannot create output directory {}",
            path.display()
        )))?;
        let probe = path.join(".gradkit-write-check");
        std::fs::write(&probe, b"").map_err(unwritable)?;
        std::fs::remove_file(&probe)
            .map_err(context(format!("cannot clean {}", path.display())))?;
        Ok(Self(path.to_path_buf()))
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A sub-folder, created.
    pub fn sub(&self, name: &str) -> Result<Self> {
        Self::create(&self.0.join(name))
    }

    /// Writes `contents` to `name` whole: to a temporary file first, then renamed, so a crash
    /// never leaves half a report.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents)
            .map_err(context(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(context(format!("cannot write {}", path.display())))?;
        Ok(path)
    }

    /// [`OutDir::write`] of a value as pretty JSON.
    pub fn write_json(&self, name: &str, value: &impl serde::Serialize) -> Result<PathBuf> {
        self.write(name, serde_json::to_string_pretty(value)?.as_bytes())
    }
}

/// The kinds of a report's findings in words (`"vanishing, updateratio"`), or `"none"`.
pub fn finding_kinds(report: &grad_diagnostics::RunReport) -> String {
    let mut kinds: Vec<String> = report
        .findings
        .iter()
        .map(|f| format!("{:?}", f.kind).to_lowercase())
        .collect();
    kinds.dedup();
    if kinds.is_empty() {
        "none".into()
    } else {
        kinds.join(", ")
    }
}

/// A progress bar over `len` steps, hidden when `quiet`.
pub fn progress(len: u64, label: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos:>5}/{len} {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// Plain SGD, or SGD wrapped in gradkit's global-norm clipper.
pub enum Sgd {
    /// candle-nn's SGD as is.
    Plain(candle_nn::SGD),
    /// Clipped at a global L2 norm; non-finite steps skipped.
    Clipped(Box<grad_regularize::Clipped<candle_nn::SGD>>),
}

impl Sgd {
    /// SGD over `params` at `lr`, clipped at `max_norm` when given.
    pub fn new(params: &grad_core::NamedVars, lr: f64, max_norm: Option<f64>) -> Result<Self> {
        use candle_nn::Optimizer;
        use grad_regularize::{ClipPolicy, ClipRule, Clipped, ClippedConfig};
        Ok(match max_norm {
            None => Self::Plain(candle_nn::SGD::new(params.vars().to_vec(), lr)?),
            Some(m) => {
                let config = ClippedConfig {
                    max_consecutive_skips: None,
                    ..ClippedConfig::new(ClipPolicy::single(ClipRule::max_norm(m))?)
                };
                Self::Clipped(Box::new(Clipped::new(params.clone(), lr, config)?))
            }
        })
    }

    /// One step; returns whether the gradients were clipped.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<bool> {
        match self {
            Self::Plain(sgd) => {
                candle_nn::Optimizer::step(sgd, grads)?;
                Ok(false)
            }
            Self::Clipped(c) => Ok(c.try_step(grads)?.clipped),
        }
    }

    /// The clipper's counters (zero for plain SGD).
    pub fn counters(&self) -> grad_regularize::ClipCounters {
        match self {
            Self::Plain(_) => grad_regularize::ClipCounters::default(),
            Self::Clipped(c) => c.counters(),
        }
    }
}

//! The engine of the vanishing-gradients demo, shared by `main.rs` and the test that runs a
//! reduced version (`tests/vanishing_demo.rs`).
//!
//! One deep MLP on the digits data, trained with the same seed, optimizer (plain SGD) and budget
//! in four set-ups, each adding a remedy to the last:
//!
//! 1. sigmoid with PyTorch's default `nn.Linear` init, `U[-1/sqrt(fan_in), 1/sqrt(fan_in)]` — the
//!    "standard" init Glorot & Bengio (2010) showed makes deep sigmoid nets' gradients vanish;
//! 2. Kaiming init (He et al. 2015) with Leaky ReLU;
//! 3. the same with batch norm after every hidden linear layer (Ioffe & Szegedy 2015);
//! 4. the same with dropout before the classifier and global-norm gradient clipping;
//! 5. set-up 1 again (sigmoid, default init, no normalisation), each hidden layer made a
//!    residual block `h + alpha sigmoid(W h + b)` with ReZero's `alpha` starting at 0
//!    (Bachlechner et al. 2020): the network starts as the identity, so the gradient reaches
//!    the first layer whole.
//!
//! A `GradMonitor` watches every run; three `Probe`s watch the first, middle and last hidden
//! activations. [`initial`] runs the monitor's preflight and the sharpness estimate on each
//! set-up's network at initialisation, on the first batch its training run would take: the
//! prediction before any step.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Linear, VarBuilder, VarMap};
use grad_core::{NamedVars, Philox};
use grad_diagnostics::{
    Finding, GradMonitor, JsonlSink, LayerGrouping, MonitorConfig, Preflight, PreflightConfig,
    Probe, ProbeKind, RunReport, Sharpness, SharpnessConfig, StepRecord, sharpness,
};
use grad_layers::init::{FanMode, Initializer, Nonlinearity, reinit};
use grad_layers::{
    Activation, BatchNorm, BatchNormConfig, Dropout, DropoutConfig, ResidualScale, batch_norm,
    dropout, rezero,
};
use grad_regularize::{CrossEntropyConfig, cross_entropy};
use serde::Serialize;

use crate::support::{Digits, Result, Sgd, accuracy, context, epoch_batches, rows};

/// Dropout probability in set-up 4, before the classifier only: dropout between batch-norm
/// layers shifts their statistics from training to evaluation (Li et al. 2019), and over 16
/// layers the shift compounds.
pub const DROPOUT_P: f64 = 0.1;
/// Global-norm clipping threshold in set-up 4.
pub const CLIP_MAX_NORM: f64 = 5.0;
/// Leaky ReLU's slope (PyTorch's default).
const LEAKY_SLOPE: f64 = 0.01;

/// The training budget and model size, the same for every set-up.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Passes over the training set.
    pub epochs: usize,
    /// Hidden layers.
    pub depth: usize,
    /// Units per hidden layer.
    pub width: usize,
    /// Rows per mini-batch.
    pub batch_size: usize,
    /// SGD's learning rate.
    pub lr: f64,
    /// Seed of the initialisation, the batch order and dropout.
    pub seed: u64,
    /// Observe the gradients every this many steps.
    pub observe_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            epochs: 30,
            depth: 16,
            width: 64,
            batch_size: 32,
            lr: 0.05,
            seed: 7,
            observe_every: 5,
        }
    }
}

impl Options {
    /// Rejects nonsense before any work starts.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("--epochs", self.epochs),
            ("--depth", self.depth),
            ("--width", self.width),
            ("--batch-size", self.batch_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be at least 1, got 0").into());
            }
        }
        if self.depth > 1000 {
            return Err(format!("--depth must be at most 1000, got {}", self.depth).into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("--lr must be a positive number, got {}", self.lr).into());
        }
        if self.observe_every == 0 {
            return Err("--observe-every must be at least 1, got 0".into());
        }
        Ok(())
    }
}

/// One training set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Setup {
    /// Sigmoid with PyTorch's default Linear init: the vanishing case.
    NaiveSigmoid,
    /// Kaiming init with Leaky ReLU.
    KaimingLeaky,
    /// + batch norm.
    BatchNorm,
    /// + dropout and global-norm clipping.
    AllRemedies,
    /// Set-up 1 with residual blocks scaled by ReZero's `alpha`.
    ReZero,
}

impl Setup {
    /// The five, in the order they are run.
    pub const ALL: [Self; 5] = [
        Self::NaiveSigmoid,
        Self::KaimingLeaky,
        Self::BatchNorm,
        Self::AllRemedies,
        Self::ReZero,
    ];

    /// The folder name of the set-up's outputs.
    pub fn slug(self) -> &'static str {
        match self {
            Self::NaiveSigmoid => "1-sigmoid-default-init",
            Self::KaimingLeaky => "2-kaiming-leaky-relu",
            Self::BatchNorm => "3-batch-norm",
            Self::AllRemedies => "4-all-remedies",
            Self::ReZero => "5-sigmoid-rezero",
        }
    }

    /// A human title.
    pub fn title(self) -> &'static str {
        match self {
            Self::NaiveSigmoid => "(1) sigmoid, default init",
            Self::KaimingLeaky => "(2) Kaiming + Leaky ReLU",
            Self::BatchNorm => "(3) + BatchNorm",
            Self::AllRemedies => "(4) + dropout + clipping",
            Self::ReZero => "(5) (1) as residual blocks with ReZero",
        }
    }

    fn activation(self) -> Activation {
        match self {
            Self::NaiveSigmoid | Self::ReZero => Activation::Sigmoid,
            _ => Activation::LeakyRelu {
                negative_slope: LEAKY_SLOPE,
            },
        }
    }

    /// The weight init: PyTorch's `nn.Linear` default for set-up 1, Kaiming otherwise.
    fn weight_init(self, fan_in: usize) -> Initializer {
        match self {
            Self::NaiveSigmoid | Self::ReZero => {
                #[allow(clippy::cast_precision_loss, reason = "a layer width")]
                let bound = 1.0 / (fan_in as f64).sqrt();
                Initializer::Uniform {
                    lo: -bound,
                    hi: bound,
                }
            }
            _ => Initializer::KaimingNormal {
                a: LEAKY_SLOPE,
                mode: FanMode::FanIn,
                nonlinearity: Nonlinearity::LeakyRelu,
            },
        }
    }
}

/// What one set-up achieved.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Which set-up.
    pub setup: Setup,
    /// Its title.
    pub title: String,
    /// Accuracy on the held-out fifth of the data.
    pub test_accuracy: f64,
    /// Mean training loss over the last epoch.
    pub final_train_loss: f64,
    /// Median over the run of the first layer's gradient norm divided by the last layer's.
    pub first_last_ratio: f64,
    /// Training time in seconds (monitor included).
    pub wall_seconds: f64,
    /// SGD steps taken.
    pub steps: u64,
    /// Steps whose gradients were clipped (set-up 4 only).
    pub clipped_steps: u64,
    /// The detectors' findings, in words.
    pub findings: Vec<String>,
    /// The monitor's report of the run.
    pub report: RunReport,
    /// The observed steps (for plots; not serialised — the JSONL log holds them).
    #[serde(skip)]
    pub records: Vec<StepRecord>,
}

/// A hidden layer: linear, optional batch norm, activation, optional dropout, optional probe;
/// with `rezero`, a residual block `h + alpha f(h)`.
struct Hidden {
    linear: Linear,
    rezero: Option<ResidualScale>,
    norm: Option<BatchNorm>,
    activation: Activation,
    dropout: Option<Dropout>,
    probe: Option<Probe>,
}

/// The deep MLP.
struct Mlp {
    hidden: Vec<Hidden>,
    head: Linear,
}

impl Mlp {
    /// Builds the set-up's network in `map` (parameters `layer.{i}.weight`, `layer.{i}.bias`,
    /// and `layer.{i}.bn.*`; the head is `layer.{depth}`), initialised from `rng`.
    fn new(setup: Setup, options: &Options, map: &VarMap, rng: &mut Philox) -> Result<Self> {
        let vb = VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
        let (depth, width) = (options.depth, options.width);
        let probed = [0, depth / 2, depth - 1];
        // Set-up 5's probes see the residual stream `h + alpha sigmoid(..)`, not a sigmoid's
        // output.
        let kind = match setup {
            Setup::NaiveSigmoid => ProbeKind::Sigmoid,
            _ => ProbeKind::Linear,
        };
        let mut hidden = Vec::with_capacity(depth);
        for i in 0..depth {
            let vb = vb.pp(format!("layer.{i}"));
            let linear = candle_nn::linear(if i == 0 { 64 } else { width }, width, vb.clone())?;
            let norm = match setup {
                Setup::BatchNorm | Setup::AllRemedies => {
                    Some(batch_norm(width, BatchNormConfig::default(), vb.pp("bn"))?)
                }
                _ => None,
            };
            let dropout = match setup {
                Setup::AllRemedies if i + 1 == depth => Some(dropout(
                    DropoutConfig {
                        p: DROPOUT_P,
                        seed: Some(options.seed.wrapping_add(1 + i as u64)),
                        ..DropoutConfig::default()
                    },
                    vb.pp("dropout"),
                )?),
                _ => None,
            };
            // A residual block needs its input's width: the first layer (64 inputs) is one only
            // when the width is 64.
            let in_width = if i == 0 { 64 } else { width };
            let rezero = (setup == Setup::ReZero && in_width == width)
                .then(|| rezero(0.0, vb.clone()))
                .transpose()?;
            hidden.push(Hidden {
                linear,
                rezero,
                norm,
                activation: setup.activation(),
                dropout,
                probe: probed
                    .contains(&i)
                    .then(|| Probe::new(format!("layer.{i}.act"), kind, 20)),
            });
        }
        let head = candle_nn::linear(width, 10, vb.pp(format!("layer.{depth}")))?;
        // candle's CPU generator cannot be seeded: re-draw every weight from gradkit's stream.
        reinit(map, rng, |name, shape| {
            if name.ends_with(".bn.weight") || name.ends_with(".bn.bias") {
                None
            } else if name.ends_with(".weight") {
                Some(setup.weight_init(shape.get(1).copied().unwrap_or(1)))
            } else if name.ends_with(".alpha") {
                None
            } else if matches!(setup, Setup::NaiveSigmoid | Setup::ReZero) {
                // PyTorch draws a bias like its weight: the bound is the layer's fan-in.
                let first = name.starts_with("layer.0.");
                Some(setup.weight_init(if first { 64 } else { width }))
            } else {
                Some(Initializer::Zeros)
            }
        })?;
        Ok(Self { hidden, head })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.hidden {
            let input = h.clone();
            h = layer.linear.forward(&h)?;
            if let Some(norm) = &layer.norm {
                h = norm.try_forward(&h, train)?;
            }
            h = layer.activation.try_forward(&h)?;
            if let Some(alpha) = &layer.rezero {
                h = (input + alpha.forward(&h)?)?;
            }
            if let Some(d) = &layer.dropout {
                h = d.forward_t(&h, train)?;
            }
            if let Some(p) = &layer.probe {
                h = p.try_forward(&h)?;
            }
        }
        Ok(self.head.forward(&h)?)
    }

    fn probes(&self) -> impl Iterator<Item = &Probe> {
        self.hidden.iter().filter_map(|h| h.probe.as_ref())
    }

    fn set_probes(&self, enabled: bool) {
        self.probes().for_each(|p| p.set_enabled(enabled));
    }
}

/// A set-up's network and monitor at initialisation, with the stream that draws its batches.
struct Start {
    rng: Philox,
    mlp: Mlp,
    params: NamedVars,
    monitor: GradMonitor,
    n_train: usize,
}

impl Start {
    fn new(setup: Setup, data: &Digits, options: &Options) -> Result<Self> {
        let mut rng = Philox::new(options.seed);
        let map = VarMap::new();
        let mlp = Mlp::new(setup, options, &map, &mut rng)?;
        let params = NamedVars::from_var_map(&map);
        let n_train = data.train.images.dim(0)?;
        let steps_per_epoch = n_train.div_ceil(options.batch_size) as u64;
        let total = steps_per_epoch * options.epochs as u64;
        let config = MonitorConfig {
            every: options.observe_every,
            history: usize::try_from(total / options.observe_every + 1)?,
            grouping: LayerGrouping::Components(2),
            ..MonitorConfig::default()
        };
        let mut monitor = GradMonitor::new(params.clone(), config)?;
        for p in mlp.probes() {
            monitor.add_probe(p);
        }
        Ok(Self {
            rng,
            mlp,
            params,
            monitor,
            n_train,
        })
    }
}

/// What the instruments say about a set-up at initialisation, before any step.
#[derive(Debug, Clone)]
pub struct Initial {
    /// The monitor's preflight on the first batch.
    pub preflight: Preflight,
    /// The top Hessian eigenvalue of that batch's loss (10 power iterations); `None` for the
    /// set-up with dropout, whose loss draws a new mask at every evaluation, so that the
    /// finite differences would measure the mask's noise.
    pub sharpness: Option<Sharpness>,
}

/// The monitor's preflight of `setup` at initialisation and the loss's sharpness, on the first
/// batch its training run takes.
pub fn initial(setup: Setup, data: &Digits, options: &Options) -> Result<Initial> {
    options.validate()?;
    let Start {
        mut rng,
        mlp,
        params,
        mut monitor,
        n_train,
    } = Start::new(setup, data, options)?;
    let batches = epoch_batches(n_train, options.batch_size, &mut rng)?;
    let first = batches.first().ok_or("no training batch")?;
    let (x, y) = rows(&data.train, first)?;
    let loss_options = CrossEntropyConfig::default();
    let forward = || {
        let logits = mlp.forward_t(&x, true).map_err(candle_core::Error::wrap)?;
        cross_entropy(&logits, &y, &loss_options).map_err(candle_core::Error::wrap)
    };
    let preflight = monitor.preflight(forward, &PreflightConfig::default())?;
    let sharpness = (setup != Setup::AllRemedies)
        .then(|| {
            let config = SharpnessConfig {
                iterations: 10,
                grouping: LayerGrouping::Components(2),
                ..SharpnessConfig::default()
            };
            sharpness(&params, forward, &config)
        })
        .transpose()?;
    Ok(Initial {
        preflight,
        sharpness,
    })
}

/// Trains `setup` on `data`; appends each observed step to the JSON Lines log at `log` (when
/// given); calls `on_step(step, loss)` after each SGD step.
pub fn run(
    setup: Setup,
    data: &Digits,
    options: &Options,
    log: Option<&Path>,
    mut on_step: impl FnMut(u64, f64),
) -> Result<Outcome> {
    options.validate()?;
    let start = Instant::now();
    let Start {
        mut rng,
        mlp,
        params,
        mut monitor,
        n_train,
    } = Start::new(setup, data, options)?;
    let clip = (setup == Setup::AllRemedies).then_some(CLIP_MAX_NORM);
    monitor.set_clip_threshold(clip);
    let mut optimizer = Sgd::new(&params, options.lr, clip)?;
    let mut sink = log
        .map(|p| JsonlSink::create(p).map_err(context("cannot create the log")))
        .transpose()?;
    let loss_options = CrossEntropyConfig::default();
    let (mut step, mut clipped_steps, mut epoch_loss) = (0u64, 0u64, 0.0);
    for _ in 0..options.epochs {
        epoch_loss = 0.0;
        let batches = epoch_batches(n_train, options.batch_size, &mut rng)?;
        for idx in &batches {
            let (x, y) = rows(&data.train, idx)?;
            let loss = cross_entropy(&mlp.forward_t(&x, true)?, &y, &loss_options)?;
            let grads = loss.backward()?;
            if let Some(record) = monitor.observe(step, &grads)?
                && let Some(sink) = sink.as_mut()
            {
                sink.write(record)?;
            }
            clipped_steps += u64::from(optimizer.step(&grads)?);
            let value = f64::from(loss.to_scalar::<f32>()?);
            #[allow(clippy::cast_precision_loss, reason = "a batch count")]
            {
                epoch_loss += value / batches.len() as f64;
            }
            step += 1;
            on_step(step, value);
        }
    }
    mlp.set_probes(false);
    let test_accuracy = accuracy(&mlp.forward_t(&data.test.images, false)?, &data.test.labels)?;
    let report = monitor.report();
    let first_last_ratio = match (report.layers.first(), report.layers.last()) {
        (Some(first), Some(last)) => first.median_grad_norm / last.median_grad_norm,
        _ => f64::NAN,
    };
    Ok(Outcome {
        setup,
        title: setup.title().to_owned(),
        test_accuracy,
        final_train_loss: epoch_loss,
        first_last_ratio,
        wall_seconds: start.elapsed().as_secs_f64(),
        steps: step,
        clipped_steps,
        findings: report.findings.iter().map(Finding::to_string).collect(),
        records: monitor.history().cloned().collect(),
        report,
    })
}

//! The normalisation layers against PyTorch's vectors: every case, in f64 and in f32.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use grad_core::device::{Path, with_path};
use grad_layers::{
    Activation, BatchNormBlockConfig, BatchNormConfig, InstanceNormConfig, InstanceNormDims,
    batch_norm, batch_norm_block, instance_norm, ops,
};
use grad_testkit::{Case, CaseError, Outputs, Precision, grads_of, run, run_as};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Builds the case's input `name` as a variable (so it receives a gradient).
fn var(case: &Case, name: &str, p: Precision) -> Result<Var, CaseError> {
    Ok(Var::from_tensor(&case.input(name)?.to_tensor(p.dtype())?)?)
}

fn opt_var(case: &Case, name: &str, p: Precision) -> Result<Option<Var>, CaseError> {
    case.input_opt(name).map(|_| var(case, name, p)).transpose()
}

/// `y`, then `grad_<name>` for every named input that received a gradient, when the case has a
/// `grad_output`.
fn with_grads(
    case: &Case,
    p: Precision,
    y: Tensor,
    wrt: &[(&str, &Tensor)],
) -> Result<Outputs, CaseError> {
    let mut out = Outputs::new();
    if let Some(g) = case.input_opt("grad_output") {
        let upstream = g.to_tensor(p.dtype())?;
        let tensors: Vec<&Tensor> = wrt.iter().map(|(_, t)| *t).collect();
        for ((name, _), grad) in wrt.iter().zip(grads_of(&y, &upstream, &tensors)?) {
            if let Some(grad) = grad {
                out.insert(format!("grad_{name}"), grad);
            }
        }
    }
    out.insert("y".into(), y);
    Ok(out)
}

fn batch_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    batch_norm_layer_case(case, p, false)
}

/// The batch-norm cases through a batch-norm block whose activation is the identity (leaky ReLU
/// with slope 1) and without dropout.
fn batch_norm_block_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    batch_norm_layer_case(case, p, true)
}

/// A batch-norm case through the layer, or through a block (`block`) holding it.
fn batch_norm_layer_case(case: &Case, p: Precision, block: bool) -> Result<Outputs, CaseError> {
    let x = var(case, "x", p)?;
    let c = x.dim(1)?;
    let config = BatchNormConfig {
        eps: case.attr_f64("eps")?.ok_or("eps is null")?,
        momentum: case.attr_f64("momentum")?,
        affine: case.attr_bool("affine")?,
        track_running_stats: true,
    };
    // Build the layer in a VarMap, then overwrite its parameters and buffers with the case's.
    let mut map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, p.dtype(), &Device::Cpu);
    let (bn, block) = if block {
        let config = BatchNormBlockConfig {
            norm: config,
            activation: Activation::LeakyRelu {
                negative_slope: 1.0,
            },
            dropout: None,
        };
        let block = batch_norm_block(c, config, vb)?;
        (block.norm().clone(), Some(block))
    } else {
        (batch_norm(c, config, vb)?, None)
    };
    for name in ["weight", "bias", "running_mean", "running_var"] {
        if let Some(t) = case.input_opt(name) {
            map.set_one(name, t.to_tensor(p.dtype())?)?;
        }
    }
    map.set_one(
        "num_batches_tracked",
        case.input("num_batches_tracked")?.to_tensor(DType::I64)?,
    )?;
    let train = case.attr_bool("training")?;
    let y = match &block {
        Some(block) => block.try_forward(x.as_tensor(), train)?,
        None => bn.try_forward(x.as_tensor(), train)?,
    };
    let mut wrt = vec![("x", x.as_tensor())];
    if let (Some(w), Some(b)) = (bn.weight(), bn.bias()) {
        wrt.extend([("weight", w), ("bias", b)]);
    }
    let mut out = with_grads(case, p, y, &wrt)?;
    out.insert("running_mean".into(), bn.running_mean().unwrap().clone());
    out.insert("running_var".into(), bn.running_var().unwrap().clone());
    let nbt = bn.num_batches_tracked()?.unwrap();
    out.insert(
        "num_batches_tracked".into(),
        Tensor::new(nbt, &Device::Cpu)?,
    );
    Ok(out)
}

fn instance_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let x = var(case, "x", p)?;
    // The vectors' module follows the rank: InstanceNorm1d for [C, L] and [N, C, L], 2d for
    // rank 4, 3d for rank 5.
    let (dims, c) = match x.rank() {
        2 => (InstanceNormDims::One, x.dim(0)?),
        3 => (InstanceNormDims::One, x.dim(1)?),
        4 => (InstanceNormDims::Two, x.dim(1)?),
        _ => (InstanceNormDims::Three, x.dim(1)?),
    };
    let config = InstanceNormConfig {
        dims,
        eps: case.attr_f64("eps")?.ok_or("eps is null")?,
        momentum: case.attr_f64("momentum")?,
        affine: case.attr_bool("affine")?,
        track_running_stats: case.attr_bool("track_running_stats")?,
    };
    let mut map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, p.dtype(), &Device::Cpu);
    let layer = instance_norm(c, config, vb)?;
    for name in ["weight", "bias", "running_mean", "running_var"] {
        if let Some(t) = case.input_opt(name) {
            map.set_one(name, t.to_tensor(p.dtype())?)?;
        }
    }
    let y = layer.try_forward(x.as_tensor(), case.attr_bool("training")?)?;
    let mut wrt = vec![("x", x.as_tensor())];
    if let (Some(w), Some(b)) = (layer.weight(), layer.bias()) {
        wrt.extend([("weight", w), ("bias", b)]);
    }
    let mut out = with_grads(case, p, y, &wrt)?;
    if let (Some(m), Some(v)) = (layer.running_mean(), layer.running_var()) {
        out.insert("running_mean".into(), m.clone());
        out.insert("running_var".into(), v.clone());
    }
    Ok(out)
}

fn layer_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    layer_norm_op_case(case, p, false)
}

/// The identity as a block's activation: leaky ReLU with slope 1.
const IDENTITY: Activation = Activation::LeakyRelu {
    negative_slope: 1.0,
};

/// A layer-norm case through the op, or through a layer-norm block (`block`: identity
/// activation, no dropout).
fn layer_norm_op_case(case: &Case, p: Precision, block: bool) -> Result<Outputs, CaseError> {
    let x = var(case, "x", p)?;
    let k = usize::try_from(case.attr_i64("normalized_ndim")?.ok_or("normalized_ndim")?)?;
    let shape = x.dims()[x.rank() - k..].to_vec();
    let (w, b) = (opt_var(case, "weight", p)?, opt_var(case, "bias", p)?);
    let (w, b) = (
        w.as_ref().map(Var::as_tensor),
        b.as_ref().map(Var::as_tensor),
    );
    let eps = case.attr_f64("eps")?.ok_or("eps is null")?;
    let y = if block {
        ops::layer_norm_block(x.as_tensor(), &shape, w, b, eps, IDENTITY, None)?
    } else {
        ops::layer_norm(x.as_tensor(), &shape, w, b, eps)?
    };
    let mut wrt = vec![("x", x.as_tensor())];
    wrt.extend(w.map(|w| ("weight", w)));
    wrt.extend(b.map(|b| ("bias", b)));
    with_grads(case, p, y, &wrt)
}

fn group_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    group_norm_op_case(case, p, false)
}

/// A group-norm case through the op, or through a group-norm block (`block`: identity
/// activation, no dropout).
fn group_norm_op_case(case: &Case, p: Precision, block: bool) -> Result<Outputs, CaseError> {
    let x = var(case, "x", p)?;
    let groups = usize::try_from(case.attr_i64("num_groups")?.ok_or("num_groups")?)?;
    let (w, b) = (opt_var(case, "weight", p)?, opt_var(case, "bias", p)?);
    let (w, b) = (
        w.as_ref().map(Var::as_tensor),
        b.as_ref().map(Var::as_tensor),
    );
    let eps = case.attr_f64("eps")?.ok_or("eps is null")?;
    let y = if block {
        ops::group_norm_block(x.as_tensor(), groups, w, b, eps, IDENTITY, None)?
    } else {
        ops::group_norm(x.as_tensor(), groups, w, b, eps)?
    };
    let mut wrt = vec![("x", x.as_tensor())];
    wrt.extend(w.map(|w| ("weight", w)));
    wrt.extend(b.map(|b| ("bias", b)));
    with_grads(case, p, y, &wrt)
}

fn rms_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let x = var(case, "x", p)?;
    let k = usize::try_from(case.attr_i64("normalized_ndim")?.ok_or("normalized_ndim")?)?;
    let shape = x.dims()[x.rank() - k..].to_vec();
    let w = opt_var(case, "weight", p)?;
    let y = ops::rms_norm(
        x.as_tensor(),
        &shape,
        w.as_ref().map(Var::as_tensor),
        case.attr_f64("eps")?,
    )?;
    let mut wrt = vec![("x", x.as_tensor())];
    wrt.extend(w.as_ref().map(|w| ("weight", w.as_tensor())));
    with_grads(case, p, y, &wrt)
}

#[test]
fn batch_norm_f64() -> TestResult {
    run("batch_norm", Precision::F64, batch_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn batch_norm_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "batch_norm",
            "batch_norm_composed",
            Precision::F64,
            batch_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn batch_norm_f32() -> TestResult {
    run("batch_norm", Precision::F32, batch_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn batch_norm_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "batch_norm",
            "batch_norm_composed",
            Precision::F32,
            batch_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

/// The batch-norm vectors through a batch-norm block (identity activation, no dropout), on
/// the fused and the composed path.
#[test]
fn batch_norm_block_f64() -> TestResult {
    let run = |label| run_as("batch_norm", label, Precision::F64, batch_norm_block_case);
    run("batch_norm_block").assert_all_passed();
    with_path(Path::Composed, || run("batch_norm_block_composed")).assert_all_passed();
    Ok(())
}

#[test]
fn batch_norm_block_f32() -> TestResult {
    let run = |label| run_as("batch_norm", label, Precision::F32, batch_norm_block_case);
    run("batch_norm_block").assert_all_passed();
    with_path(Path::Composed, || run("batch_norm_block_composed")).assert_all_passed();
    Ok(())
}

/// The layer-norm and group-norm vectors through their blocks (identity activation, no
/// dropout), on the fused and the composed path, in f64 and f32.
#[test]
fn row_norm_blocks() -> TestResult {
    type CaseFn = fn(&Case, Precision) -> Result<Outputs, CaseError>;
    let cases: [(&str, CaseFn); 2] = [
        ("layer_norm", |c, p| layer_norm_op_case(c, p, true)),
        ("group_norm", |c, p| group_norm_op_case(c, p, true)),
    ];
    for (op, case) in cases {
        for p in [Precision::F64, Precision::F32] {
            let label = format!("{op}_block");
            run_as(op, &label, p, case).assert_all_passed();
            let label = format!("{op}_block_composed");
            with_path(Path::Composed, || run_as(op, &label, p, case)).assert_all_passed();
        }
    }
    Ok(())
}

#[test]
fn layer_norm_f64() -> TestResult {
    run("layer_norm", Precision::F64, layer_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn layer_norm_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "layer_norm",
            "layer_norm_composed",
            Precision::F64,
            layer_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn layer_norm_f32() -> TestResult {
    run("layer_norm", Precision::F32, layer_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn layer_norm_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "layer_norm",
            "layer_norm_composed",
            Precision::F32,
            layer_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn group_norm_f64() -> TestResult {
    run("group_norm", Precision::F64, group_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn group_norm_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "group_norm",
            "group_norm_composed",
            Precision::F64,
            group_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn group_norm_f32() -> TestResult {
    run("group_norm", Precision::F32, group_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn group_norm_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "group_norm",
            "group_norm_composed",
            Precision::F32,
            group_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn rms_norm_f64() -> TestResult {
    run("rms_norm", Precision::F64, rms_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn rms_norm_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "rms_norm",
            "rms_norm_composed",
            Precision::F64,
            rms_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn rms_norm_f32() -> TestResult {
    run("rms_norm", Precision::F32, rms_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn rms_norm_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "rms_norm",
            "rms_norm_composed",
            Precision::F32,
            rms_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn instance_norm_f64() -> TestResult {
    run("instance_norm", Precision::F64, instance_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path (what CUDA and Metal tensors run), on the CPU.
#[test]
fn instance_norm_composed_f64() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "instance_norm",
            "instance_norm_composed",
            Precision::F64,
            instance_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

#[test]
fn instance_norm_f32() -> TestResult {
    run("instance_norm", Precision::F32, instance_norm_case).assert_all_passed();
    Ok(())
}

/// The same vectors through the composed path, in f32.
#[test]
fn instance_norm_composed_f32() -> TestResult {
    with_path(Path::Composed, || {
        run_as(
            "instance_norm",
            "instance_norm_composed",
            Precision::F32,
            instance_norm_case,
        )
    })
    .assert_all_passed();
    Ok(())
}

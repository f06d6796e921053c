//! Residual-branch remedies: ReZero/SkipInit's scalar, LayerScale, zero-initialised last
//! layers and the LSTM forget-gate bias.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use grad_core::strategies::{LayoutKind, Values, build_tensor, values};
use grad_core::{GradcheckConfig, Philox, gradcheck};
use grad_layers::init::{lstm_forget_gate_bias, reinit, zero_init_residual};
use grad_layers::ops::{channel_scale, channel_scale_composed};
use grad_layers::{ChannelAxis, LayerScaleConfig, layer_scale, rezero};
use grad_testkit::grads_of;
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1())
        .unwrap_or_default()
}

/// The channel count of `dims` on `axis` (1 where the axis is missing).
fn channels(dims: &[usize], axis: ChannelAxis) -> usize {
    match axis {
        ChannelAxis::Last => dims.last().copied().unwrap_or(1),
        ChannelAxis::First => dims.get(1).copied().unwrap_or(1),
    }
}

/// The fused scale and the composed one agree, forward and in both gradients. The scale's
/// gradient is a sum over every element of its channel, summed in another order by each path,
/// so its tolerance grows with the element count (f32's rounding of a sum that can cancel).
fn check_fused_equals_composed(
    x: &Var,
    scale: &Var,
    axis: ChannelAxis,
    up: &Tensor,
    tol: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let sum_tol = tol * x.elem_count() as f64;
    let y = channel_scale(x.as_tensor(), scale.as_tensor(), axis)?;
    let z = channel_scale_composed(x.as_tensor(), scale.as_tensor(), axis)?;
    let wrt = [x.as_tensor(), scale.as_tensor()];
    let (gy, gz) = (grads_of(&y, up, &wrt)?, grads_of(&z, up, &wrt)?);
    let mut pairs = vec![(vals(&y), vals(&z))];
    for (a, b) in gy.iter().zip(&gz) {
        pairs.push((
            vals(a.as_ref().ok_or("no grad")?),
            vals(b.as_ref().ok_or("no grad")?),
        ));
    }
    let last = pairs.len() - 1;
    for (k, (a, b)) in pairs.into_iter().enumerate() {
        assert_eq!(a.len(), b.len());
        let tol = if k == last { sum_tol } else { tol };
        for (p, q) in a.iter().zip(&b) {
            assert!(
                (p - q).abs() <= tol * (1.0 + q.abs()),
                "{axis:?}, output {k}: {p} vs {q}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn channel_scale_fused_equals_composed(
        (dims, data, up) in prop::collection::vec(1usize..6, 2..5).prop_flat_map(|d| {
            let n: usize = d.iter().product();
            (Just(d), values(n, Values::Finite { lo: -6.0, hi: 6.0 }), values(n, Values::Finite { lo: -1.0, hi: 1.0 }))
        }),
        axis in prop::sample::select(vec![ChannelAxis::Last, ChannelAxis::First]),
        shared in any::<bool>(),
        dtype in prop::sample::select(vec![DType::F64, DType::F32]),
        layout in prop::sample::select(vec![LayoutKind::Contiguous, LayoutKind::Transposed, LayoutKind::Narrowed]),
    ) {
        let x = Var::from_tensor(&build_tensor(&dims, data, dtype, layout)?)?;
        let up = build_tensor(&dims, up, dtype, LayoutKind::Contiguous)?;
        let c = if shared { 1 } else { channels(&dims, axis) };
        let scale = Var::from_tensor(&Tensor::arange(0.0, c as f64, &Device::Cpu)?.affine(0.5, -1.0)?.to_dtype(dtype)?)?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
        check_fused_equals_composed(&x, &scale, axis, &up, tol).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

#[test]
fn channel_scale_splits_large_inputs_across_work_items_as_one() -> TestResult {
    // Planes and rows far past one work item, a scalar scale over 100k elements, and a
    // channel count that does not divide the work item.
    let cases = [
        (vec![3, 7, 9000], ChannelAxis::First, 7),
        (vec![40, 3001], ChannelAxis::Last, 3001),
        (vec![100_000], ChannelAxis::Last, 1),
        (vec![2, 5, 20_000], ChannelAxis::First, 1),
    ];
    for (k, (dims, axis, c)) in cases.into_iter().enumerate() {
        let seed = 10 + 2 * k as u64;
        let x = Var::from_tensor(&Philox::new(seed).normal(
            dims.as_slice(),
            0.0,
            1.0,
            DType::F64,
            &Device::Cpu,
        )?)?;
        let up =
            Philox::new(seed + 1).normal(dims.as_slice(), 0.0, 1.0, DType::F64, &Device::Cpu)?;
        let scale =
            Var::from_tensor(&Philox::new(99).normal(c, 0.0, 1.0, DType::F64, &Device::Cpu)?)?;
        check_fused_equals_composed(&x, &scale, axis, &up, 1e-10)?;
    }
    Ok(())
}

#[test]
fn channel_scale_passes_gradcheck_in_f64() -> TestResult {
    let x = Philox::new(3).normal((2, 3, 4), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    for (axis, c) in [
        (ChannelAxis::Last, 4),
        (ChannelAxis::First, 3),
        (ChannelAxis::Last, 1),
    ] {
        let s = Philox::new(4).normal(c, 0.0, 1.0, DType::F64, &Device::Cpu)?;
        gradcheck(
            |t: &[Tensor]| channel_scale(&t[0], &t[1], axis),
            &[x.clone(), s],
            &GradcheckConfig::default(),
        )?;
    }
    Ok(())
}

#[test]
fn channel_scale_rejects_bad_scales_and_keeps_non_finite_values() -> TestResult {
    let dev = Device::Cpu;
    let x = Tensor::ones((2, 3, 4), DType::F32, &dev)?;
    let bad = [
        (Tensor::ones(3, DType::F32, &dev)?, ChannelAxis::Last),
        (Tensor::ones(4, DType::F32, &dev)?, ChannelAxis::First),
        (Tensor::ones((1, 4), DType::F32, &dev)?, ChannelAxis::Last),
        (Tensor::ones(4, DType::F64, &dev)?, ChannelAxis::Last),
    ];
    for (s, axis) in bad {
        for f in [channel_scale, channel_scale_composed] {
            let e = f(&x, &s, axis).err().ok_or("a bad scale accepted")?;
            assert!(e.to_string().contains("scale"), "{e}");
        }
    }
    let ints = Tensor::ones((2, 3), DType::U32, &dev)?;
    assert!(
        channel_scale(
            &ints,
            &Tensor::ones(3, DType::U32, &dev)?,
            ChannelAxis::Last
        )
        .is_err()
    );
    // NaN and infinity pass through as a product does; an empty input stays empty.
    let x = Tensor::new(&[f32::NAN, f32::INFINITY, 2.0], &dev)?;
    let y = channel_scale(&x, &Tensor::new(&[0.5f32], &dev)?, ChannelAxis::Last)?;
    let y = y.to_vec1::<f32>()?;
    assert!(y[0].is_nan() && y[1] == f32::INFINITY && y[2] == 1.0);
    let empty = Tensor::zeros((0, 3), DType::F32, &dev)?;
    let s = Tensor::ones(3, DType::F32, &dev)?;
    assert_eq!(channel_scale(&empty, &s, ChannelAxis::Last)?.dims(), [0, 3]);
    Ok(())
}

#[test]
fn rezero_starts_as_the_identity_and_learns_its_gain() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(4, 4, vb.pp("block.fc"))?;
    let alpha = rezero(0.0, vb.pp("block"))?;
    let x = Philox::new(1).normal((3, 4), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let y = (&x + alpha.forward(&fc.forward(&x)?.relu()?)?)?;
    assert_eq!(y.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
    // The gain gets a gradient; the branch's weights get none while alpha is 0 (ReZero's
    // first step moves alpha only).
    let grads = y.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(alpha.alpha()).is_some());
    let gw = grads.get(fc.weight()).ok_or("no weight gradient")?;
    assert_eq!(gw.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    assert!(rezero(f64::NAN, vb.pp("bad")).is_err_and(|e| e.to_string().contains("init")));
    Ok(())
}

#[test]
fn layer_scale_scales_each_channel_on_either_axis() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let last = layer_scale(
        3,
        LayerScaleConfig {
            init: 0.5,
            axis: ChannelAxis::Last,
        },
        vb.pp("a"),
    )?;
    let x = Tensor::ones((2, 4, 3), DType::F32, &Device::Cpu)?;
    assert_eq!(last.forward(&x)?.to_vec3::<f32>()?[1][3], [0.5, 0.5, 0.5]);
    let first = layer_scale(
        4,
        LayerScaleConfig {
            init: 2.0,
            axis: ChannelAxis::First,
        },
        vb.pp("b"),
    )?;
    let img = Tensor::ones((2, 4, 5, 5), DType::F32, &Device::Cpu)?;
    let y = first.forward(&img)?;
    assert_eq!(y.dims(), [2, 4, 5, 5]);
    assert_eq!(y.sum_all()?.to_scalar::<f32>()?, 2.0 * 200.0);
    // The wrong channel count, a rank-1 input on the first axis and a NaN init are errors.
    assert!(last.try_forward(&img).is_err());
    assert!(
        first
            .try_forward(&Tensor::ones(4, DType::F32, &Device::Cpu)?)
            .is_err()
    );
    let e = layer_scale(
        3,
        LayerScaleConfig {
            init: f64::NAN,
            ..Default::default()
        },
        vb.pp("c"),
    )
    .err()
    .ok_or("a NaN init accepted")?;
    assert!(e.to_string().contains("init"), "{e}");
    assert_eq!(LayerScaleConfig::default().init, 1e-5);
    Ok(())
}

#[test]
fn zero_init_residual_zeroes_only_the_named_last_layers() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    for b in ["b1", "b2"] {
        candle_nn::linear(4, 4, vb.pp(format!("{b}.fc1")))?;
        candle_nn::linear(4, 4, vb.pp(format!("{b}.fc2")))?;
    }
    let last = ["b1.fc2", "b2.fc2"];
    let done = reinit(&map, &mut Philox::new(0), zero_init_residual(&last))?;
    assert_eq!(
        done,
        [
            "b1.fc2.bias",
            "b1.fc2.weight",
            "b2.fc2.bias",
            "b2.fc2.weight"
        ]
    );
    let data = map.data().lock().map_err(|e| e.to_string())?;
    let max =
        |n: &str| -> candle_core::Result<f32> { data[n].abs()?.max_all()?.to_scalar::<f32>() };
    assert_eq!(max("b2.fc2.weight")?, 0.0);
    assert!(max("b2.fc1.weight")? > 0.0);
    Ok(())
}

#[test]
fn lstm_forget_gate_bias_sets_the_second_quarter_of_every_layer() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    candle_nn::lstm(3, 4, Default::default(), vb.pp("enc"))?;
    let done = lstm_forget_gate_bias(&map, "enc", 1.0)?;
    assert_eq!(done, ["enc.bias_hh_l0", "enc.bias_ih_l0"]);
    let data = map.data().lock().map_err(|e| e.to_string())?;
    let ih = data["enc.bias_ih_l0"].to_vec1::<f32>()?;
    let hh = data["enc.bias_hh_l0"].to_vec1::<f32>()?;
    let sums: Vec<f32> = ih.iter().zip(&hh).map(|(a, b)| a + b).collect();
    assert_eq!(sums[4..8], [1.0; 4]);
    drop(data);
    assert!(lstm_forget_gate_bias(&map, "dec", 1.0).is_err());
    assert!(
        lstm_forget_gate_bias(&map, "enc", f64::NAN)
            .is_err_and(|e| e.to_string().contains("value"))
    );
    Ok(())
}

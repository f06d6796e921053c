//! Residual-branch remedies: ReZero/SkipInit's scalar, LayerScale, zero-initialised last
//! layers and the LSTM forget-gate bias.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use grad_core::Philox;
use grad_layers::init::{lstm_forget_gate_bias, reinit, zero_init_residual};
use grad_layers::{ChannelAxis, LayerScaleConfig, layer_scale, rezero};

type TestResult = Result<(), Box<dyn std::error::Error>>;

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

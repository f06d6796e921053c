//! Named parameter views pick exactly the trainable variables' gradients out of a GradStore.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarBuilder, VarMap};
use grad_core::{Error, NamedVars, NormType, global_norm, scale_in_place};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn model(map: &VarMap) -> candle_nn::Sequential {
    let vb = VarBuilder::from_varmap(map, DType::F64, &Device::Cpu);
    candle_nn::seq()
        .add(candle_nn::linear(4, 8, vb.pp("layer.0")).unwrap())
        .add(candle_nn::Activation::Sigmoid)
        .add(candle_nn::linear(8, 8, vb.pp("layer.1")).unwrap())
        .add(candle_nn::Activation::Sigmoid)
        .add(candle_nn::linear(8, 2, vb.pp("layer.10")).unwrap())
}

#[test]
fn input_gradients_are_never_counted() -> TestResult {
    let map = VarMap::new();
    let net = model(&map);
    // The input batch is a Var: candle's GradStore then holds its gradient too, plus every
    // intermediate result's.
    let x = Var::randn(0f64, 1.0, (16, 4), &Device::Cpu)?;
    let store = net.forward(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
    assert!(store.get(x.as_tensor()).is_some());
    assert!(store.get_ids().count() > 6);

    let params = NamedVars::from_var_map(&map);
    assert_eq!(
        params.names().collect::<Vec<_>>(),
        // The order the model created them: network order.
        [
            "layer.0.weight",
            "layer.0.bias",
            "layer.1.weight",
            "layer.1.bias",
            "layer.10.weight",
            "layer.10.bias"
        ]
    );
    let grads = params.grads(&store)?;
    assert_eq!(grads.tensors().len(), 6);

    let expected: f64 = params
        .vars()
        .iter()
        .map(|v| {
            let g = store.get(v.as_tensor()).unwrap();
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum::<f64>()
        .sqrt();
    let got = global_norm(&grads.tensors(), NormType::L2)?;
    assert!((got - expected).abs() <= 1e-12 * expected);

    let input_norm = store
        .get(x.as_tensor())
        .unwrap()
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    let with_input = (expected * expected + input_norm).sqrt();
    assert!(
        (got - with_input).abs() > 1e-6 * with_input,
        "the input gradient leaked into the norm"
    );
    Ok(())
}

#[test]
fn clipping_the_view_leaves_the_input_gradient_alone() -> TestResult {
    let map = VarMap::new();
    let net = model(&map);
    let x = Var::randn(0f64, 1.0, (16, 4), &Device::Cpu)?;
    let mut store = net.forward(x.as_tensor())?.sum_all()?.backward()?;
    let input_before = store.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    let w = map.data().lock().unwrap()["layer.0.weight"].clone();
    let w_before = store.get(w.as_tensor()).unwrap().to_vec2::<f64>().unwrap();

    let mut grads = NamedVars::from_var_map(&map).grads(&store)?;
    for g in grads.iter_mut() {
        scale_in_place(g.grad_mut().unwrap(), 0.5).unwrap();
    }
    grads.write_back(&mut store);

    assert_eq!(
        store.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
        input_before
    );
    let w_after = store.get(w.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    for (a, b) in w_after.iter().flatten().zip(w_before.iter().flatten()) {
        assert_eq!(*a, 0.5 * b);
    }
    Ok(())
}

#[test]
fn unused_variables_have_no_gradient_and_order_can_be_given() -> TestResult {
    let dev = Device::Cpu;
    let a = Var::new(&[1f64, 2.0], &dev)?;
    let b = Var::new(&[3f64], &dev)?;
    let unused = Var::zeros(5, DType::F64, &dev)?;
    let params = NamedVars::new([("z", a.clone()), ("unused", unused), ("a", b.clone())])?;
    let store = (a.sum_all()? * b.sum_all()?)?.backward()?;
    let grads = params.grads(&store)?;
    let present: Vec<_> = grads.present().map(|(n, _)| n).collect();
    assert_eq!(present, ["z", "a"]);
    assert!(grads.get("unused").is_none());
    assert_eq!(
        params.clone().sorted().names().collect::<Vec<_>>(),
        ["a", "unused", "z"]
    );
    assert_eq!(params.filter(|n| n != "unused").len(), 2);
    Ok(())
}

#[test]
fn mismatched_gradient_shape_and_duplicate_names_are_errors() -> TestResult {
    let dev = Device::Cpu;
    let w = Var::new(&[[1f64, 2.0]], &dev)?;
    let params = NamedVars::new([("w", w.clone())])?;
    let mut store = w.sum_all()?.backward()?;
    store.insert(w.as_tensor(), Tensor::zeros(2, DType::F64, &dev)?);
    match params.grads(&store) {
        Err(Error::ShapeMismatch { arg, got, .. }) => {
            assert_eq!(arg, "w");
            assert_eq!(got, [2]);
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert!(matches!(
        NamedVars::new([("w", w.clone()), ("w", w.clone())]),
        Err(Error::DuplicateName { .. })
    ));

    let store = w.sum_all()?.backward()?;
    let mut grads = params.grads(&store)?;
    let entry = grads.entry_mut("w")?;
    assert!(
        entry
            .set_grad(Tensor::zeros((2, 1), DType::F64, &dev)?)
            .is_err()
    );
    assert!(matches!(
        grads.entry_mut("nope"),
        Err(Error::UnknownName { .. })
    ));
    Ok(())
}

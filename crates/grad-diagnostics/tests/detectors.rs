//! The detectors on real training on the digits data: each failure is found and named, and a
//! healthy network gets no finding.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{Mlp, Style};
use grad_diagnostics::{FindingKind, GradMonitor, MonitorConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn a_deep_sigmoid_mlp_is_flagged_vanishing_naming_the_early_layers() -> TestResult {
    let net = Mlp::new(20, 32, Style::Sigmoid, 1);
    let mut monitor = net.monitor();
    net.train(6, 0.1, &mut monitor);
    let findings = monitor.findings();
    let v = findings
        .iter()
        .find(|f| f.kind == FindingKind::Vanishing)
        .unwrap_or_else(|| panic!("no vanishing finding: {findings:#?}"));
    assert_eq!(v.layers.first().map(String::as_str), Some("layer.0"), "{v}");
    // Named in depth order.
    let depths: Vec<usize> = v
        .layers
        .iter()
        .map(|l| l["layer.".len()..].parse().unwrap())
        .collect();
    assert!(depths.windows(2).all(|w| w[0] < w[1]), "{depths:?}");
    assert!(
        v.remedies
            .contains(&gradkit::diagnostics::Remedy::BatchNorm)
            && v.remedy.contains("gradkit::layers::batch_norm")
    );
    Ok(())
}

#[test]
fn a_relu_mlp_with_weights_scaled_up_is_flagged_exploding() -> TestResult {
    let net = Mlp::new(10, 32, Style::ScaledRelu(3.0), 2);
    let mut monitor = net.monitor();
    net.train(3, 0.01, &mut monitor);
    let findings = monitor.findings();
    let e = findings
        .iter()
        .find(|f| f.kind == FindingKind::Exploding)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert!(e.remedy.contains("gradkit::regularize::Clipped"));
    Ok(())
}

#[test]
fn batch_norm_leaky_relu_and_kaiming_get_no_finding() -> TestResult {
    let net = Mlp::new(20, 32, Style::Remedied, 3);
    let mut monitor = net.monitor();
    net.train(8, 0.05, &mut monitor);
    let findings = monitor.findings();
    assert!(
        findings.is_empty(),
        "{findings:#?}\n{}",
        monitor.report().summary_table()
    );
    Ok(())
}

#[test]
fn a_nan_in_one_gradient_names_that_parameter() -> TestResult {
    let net = Mlp::new(4, 16, Style::Remedied, 4);
    let mut monitor = net.monitor();
    let x = Tensor::ones((8, 64), DType::F32, &Device::Cpu)?;
    let mut grads = net.forward(&x).sqr()?.mean_all()?.backward()?;
    let w = net.map.data().lock().unwrap()["layer.2.weight"].clone();
    let mut g = grad_testkit::values(grads.get(w.as_tensor()).unwrap()).unwrap();
    g[7] = f64::NAN;
    grads.insert(
        w.as_tensor(),
        Tensor::from_vec(g, w.shape(), &Device::Cpu)?.to_dtype(DType::F32)?,
    );
    monitor.observe(41, &grads)?;
    let findings = monitor.findings();
    let f = findings
        .iter()
        .find(|f| f.kind == FindingKind::NonFinite)
        .unwrap();
    assert_eq!(f.layers, ["layer.2.weight"]);
    assert_eq!(f.steps, [41, 41]);
    assert!(f.evidence.contains("step 41"));
    Ok(())
}

#[test]
fn a_relu_layer_with_a_large_negative_bias_is_flagged_dead() -> TestResult {
    let net = Mlp::new(4, 16, Style::ScaledRelu(1.0), 5);
    let b = net.map.data().lock().unwrap()["layer.1.bias"].clone();
    b.set(&Tensor::full(-100f32, 16, &Device::Cpu)?)?;
    let mut monitor = GradMonitor::new(net.params(), MonitorConfig::default())?;
    monitor.add_probe(&net.probe);
    net.train(6, 0.01, &mut monitor);
    let findings = monitor.findings();
    let d = findings
        .iter()
        .find(|f| f.kind == FindingKind::DeadUnits)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(d.layers, ["layer.1.act"]);
    assert!(d.evidence.contains("100.0%"), "{}", d.evidence);
    assert_eq!(d.peak, Some(1.0));
    Ok(())
}

//! The loader reads every committed conformance file and maps its values correctly.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use std::collections::BTreeSet;

use candle_core::DType;
use grad_testkit::{Expected, Precision, RawData, compare_tensor, conformance_dir, load};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const OPS: [&str; 10] = [
    "activations",
    "agc",
    "batch_norm",
    "clip_grad",
    "cross_entropy",
    "grad_scaler",
    "group_norm",
    "init",
    "layer_norm",
    "rms_norm",
];

#[test]
fn every_file_parses_with_shapes_matching_data() -> TestResult {
    for op in OPS {
        let file = load(op).unwrap_or_else(|e| panic!("{op}: {e}"));
        assert_eq!(file.op, op);
        assert!(file.reference.contains("PyTorch"), "{op}: reference");
        assert!(!file.semantics.is_empty(), "{op}: semantics");
        assert!(!file.cases.is_empty(), "{op}: no cases");
        let names: BTreeSet<_> = file.cases.iter().map(|c| &c.name).collect();
        assert_eq!(names.len(), file.cases.len(), "{op}: duplicate case names");
        for case in &file.cases {
            let mut tensors: Vec<_> = case.inputs.values().collect();
            let expected = case.expected_tensors();
            tensors.extend(expected.values());
            for t in tensors {
                assert_eq!(
                    t.shape.iter().product::<usize>(),
                    t.len(),
                    "{op}/{}",
                    case.name
                );
                let built = t.to_tensor(DType::F64)?;
                assert_eq!(built.dims(), t.shape.as_slice());
            }
            if let Expected::Error(msg) = &case.expected {
                assert!(!msg.is_empty());
            }
        }
    }
    Ok(())
}

#[test]
fn non_finite_strings_map_to_non_finite_values() -> TestResult {
    // Every "nan", "inf" and "-inf" string in a file becomes exactly one non-finite value.
    for op in OPS {
        let text = std::fs::read_to_string(conformance_dir().join(format!("{op}.json")))?;
        let strings = |s: &str| text.matches(&format!("\"{s}\"")).count();
        let file = load(op)?;
        let mut counts = [0usize; 3];
        for case in &file.cases {
            let mut values: Vec<f64> = Vec::new();
            for t in case.inputs.values().chain(case.expected_tensors().values()) {
                values.extend(t.values_f64());
            }
            for name in case.attrs.keys() {
                if let Ok(Some(v)) = case.attr_f64(name) {
                    values.push(v);
                }
            }
            counts[0] += values.iter().filter(|x| x.is_nan()).count();
            counts[1] += values.iter().filter(|&&x| x == f64::INFINITY).count();
            counts[2] += values.iter().filter(|&&x| x == f64::NEG_INFINITY).count();
        }
        assert_eq!(
            counts,
            [strings("nan"), strings("inf"), strings("-inf")],
            "{op}"
        );
    }
    Ok(())
}

#[test]
fn integer_tensors_stay_integer_and_f64_only_notes_are_read() -> TestResult {
    let bn = load("batch_norm")?;
    let nbt = bn.cases[0].input("num_batches_tracked")?;
    assert!(matches!(nbt.data, RawData::I64(_)));
    assert_eq!(nbt.to_tensor(DType::F32)?.dtype(), DType::I64);

    let rms = load("rms_norm")?;
    assert_eq!(rms.f64_only(), ["x3x8_nd1_weight_eps_none_tiny_inputs"]);
    for op in OPS.iter().filter(|&&o| o != "rms_norm") {
        assert!(load(op)?.f64_only().is_empty(), "{op}");
    }
    Ok(())
}

#[test]
fn attributes_read_with_null_and_non_finite() -> TestResult {
    let bn = load("batch_norm")?;
    let m_none = bn
        .cases
        .iter()
        .find(|c| c.name == "rank2_eval_affine_mnone")
        .unwrap();
    assert_eq!(m_none.attr_f64("momentum")?, None);
    assert!(!m_none.attr_bool("training")?);
    assert_eq!(m_none.attr_f64("eps")?, Some(1e-5));
    assert!(m_none.attr_f64("no_such_attr").is_err());
    Ok(())
}

#[test]
fn compare_applies_the_readme_tolerances() -> TestResult {
    let file = load("layer_norm")?;
    let case = &file.cases[0];
    let want = &case.expected_tensors()["y"];
    let exact = want.to_tensor(DType::F64)?;
    assert!(compare_tensor(&exact, want, Precision::F64).is_ok());
    let nudged = (&exact * (1.0 + 1e-6))?;
    assert!(compare_tensor(&nudged, want, Precision::F64).is_err());
    assert!(compare_tensor(&nudged, want, Precision::F32).is_ok());
    let reshaped = exact.flatten_all()?;
    assert!(compare_tensor(&reshaped, want, Precision::F64).is_err());
    Ok(())
}

#[test]
fn conformance_dir_follows_the_environment_variable() -> TestResult {
    // Run in a child process so the variable does not leak into other tests.
    if std::env::var_os("GRADKIT_LOADER_CHILD").is_some() {
        assert!(load("layer_norm").is_err());
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(exe)
        .args([
            "conformance_dir_follows_the_environment_variable",
            "--exact",
            "--nocapture",
        ])
        .env("GRADKIT_LOADER_CHILD", "1")
        .env("GRADKIT_CONFORMANCE_DIR", "/nonexistent/gradkit")
        .status()?;
    assert!(status.success());
    Ok(())
}

//! The main demo's story, asserted on a reduced run (10 epochs instead of 30): the deep sigmoid
//! network is flagged vanishing and stays near chance; every remedied set-up trains well above
//! it and gets no vanishing finding.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking"
)]

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[path = "../examples/support/mod.rs"]
mod support;

#[path = "../examples/vanishing_gradients/demo.rs"]
mod demo;

use demo::{Options, Setup};
use grad_diagnostics::{FindingKind, Verdict};

#[test]
fn the_sigmoid_net_vanishes_and_the_remedies_train() -> TestResult {
    let data = support::load_digits(&support::default_data()).unwrap();
    let options = Options {
        epochs: 10,
        ..Options::default()
    };
    let dir = std::env::temp_dir().join("gradkit-vanishing-demo-test");
    std::fs::create_dir_all(&dir)?;
    for setup in Setup::ALL {
        let log = dir.join(format!("{}.jsonl", setup.slug()));
        let o = demo::run(setup, &data, &options, Some(&log), |_, _| {}).unwrap();
        // Every observation reached the log, whole.
        let read = grad_diagnostics::read_log(&log)?;
        assert!(read.bad_lines.is_empty());
        assert_eq!(read.records.len(), o.records.len());
        let vanishing = o
            .report
            .findings
            .iter()
            .any(|f| f.kind == FindingKind::Vanishing);
        if setup == Setup::NaiveSigmoid {
            assert!(vanishing, "{:#?}", o.findings);
            assert!(o.test_accuracy < 0.2, "{}: {}", o.title, o.test_accuracy);
            assert!(o.first_last_ratio < 1e-4, "{}", o.first_last_ratio);
        } else {
            assert!(!vanishing, "{}: {:#?}", o.title, o.findings);
            assert!(o.test_accuracy > 0.6, "{}: {}", o.title, o.test_accuracy);
        }
    }
    Ok(())
}

#[test]
fn nonsense_options_are_rejected_before_training() -> TestResult {
    for (options, arg) in [
        (
            Options {
                depth: 0,
                ..Options::default()
            },
            "--depth",
        ),
        (
            Options {
                epochs: 0,
                ..Options::default()
            },
            "--epochs",
        ),
        (
            Options {
                lr: f64::NAN,
                ..Options::default()
            },
            "--lr",
        ),
    ] {
        let e = options.validate().unwrap_err().to_string();
        assert!(e.contains(arg), "{e}");
    }
    Ok(())
}

#[test]
fn a_missing_or_corrupt_data_file_is_one_clear_error() -> TestResult {
    let missing = support::load_digits(std::path::Path::new("no/such/digits.csv.gz"));
    assert!(
        missing
            .unwrap_err()
            .to_string()
            .contains("no/such/digits.csv.gz")
    );
    let corrupt = std::env::temp_dir().join("gradkit-corrupt-digits.csv.gz");
    std::fs::write(&corrupt, b"not gzip at all")?;
    let e = support::load_digits(&corrupt).unwrap_err().to_string();
    assert!(e.contains("cannot read the digits data set"), "{e}");
    Ok(())
}

#[test]
fn at_initialisation_preflight_flags_the_sigmoid_set_up_at_step_0() -> TestResult {
    let data = support::load_digits(&support::default_data()).unwrap();
    let options = Options::default();
    for setup in Setup::ALL {
        let initial = demo::initial(setup, &data, &options).unwrap();
        let pre = &initial.preflight;
        // The sigmoid nets are flat: plain SGD at lr 0.05 is far below their curvature limit.
        if let Some(s) = &initial.sharpness {
            assert!(s.top_eigenvalue.is_finite() && s.top_eigenvalue > 0.0);
            if matches!(setup, Setup::NaiveSigmoid | Setup::ReZero) {
                assert!(
                    s.top_eigenvalue < 0.5 / options.lr,
                    "{}: {s:?}",
                    setup.title()
                );
            }
        }
        assert_eq!(initial.sharpness.is_none(), setup == Setup::AllRemedies);
        match setup {
            Setup::NaiveSigmoid => {
                assert_eq!(pre.verdict, Verdict::Vanishing, "{}", pre.report());
                let f = &pre.findings[0];
                assert_eq!((f.kind, f.steps), (FindingKind::Vanishing, [0, 0]));
                // The input side's layers, not the last hidden one or the head.
                assert_eq!(f.layers[0], "layer.0");
                assert!(!f.layers.iter().any(|l| l == "layer.15" || l == "layer.16"));
                assert!(f.remedy.contains("gradkit::layers::batch_norm"));
            }
            _ => assert!(pre.is_healthy(), "{}\n{}", setup.title(), pre.report()),
        }
    }
    Ok(())
}

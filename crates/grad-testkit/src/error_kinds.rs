//! Which gradkit error each expected-error case of the vectors must fail with.
//!
//! The vectors give PyTorch's exception and message, which a port does not reproduce; what a
//! port must do is reject the input *for the same reason*. Each error case is listed here with
//! the gradkit error variant (and, for hyper-parameters, the argument) it must be rejected with,
//! so an op that fails for another reason — a candle internal error, a shape error where a
//! hyper-parameter error was due — fails the case instead of passing it.

/// `(file, case, what the error's `Debug` text must contain)`.
const KINDS: &[(&str, &str, &str)] = &[
    (
        "activations",
        "error_prelu_weight_count_mismatch",
        "ShapeMismatch { op: \"prelu\", arg: \"weight\"",
    ),
    (
        "batch_norm",
        "error_rank2_train_single_sample",
        "TooFewValuesPerChannel",
    ),
    (
        "batch_norm",
        "error_rank3_train_single_value_per_channel",
        "TooFewValuesPerChannel",
    ),
    (
        "batch_norm",
        "error_rank4_train_single_value_per_channel",
        "TooFewValuesPerChannel",
    ),
    ("clip_grad", "norm2_inf_grad_error", "NonFiniteTotalNorm"),
    ("clip_grad", "norm2_nan_grad_error", "NonFiniteTotalNorm"),
    (
        "cross_entropy",
        "error_target_out_of_bounds",
        "TargetOutOfRange { target: 4",
    ),
    (
        "cross_entropy",
        "error_label_smoothing_above_one",
        "InvalidHyperParameter { name: \"label_smoothing\", value: 1.5",
    ),
    (
        "grad_scaler",
        "error_growth_factor_not_above_one",
        "InvalidHyperParameter { name: \"growth_factor\"",
    ),
    (
        "grad_scaler",
        "error_backoff_factor_not_below_one",
        "InvalidHyperParameter { name: \"backoff_factor\"",
    ),
    (
        "group_norm",
        "error_x2x6x3_g4_not_divisible",
        "IndivisibleGroups { channels: 6, groups: 4 }",
    ),
    ("init", "error_kaiming_uniform_rank1", "RankMismatch"),
    (
        "instance_norm",
        "error_x2x3x1_one_spatial_element",
        "TooFewValuesPerChannel",
    ),
];

/// `Ok` when `error` (the op's error for the expected-error case `case` of `file`) is the
/// listed gradkit error.
///
/// # Errors
/// Why not: no kind is listed for the case, or the error is another one.
pub(crate) fn check(file: &str, case: &str, error: &dyn std::error::Error) -> Result<(), String> {
    let Some(&(_, _, kind)) = KINDS.iter().find(|(f, c, _)| *f == file && *c == case) else {
        return Err(format!(
            "no gradkit error kind is listed for this error case (grad-testkit's error_kinds.rs); got {error:?}"
        ));
    };
    let debug = format!("{error:?}");
    if debug.contains(kind) {
        Ok(())
    } else {
        Err(format!(
            "failed for another reason: expected {kind}.., got {debug}"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Fake {
        #[error("too few")]
        TooFewValuesPerChannel,
        #[error("candle")]
        Candle(String),
    }

    #[test]
    fn only_the_listed_reason_passes() {
        let case = "error_rank2_train_single_sample";
        assert!(super::check("batch_norm", case, &Fake::TooFewValuesPerChannel).is_ok());
        assert!(super::check("batch_norm", case, &Fake::Candle("internal".into())).is_err());
        assert!(super::check("batch_norm", "unlisted", &Fake::TooFewValuesPerChannel).is_err());
    }
}

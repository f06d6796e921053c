//! What the block tests share.

use grad_layers::{Activation, GeluApproximation};

/// Every activation, with PyTorch's default parameters or typical ones.
pub fn activations() -> Vec<Activation> {
    vec![
        Activation::Relu,
        Activation::LeakyRelu {
            negative_slope: 0.01,
        },
        Activation::Elu { alpha: 1.0 },
        Activation::Selu,
        Activation::Gelu {
            approximate: GeluApproximation::None,
        },
        Activation::Gelu {
            approximate: GeluApproximation::Tanh,
        },
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::Relu6,
        Activation::Silu,
        Activation::Mish,
        Activation::Softplus {
            beta: 2.0,
            threshold: 20.0,
        },
        Activation::Hardswish,
        Activation::Hardsigmoid,
        Activation::Hardtanh {
            min_val: -1.0,
            max_val: 1.0,
        },
        Activation::Celu { alpha: 0.5 },
        Activation::Softsign,
        Activation::LogSigmoid,
    ]
}

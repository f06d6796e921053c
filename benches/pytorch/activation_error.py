"""PyTorch's own f32 error for GELU (erf and tanh forms) and tanh, forward and backward, against
float64 on the same f32 inputs: the constants in crates/grad-layers/tests/numerics.rs.

Run: benches/pytorch/setup.sh && benches/pytorch/.venv/bin/python benches/pytorch/activation_error.py
"""
import torch

torch.set_num_threads(2)
# The test's grid: 2,000,001 points over [-10, 10], rounded to f32.
x32 = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64).float()
x64 = x32.double()


def forward_backward(f, x):
    x = x.clone().requires_grad_(True)
    y = f(x)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y.detach(), g


FUNCTIONS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
}
print(f"torch {torch.__version__}: largest absolute f32 error (forward, backward)")
for name, f in FUNCTIONS.items():
    y32, g32 = forward_backward(f, x32)
    y64, g64 = forward_backward(f, x64)
    fwd = (y32.double() - y64).abs().max().item()
    bwd = (g32.double() - g64).abs().max().item()
    print(f'    ("{name}", {fwd:.3e}, {bwd:.3e}),')

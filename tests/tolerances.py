"""Float tolerances that hold for any summation order: another CPU, BLAS kernel, blocking or thread count.

Rounding error analysis (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1-3.5): a result
built from sums and products with at most n roundings on any path from the inputs (a dot product of length k: k;
a product of two such results: their n added) is within gamma_n * M of the exact value, gamma_n = n u / (1 - n u),
whatever the order of the sums, their blocking or split, and whether FMAs are used. M is the same expression
evaluated on the absolute values of its inputs (the sum of |terms|): :func:`magnitude` computes it in float64.
So two evaluations of the same maths (two orders) differ by at most 2 gamma_n M; one against a float64
reference by gamma_n M plus the reference's own gamma_n(u64) M. Use these bounds, never this machine's errors.
"""

from __future__ import annotations

import types

import torch

U16 = 2.0**-11  # unit roundoff of float16
U32 = 2.0**-24  # unit roundoff of float32 (torch.finfo(torch.float32).eps / 2)
U64 = 2.0**-53  # unit roundoff of float64


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of n roundings of unit roundoff u."""
    assert n * u < 0.5, (n, u)
    return n * u / (1 - n * u)


def f32_tol(n: int, magnitude, *, sides: int = 2, low: int = 0, u_low: float = U16):
    """Worst-case |a - b| for float32 results a, b of the same maths, each summed in any order.

    n: roundings on the longest path (reduction lengths added up, plus the other ops); magnitude: the sum of
    |terms| (a tensor: element-wise, e.g. from :func:`magnitude`; a float: an upper bound). sides=2: both a and b
    are float32 (2 gamma_n M); sides=1: b is a float64 reference (gamma_n M + gamma_n(u64) M). low: extra
    roundings to a lower precision u_low (fp16 operands / outputs) on any path of the float32 side(s).
    """
    per_side = gamma(n) + (gamma(low, u_low) if low else 0.0)
    bound = sides * per_side if sides == 2 else per_side + gamma(n, U64)
    return bound * magnitude


def magnitude(fn, *args, **kwargs):
    """``fn`` evaluated on the absolute values (in float64) of every tensor argument: the sum of |terms| of each
    output of a computation made of sums and products with non-negative constants (gradients included when
    ``fn`` takes them with autograd). Tensors that require grad keep requiring it."""
    def absolute(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return t.detach().double().abs().requires_grad_(t.requires_grad)

    return fn(*(absolute(a) for a in args), **{k: absolute(v) for k, v in kwargs.items()})


def assert_within(got: torch.Tensor, want: torch.Tensor, bound, what: str = "") -> None:
    """|got - want| <= bound element-wise (computed in float64); the message gives the worst error / bound."""
    err = (torch.as_tensor(got).detach().double() - torch.as_tensor(want).detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    bad = err > bound
    if bool(bad.any()):
        ratio = (err / bound.clamp_min(1e-300)).max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{err.numel()} elements over the rounding bound "
                             f"(worst error/bound {ratio:.3g}, max error {err.max().item():.3g})")


def assert_f64_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-10, what: str = "") -> None:
    """Two float64 evaluations of the same maths in different orders: |got - want| <= rel * max|want|.

    They differ by at most 2 gamma_n(u64) M (n, M as in the module docstring), so rel holds whenever
    n M <= rel / (2 u64) max|want| (4.5e5 max|want| for 1e-10): a float32 check at rtol 1e-5 silently assumed
    n M <= 84 max|want| (1e-5 / (2 u32)), so this asks 5e3 times less of the computation than that did.
    """
    assert got.dtype == want.dtype == torch.float64, (got.dtype, want.dtype)
    scale = want.detach().abs().max().item()
    assert_within(got, want, rel * scale, what)


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.double()`` with no float32 left inside: transformers' Llama RMSNorm casts its input to float32 and
    back, which would put float32 roundings into a float64 comparison; it is given the same maths in float64."""
    model.double()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model


def _rms_norm_in_input_dtype(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

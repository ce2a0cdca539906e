"""Issue 20 item 0: float32 comparisons in the suite use bounds that hold for any summation order
(tests/tolerances.py), not a fixed rtol/atol that one machine's BLAS happens to meet. Here the bound is checked
against the orders another CPU may use (sequential, reversed, shuffled, pairwise, blocked as a GEMM kernel
blocks), and a fixed tolerance is shown to depend on the order."""

from __future__ import annotations

import torch
from tolerances import f32_tol

N = 512  # the reduction length of the gradient that failed on an AVX-512 machine (3 of 512 elements off by 2.5e-6)


def orders(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 sums of ``x`` in the orders a different kernel may take."""
    g = torch.Generator().manual_seed(seed)

    def sequential(v):
        acc = torch.zeros((), dtype=torch.float32)
        for t in v:
            acc = acc + t
        return acc

    out = {"sequential": sequential(x), "reversed": sequential(x.flip(0)), "pairwise": x.sum()}
    for k in range(3):
        out[f"shuffled{k}"] = sequential(x[torch.randperm(len(x), generator=g)])
    for block in (8, 16, 64):  # blocked partial sums, as vectorised GEMM kernels accumulate
        out[f"blocked{block}"] = sequential(x.view(-1, block).sum(dim=1))
    return out


def test_robust_0_float32_bound_holds_for_every_summation_order():
    for seed in range(5):
        x = torch.randn(N, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-3, 3, N)
        exact, mag = x.double().sum(), x.double().abs().sum()
        sums = orders(x, seed)
        for name, s in sums.items():
            assert abs(s.double() - exact) <= f32_tol(N, mag, sides=1), (seed, name)
        for a in sums.values():  # any two orders: 2 gamma_N M
            for b in sums.values():
                assert abs(a.double() - b.double()) <= f32_tol(N, mag), seed


def test_robust_0_a_fixed_tolerance_depends_on_the_order():
    """With cancellation, two orders of the same float32 sum differ by far more than rtol=1e-5, atol=1e-6 of the
    result: a fixed tolerance passes or fails by the machine's order, the derived bound holds for both."""
    x = torch.randn(N, generator=torch.Generator().manual_seed(1)) * 1e3
    x = torch.cat([x, -x[torch.randperm(N, generator=torch.Generator().manual_seed(2))]]).float()  # sums to 0
    sums = orders(x.view(-1)[: 2 * N], 3)
    spread = max(s.item() for s in sums.values()) - min(s.item() for s in sums.values())
    assert spread > 1e-6 + 1e-5 * max(abs(s.item()) for s in sums.values())
    assert spread <= f32_tol(2 * N, x.double().abs().sum().item())

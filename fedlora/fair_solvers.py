"""LoRA-FAIR's per-module solvers for the correction dB of B_bar (:func:`fedlora.algebra.lora_fair` calls them):
the paper's SGD from dB = 0 (:func:`sgd_dB`), the exact minimiser of the same objective by L-BFGS
(:func:`cosine_dB`) and the squared-error closed form (:func:`closed_form_dB`), each on r x r Grams with no
m x n matrix; and their dense references (:func:`dense_sgd`, :func:`dense_cosine`) for tests. Tensors in, tensors
out; the notation is :func:`fedlora.algebra.lora_fair`'s (G = dW* A_bar^T, C = A_bar A_bar^T, w = ||dW*||_F).
"""

from __future__ import annotations

import math

import torch


def lbfgs(loss_fn, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """Minimise loss_fn from x0 with L-BFGS (strong-Wolfe line search, at most ``steps`` iterations)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, max_eval=2 * steps, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


def cosine_dB(Bbar, G, C, w_norm: float, lam: float, steps: int) -> torch.Tensor:
    """The cosine refinement of one module, solved in a 2r-dimensional column space (r x r work per step).

    f(D) = -<X, G> / (sqrt(<X^T X, C>) ||dW*||) + lam ||D||_F with X = B_bar + D (Gram identities: see
    :func:`lora_fair`). Stationarity, -a G + b X C + mu D = 0 (a, b, mu scalars), gives
    D = (a G - b B_bar C)(b C + mu I)^{-1}: the minimiser's columns lie in span[G, B_bar]. So D = c Q E with
    Q an orthonormal basis of that span (QR of [G B_bar], m x 2r) and c = ||B_bar||_F (E is O(1)):
        <X, G> = <B_bar, G> + c <E, Q^T G>,   X^T X = B_bar^T B_bar + S + S^T + c^2 E^T E,  S = c (Q^T B_bar)^T E,
        ||D||_F = c ||E||_F.
    """
    c = torch.linalg.vector_norm(Bbar)
    Q, _ = torch.linalg.qr(torch.cat([G, Bbar], dim=1))
    QG, QB = Q.T @ G, Q.T @ Bbar
    BG, BB = (Bbar * G).sum(), Bbar.T @ Bbar

    def loss(E):
        Z = c * E
        S = QB.T @ Z
        q = ((BB + S + S.T + Z.T @ Z) * C).sum().clamp_min(0).sqrt()
        return -(BG + (Z * QG).sum()) / (q * w_norm) + lam * torch.linalg.vector_norm(Z)

    E = lbfgs(loss, G.new_zeros(Q.shape[1], Bbar.shape[1]), steps)
    return Q @ (c * E)


def closed_form_dB(G, Bbar, C, scale, lam, dtype):
    """(G/s - B_bar C)(C + lam I)^{-1}, an r x r solve in ``dtype``."""
    Gd, Bd, Cd = G.to(dtype), Bbar.to(dtype), C.to(dtype)
    rhs = Gd / scale - Bd @ Cd  # (dW*/s - B_bar A_bar) A_bar^T, m x r
    M = Cd + lam * torch.eye(C.shape[0], dtype=dtype, device=C.device)
    return torch.linalg.solve(M, rhs.T).T  # M symmetric: rhs M^{-1} = (M^{-1} rhs^T)^T


def sgd_dB(Bbar, G, C, w_norm: float, lam: float, steps: int, lr: float, penalty: str) -> torch.Tensor:
    """The paper's solver for one module: plain SGD (step ``lr``) from dB = 0 on
        L(dB) = 1 - cos(vec((B_bar + dB) A_bar), vec(dW*)) + lam P(dB),   P = ||dB||_F  (``penalty="squared"``:
    ||dB||_F^2, as third-party re-implementations write it). With X = B_bar + dB, a = <X, G>, q^2 = <X^T X, C>
    (Gram identities: :func:`lora_fair`) the gradient is
        dL/dX = -G / (q w) + a / (q^3 w) X C + lam dP,   dP = dB / ||dB||_F (0 at dB = 0, the subgradient
    autograd takes there) or 2 dB.
    Its columns lie in span[G, B_bar] (X C = B_bar C + dB C), so every iterate does too: the steps are taken in
    the coordinates E of an orthonormal basis Q of that span (QR of [G B_bar]), dB = Q E, X = Q Y with
    Y = Q^T B_bar + E. Q^T is an isometry on the span, so these are the iterates of SGD on the m x r matrix
    (:func:`lora_fair_dense` checks it), at r x r cost per step. Unlike the exact minimiser (``solver="cosine"``,
    which is dB = 0 whenever ||grad of cos at 0|| <= lam), SGD from 0 takes the first step whatever lam is.
    """
    Q, _ = torch.linalg.qr(torch.cat([G, Bbar], dim=1))
    QG, QB = Q.T @ G, Q.T @ Bbar
    E = G.new_zeros(Q.shape[1], Bbar.shape[1])
    for _ in range(steps):
        Y = QB + E
        YC = Y @ C
        q = math.sqrt(max(0.0, float(torch.vdot(Y.reshape(-1), YC.reshape(-1)))))  # <X^T X, C> = <Y, Y C>
        a = float(torch.vdot(Y.reshape(-1), QG.reshape(-1)))
        grad = YC.mul_(a / (q ** 3 * w_norm)).sub_(QG, alpha=1.0 / (q * w_norm))
        if penalty == "squared":
            grad.add_(E, alpha=2 * lam)
        else:
            n = float(torch.linalg.vector_norm(E))
            if n > 0:
                grad.add_(E, alpha=lam / n)
        E = E.sub_(grad, alpha=lr)
    return Q @ E


def dense_cosine(W, A, Bbar, w_norm, c, lam, steps):
    """L-BFGS on the dense cosine objective over dB = c E (the reference of :func:`cosine_dB`)."""
    def loss(E):
        P = ((Bbar + c * E) @ A).reshape(-1)
        return -(P @ W.reshape(-1)) / (torch.linalg.vector_norm(P) * w_norm) + lam * c * torch.linalg.vector_norm(E)

    return c * lbfgs(loss, torch.zeros_like(Bbar), steps)


def dense_sgd(W, A, Bbar, lam, steps, lr, penalty):
    """torch.optim.SGD on 1 - cos(vec((B_bar + dB) A), vec(W)) + lam P(dB) from dB = 0 (reference of _sgd_dB)."""
    dB = torch.zeros_like(Bbar, requires_grad=True)
    opt = torch.optim.SGD([dB], lr=lr)
    w = W.reshape(1, -1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        sim = torch.nn.functional.cosine_similarity(((Bbar + dB) @ A).reshape(1, -1), w, dim=1, eps=0.0)[0]
        reg = dB.square().sum() if penalty == "squared" else torch.linalg.vector_norm(dB)
        (1 - sim + lam * reg).backward()
        opt.step()
    return dB.detach()

"""The Muon momentum rules as plain functions, shared by ProfiledMuon and bench's multi-step accuracy.

EMA (torch.optim.Muon), with B the stored buffer:

    B_t = lerp(B_{t-1}, g_t, 1 - mu)                 U_t = lerp(g_t, B_t, mu) (Nesterov) or B_t

Tail-keeping (error feedback on a rank-r update, or subset orthogonalization; ``ortho.feedback``), with E
the stored buffer and A_t the part of X_t the update applied:

    X_t = E_{t-1} + (1 - mu) g_t                      the momentum
    U_t = lerp(g_t, X_t, mu) (Nesterov) or X_t        what is orthogonalized
    E_t = X_t - (1 - mu) A_t                           only the applied part decays; the rest is kept

Why this equals EMA when everything is applied (A_t = X_t, full rank or subset fraction 1): then
E_t = mu X_t, so X_{t+1} = mu X_t + (1 - mu) g_{t+1} = lerp(X_t, g_{t+1}, 1 - mu): X is exactly torch's B
(E_0 = B_0 = 0), U is the same lerp, and the updates agree to float rounding. With a rank-r A_t, the
directions the update did not serve are carried undecayed, and grow by (1 - mu) g each step until they are
served (Dion keeps the residual the same way; Dion2 decays only the selected rows). E is stored in the
layer's ``momentum_buffer`` (for full rank it is mu times torch's buffer), so the state has the same size.
"""

from __future__ import annotations

from torch import Tensor


def ema_momentum(buf: Tensor, g: Tensor, mu: float, nesterov: bool) -> Tensor:
    """torch.optim.Muon's rule for one matrix: updates ``buf`` in place, returns the orthogonalizer input."""
    buf.lerp_(g, 1 - mu)
    return g.lerp(buf, mu) if nesterov else buf


def tail_momentum(buf: Tensor, g: Tensor, mu: float, nesterov: bool) -> tuple[Tensor, Tensor]:
    """(X, U) of the tail-keeping rule: the momentum X = E + (1 - mu) g and the orthogonalizer input U.

    Fresh tensors: ``buf`` (E) is left alone until ``tail_decay`` (a skipped layer keeps it)."""
    X = buf.add(g, alpha=1 - mu)
    return X, (g.lerp(X, mu) if nesterov else X)


def tail_decay(X: Tensor, applied: Tensor, mu: float) -> Tensor:
    """The next stored buffer E = X - (1 - mu) A (in place on X, which is the step's transient)."""
    return X.sub_(applied.view_as(X).to(X.dtype), alpha=1 - mu)

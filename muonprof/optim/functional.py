"""ProfiledMuon's functional core: the update math as pure functions over lists of tensors.

The same split as ``torch/optim``'s ``_single_tensor_*`` / ``_multi_tensor_*`` / ``_fused_*`` functions: each
function takes the tensors it reads and the ones it updates in place, plus plain hyper-parameters, and knows
nothing of param groups, state dicts, profiles, buckets or ranks. ``ProfiledMuon`` (the thin class on top)
owns the state, the bucketing and the distribution and calls these; the tests call each one alone, which is
what lets a fused, foreach or compiled variant be checked against the plain one.

Non-finite skipping is expressed the same way everywhere: ``ok`` is a ``(B,)`` bool tensor on the device
(``finite_mask``) or None when every layer steps. A skipped layer's weights and state stay bit-identical;
nothing here reads ``ok`` on the host except on CPU, where that is not a device sync.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw

from ..ortho import OrthoConfig, applied_update, orthogonalize
from ..ortho.lowrank import lowrank_with_basis, rsvd_with_basis
from ..ortho.signals import captured_energy, orthogonality_quality
from .lowrank_momentum import expand, polar_of_factors
from .momentum_rules import tail_decay, tail_momentum

AdamWImpl = Literal["fused", "foreach"]
GeneratorList = Sequence[torch.Generator] | None
Factors = tuple[Tensor, Tensor, Tensor]  # a low-rank momentum U (m, r), S (r,), V (n, r)


# ---------------------------------------------------------------- masks


def finite_mask(grads: Sequence[Tensor], device: torch.device) -> Tensor | None:
    """(B,) bool: which gradients are entirely finite, or None when all are and we may know it for free.

    On accelerators: the max-abs norm of each (one foreach kernel; finite iff every entry is, and unlike the
    2-norm it cannot overflow on huge but finite gradients), always returned, so the host never waits.

    On CPU, where reading the mask is not a device sync, the common all-finite step returns None and skips
    every masking pass. The test there is each gradient's plain sum, because a NaN or an Inf in a sum
    propagates (Inf - Inf is NaN) and CPU's inf-norm is slow: 38 ms against 3 ms for the sums of a llama-20m
    embedding and head (2 x 32000 x 256, measured on a Xeon with AMX), more than the fused AdamW step itself.
    A sum can also overflow on huge but finite entries; only those layers get the exact test (min and max).
    """
    grads = list(grads)
    if device.type != "cpu":
        return torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=float("inf"))).float())
    ok = torch.isfinite(torch.stack([g.sum() for g in grads]).float())
    if bool(ok.all()):
        return None
    for i in (~ok).nonzero().flatten().tolist():
        low, high = torch.aminmax(grads[i])
        ok[i] = bool(torch.isfinite(low) & torch.isfinite(high))
    return None if bool(ok.all()) else ok


def zero_where_skipped(tensors: Sequence[Tensor], ok: Tensor | None) -> list[Tensor]:
    """The tensors with skipped layers' entries replaced by zeros (so that nothing downstream makes NaNs)."""
    if ok is None:
        return list(tensors)
    return [torch.where(ok[i], t, torch.zeros_like(t)) for i, t in enumerate(tensors)]


# ---------------------------------------------------------------- Muon momentum forms


def ema_momentum(
    buffers: Sequence[Tensor], grads: Sequence[Tensor], mu: float, nesterov: bool, ok: Tensor | None
) -> list[Tensor]:
    """torch.optim.Muon's momentum: B <- lerp(B, g, 1 - mu) in place; returns U = lerp(g, B, mu) or B.

    A skipped layer's gradient is replaced by its own buffer: lerp(B, B) = B leaves it unchanged and the
    Nesterov mix stays finite (its update is zeroed later by ``muon_apply``).
    """
    buffers, grads = list(buffers), list(grads)
    if ok is not None:
        grads = [torch.where(ok[i], g, b) for i, (g, b) in enumerate(zip(grads, buffers))]
    torch._foreach_lerp_(buffers, grads, 1 - mu)
    return torch._foreach_lerp(grads, buffers, mu) if nesterov else buffers


def storm_momentum(
    buffers: Sequence[Tensor], grads: Sequence[Tensor], corrections: Sequence[Tensor | None], ok: Tensor | None
) -> list[Tensor]:
    """LiMuon's STORM momentum M_t = g_t + mu (M_{t-1} - g(x_{t-1})): ``corrections`` hold the second term
    (None on a layer's first step). Writes M_t into the buffers (skipped layers keep theirs); returns M_t."""
    news = [g.clone() if c is None else c.view_as(g).add_(g) for g, c in zip(grads, corrections)]
    for i, (buf, new) in enumerate(zip(buffers, news)):
        buf.copy_(new if ok is None else torch.where(ok[i], new, buf))
    return news


def tail_inputs(
    buffers: Sequence[Tensor], grads: Sequence[Tensor], mu: float, nesterov: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Error-feedback / subset layers: (X, U) per layer, X = E + (1 - mu) g the momentum and U the
    orthogonalizer's input (``momentum_rules.tail_momentum``). The buffers change only in ``tail_commit``,
    once the applied part is known."""
    pairs = [tail_momentum(buf, g, mu, nesterov) for buf, g in zip(buffers, grads)]
    return [x for x, _ in pairs], [u for _, u in pairs]


def tail_commit(
    buffers: Sequence[Tensor], momenta: Sequence[Tensor], applied: Sequence[Tensor], mu: float, ok: Tensor | None
) -> None:
    """E <- X - (1 - mu) A in place: only the applied part of the momentum decays; skipped layers keep E."""
    for i, (buf, x, a) in enumerate(zip(buffers, momenta, applied)):
        new = tail_decay(x, a, mu)
        buf.copy_(new if ok is None else torch.where(ok[i], new, buf))


def lowrank_momentum_inputs(
    factors: Sequence[Factors],
    grads: Sequence[Tensor],
    shape: tuple[int, int],
    mu: float,
    momentum: str,
    corrections: Sequence[Tensor | None],
    owners: Sequence[bool],
) -> list[Tensor | None]:
    """LiMuon's low-rank momentum, before compression: the full m x n momentum to compress, per layer owned.

    EMA: lerp(U diag(S) V^T, g, 1 - mu), the stored rank-r momentum rebuilt as a transient; STORM: g plus the
    correction. Float32 whatever the parameter's dtype. None for layers another rank owns (only the owner
    rebuilds and recompresses a low-rank momentum). The factors change only in ``lowrank_momentum_commit``.
    """
    inputs: list[Tensor | None] = []
    for (U, S, V), g, c, owner in zip(factors, grads, corrections, owners):
        if not owner:
            inputs.append(None)
            continue
        g2 = g.reshape(shape).float()
        if momentum == "storm":
            inputs.append(g2.clone() if c is None else c.add_(g2))
        else:
            inputs.append(expand(U, S, V).lerp_(g2, 1 - mu))
    return inputs


def lowrank_momentum_commit(
    factors: Sequence[Factors], compressed: Sequence[Sequence[Tensor]], ok: Tensor | None
) -> list[Tensor]:
    """Store each layer's new factors (skipped layers keep theirs) and return its update U V^T."""
    outs = []
    for i, (stored, new) in enumerate(zip(factors, compressed)):
        for old, value in zip(stored, new):
            value = value.to(old.dtype)
            old.copy_(value if ok is None else torch.where(ok[i], value, old))
        outs.append(polar_of_factors(*stored))
    return outs


# ---------------------------------------------------------------- the expensive part


def orthogonalize_all(
    inputs: Sequence[Tensor],
    shape: tuple[int, int],
    ortho: OrthoConfig | None,
    *,
    batched: bool,
    generators: GeneratorList = None,
) -> list[Tensor]:
    """O per input (each seen as a ``shape`` matrix), one matrix at a time or in one batched call.

    CPU BLAS gains nothing from batching, and stacking/unstacking copies cost ~10% of a step there (measured,
    GPT-2 shapes): one matrix at a time, with torch.optim.Muon's own kernels. Accelerators are launch-bound on
    small matrices: one batched call per bucket (2x+ on H100).
    """
    updates = [x.reshape(shape) for x in inputs]
    if len(updates) == 1 or not batched:
        gens: Sequence[torch.Generator | None] = generators or [None] * len(updates)
        return [orthogonalize(u, ortho, generator=g) for u, g in zip(updates, gens)]
    return list(orthogonalize(torch.stack(updates), ortho, generator=generators))


def orthogonalize_all_with_signals(
    inputs: Sequence[Tensor],
    shape: tuple[int, int],
    ortho: OrthoConfig | None,
    *,
    batched: bool,
    generators: GeneratorList = None,
    probe_generators: Sequence[torch.Generator | None] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """``orthogonalize_all``'s updates (the very same kernels and sketches) and each layer's quality signal
    (a float32 0-d tensor in [0, 1], ``ortho.signals``): the range finders' captured energy from the basis they
    build anyway, Newton-Schulz's probe estimate of its orthogonality defect (``probe_generators`` draw the
    probes), 1 for the exact SVD. For the ladder's measurement steps only."""
    ortho = ortho or OrthoConfig()
    updates = [x.reshape(shape) for x in inputs]
    probes: Sequence[torch.Generator | None] = probe_generators or [None] * len(updates)
    if ortho.method in ("lowrank", "rsvd"):
        with_basis = lowrank_with_basis if ortho.method == "lowrank" else rsvd_with_basis
        if len(updates) == 1 or not batched:
            gens: Sequence[torch.Generator | None] = generators or [None] * len(updates)
            pairs = [with_basis(u, ortho, g) for u, g in zip(updates, gens)]
            outs = [o for o, _ in pairs]
            signals = [captured_energy(u, q)[0] for u, (_, q) in zip(updates, pairs)]
            return outs, signals
        stacked = torch.stack(updates)
        O, Q = with_basis(stacked, ortho, generators)
        return list(O), list(captured_energy(stacked, Q))
    outs = orthogonalize_all(updates, shape, ortho, batched=batched, generators=generators)
    if ortho.method == "svd":
        return outs, [torch.ones((), dtype=torch.float32, device=o.device) for o in outs]
    return outs, [orthogonality_quality(o, generator=g)[0] for o, g in zip(outs, probes)]


def applied_updates_all(
    inputs: Sequence[Tensor],
    momenta: Sequence[Tensor],
    shape: tuple[int, int],
    ortho: OrthoConfig,
    *,
    batched: bool,
    generators: GeneratorList = None,
) -> list[tuple[Tensor, Tensor]]:
    """(O, A) per layer for error-feedback / subset layers: the update and the part of the momentum it applied
    (``ortho.applied_update``), one matrix at a time or batched, as ``orthogonalize_all``."""
    updates = [u.reshape(shape) for u in inputs]
    xs = [x.reshape(shape) for x in momenta]
    if len(updates) == 1 or not batched:
        gens: Sequence[torch.Generator | None] = generators or [None] * len(updates)
        return [applied_update(u, x, ortho, generator=g) for u, x, g in zip(updates, xs, gens)]
    O, A = applied_update(torch.stack(updates), torch.stack(xs), ortho, generator=generators)
    return list(zip(O.unbind(0), A.unbind(0)))


# ---------------------------------------------------------------- the Muon update


def muon_apply(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float,
    lr_factors: Sequence[float],
    ok: Tensor | None,
) -> None:
    """W <- W (1 - lr wd) - lr f O per layer (f: the layer's lr factor), skipped layers untouched.

    ``updates`` must be fresh tensors (they are scaled in place). Multiplying the kept layers by exactly 1.0 and
    scaling only the layers whose factor differs from the first keeps the default path bit-identical to
    torch.optim.Muon (one ``_foreach_add_`` with alpha = -lr f).
    """
    params, updates = list(params), list(updates)
    if not params:
        return
    if ok is not None:
        torch._foreach_mul_(updates, list(ok.to(updates[0].dtype).unbind(0)))
    if weight_decay != 0:
        if ok is None:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            # Python scalars, not torch.tensor(..., device=...): building a device tensor from a host value
            # would block the host on every step.
            torch._foreach_mul_(params, list(torch.where(ok, 1 - lr * weight_decay, 1.0).unbind(0)))
    first = lr_factors[0]
    for o, f in zip(updates, lr_factors):
        if f != first:
            o.mul_(f / first)
    torch._foreach_add_(params, [o.view_as(p) for o, p in zip(updates, params)], alpha=-lr * first)


# ---------------------------------------------------------------- AdamW


def default_adamw_impl(params: Sequence[Tensor]) -> AdamWImpl:
    """``fused`` where torch has the fused AdamW kernel for every tensor's device and dtype, else ``foreach``."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    if all(p.device.type in devices and p.is_floating_point() for p in params):
        return "fused"
    return "foreach"


def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    lr_scales: Sequence[float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ok: Tensor | None,
    impl: AdamWImpl,
) -> None:
    """torch.optim.AdamW's step through torch's own kernels, per layer lr ``lr x lr_scale``, skipping layers.

    The arithmetic is torch's functional ``torch.optim.adamw.adamw`` (fused or foreach): with every layer
    stepping, the result is bit-identical to ``torch.optim.AdamW(fused=...)`` / ``(foreach=True)``. Layers
    are grouped by lr scale, one kernel call per group. ``steps`` are float32 scalar tensors on the
    parameters' device (torch's layout for fused / capturable), so no path reads them on the host.

    Skipping a layer (``ok[i]`` false) leaves its weights, moments and step untouched:
    - on CPU the mask is read for free and the skipped layers are simply left out of the call;
    - on an accelerator with the fused kernel each layer gets its own call with ``found_inf = not ok[i]``,
      which the kernel checks on the device (the step count is incremented and decremented back, as torch's
      GradScaler path does): no host sync, one launch per layer instead of per chunk;
    - elsewhere (foreach only) the mask is read on the host, a sync only on a step that has one to check.
    """
    params, grads, exp_avgs, exp_avg_sqs, steps = map(list, (params, grads, exp_avgs, exp_avg_sqs, steps))
    if not params:
        return
    on_device_mask = ok is not None and params[0].device.type != "cpu" and impl == "fused"
    if ok is not None and not on_device_mask:
        keep = ok.tolist()  # CPU: free; foreach-only accelerators: the one sync there is no kernel for
        chosen = [i for i, k in enumerate(keep) if k]
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            [xs[i] for i in chosen] for xs in (params, grads, exp_avgs, exp_avg_sqs, steps)
        )
        lr_scales = [lr_scales[i] for i in chosen]
        ok = None
    groups: dict[float, list[int]] = defaultdict(list)
    for i, scale in enumerate(lr_scales):
        groups[float(scale)].append(i)
    capturable = impl == "foreach" and params and params[0].device.type != "cpu"
    for scale, members in groups.items():
        calls = [[i] for i in members] if ok is not None else [members]
        for call in calls:
            found_inf = None if ok is None else (~ok[call[0]]).to(torch.float32)
            torch_adamw(
                [params[i] for i in call],
                [grads[i] for i in call],
                [exp_avgs[i] for i in call],
                [exp_avg_sqs[i] for i in call],
                [],
                [steps[i] for i in call],
                foreach=impl == "foreach",
                fused=impl == "fused",
                capturable=bool(capturable),
                found_inf=found_inf,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=lr * scale,
                weight_decay=weight_decay,
                eps=eps,
                maximize=False,
            )

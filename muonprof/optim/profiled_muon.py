"""ProfiledMuon: Muon for hidden matrices with a per-layer recipe from a profile, AdamW for the rest.

The Muon path, with no profile, is torch.optim.Muon's algorithm step for step:

    B <- lerp(B, g, 1 - mu)                   EMA momentum
    U <- lerp(g, B, mu)   (Nesterov; else B)
    O <- NS_5(U)          Jordan's quintic in bf16 on U / max(||U||_F, 1e-7)
    W <- W (1 - lr wd)    decoupled weight decay with the unadjusted lr
    W <- W - lr sqrt(max(1, A/B)) O

A profile changes, per layer, the orthogonalizer (``O``), the shape rule (``sqrt(max(1, A/B))``) and a
multiplier on it. Layers with the same matrix shape, dtype, device and orthogonalizer are stacked and
orthogonalized in one batched call: on a GPU a model of many small matrices is otherwise launch-bound.

Non-finite gradients: a layer whose gradient holds a NaN or an Inf is skipped for that step (its
weights, momentum / Adam moments and step count stay as they were) while the other layers update;
``nonfinite_counts()`` reports how often that happened. The check is a tensor mask, not a host sync,
so it costs no pipeline stall; ``skip_nonfinite=False`` turns it off (then NaN spreads, as in torch).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..ortho import OrthoConfig, orthogonalize
from ..profile import LayerPlan, Profile, load_profile, resolve_layers
from .routing import route_module, route_named_parameters

ProfileSource = Profile | str | os.PathLike[str] | dict[str, Any] | None


class ProfiledMuon(torch.optim.Optimizer):
    """Muon with a per-layer orthogonalizer and learning-rate scale loaded from a muonprof profile.

    Args:
        model_or_named_params: an ``nn.Module`` (parameters are routed by module type: hidden matrices
            and conv weights to Muon; embeddings, the output head and 1-D parameters to AdamW) or an
            iterable of ``(name, parameter)`` pairs (>= 2-D to Muon, the rest to AdamW).
        profile: None (torch.optim.Muon's defaults everywhere), a path to a JSON profile, a parsed dict
            or a ``Profile``. It may override any layer, including its optimizer.
        lr, momentum, nesterov, weight_decay: the Muon group's hyper-parameters (``lr`` is the base lr
            that LR schedulers scale; a layer's step is ``lr x lr_rule(shape) x lr_scale``).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW group's.
        strict: refuse a profile that does not match the model (default). With ``strict=False`` the
            unmatched entries are ignored with a warning that lists them.
        skip_nonfinite: skip layers with NaN/Inf gradients for the step (see the module docstring).
        seed: seeds the randomized orthogonalizers (lowrank, rsvd); derived per step and layer bucket,
            so a resumed run draws the same sketches as an uninterrupted one.
        batch: orthogonalize same-shape layers in one batched call. None (default): on accelerators
            yes, on CPU no (CPU BLAS gains nothing from it and the stacking copies cost ~10%).
    """

    def __init__(
        self,
        model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]],
        profile: ProfileSource = None,
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        strict: bool = True,
        skip_nonfinite: bool = True,
        seed: int = 0,
        batch: bool | None = None,
    ) -> None:
        _check_hparams(lr, momentum, weight_decay, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        named, routes = _named_and_routes(model_or_named_params)
        self.profile: Profile | None = load_profile(profile) if profile is not None else None
        shapes = {name: tuple(p.shape) for name, p in named}
        self.plans: dict[str, LayerPlan] = resolve_layers(self.profile, shapes, routes, strict=strict)
        self._plan_of: dict[int, LayerPlan] = {id(p): self.plans[name] for name, p in named}
        self._index_of: dict[int, int] = {id(p): i for i, (_, p) in enumerate(named)}
        self.skip_nonfinite = skip_nonfinite
        self.seed = int(seed)
        self.batch = batch

        muon = [p for name, p in named if self.plans[name].optimizer == "muon"]
        adamw = [p for name, p in named if self.plans[name].optimizer == "adamw"]
        groups: list[dict[str, Any]] = []
        if muon:
            groups.append(
                dict(
                    params=muon,
                    use_muon=True,
                    lr=lr,
                    momentum=momentum,
                    nesterov=nesterov,
                    weight_decay=weight_decay,
                )
            )
        if adamw:
            groups.append(
                dict(
                    params=adamw,
                    use_muon=False,
                    lr=adamw_lr,
                    betas=tuple(adamw_betas),
                    eps=adamw_eps,
                    weight_decay=adamw_weight_decay,
                )
            )
        super().__init__(groups, {})

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` (re-evaluating the loss) is called first if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _buckets(self, group: dict[str, Any]) -> dict[tuple[Any, ...], list[Tensor]]:
        """Parameters with a gradient, grouped so that each group is one batched orthogonalization."""
        buckets: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ProfiledMuon does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("ProfiledMuon does not support complex parameters")
            plan = self._plan_of[id(p)]
            buckets[(plan.matrix_shape, p.dtype, p.device, plan.ortho)].append(p)
        return buckets

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for (shape, _, device, ortho), params in self._buckets(group).items():
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, st in zip(params, states):
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"] = torch.tensor(0.0)
            bufs = [st["momentum_buffer"] for st in states]
            ok = self._finite_mask(grads, device) if self.skip_nonfinite else None
            if ok is not None:
                # A bad gradient is replaced by the momentum itself: lerp(B, B) = B leaves it unchanged and
                # the Nesterov mix is finite; the update is zeroed below.
                grads = [torch.where(ok[i], g, b) for i, (g, b) in enumerate(zip(grads, bufs))]
                self._count_nonfinite(states, ok)
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            step = int(states[0]["step"]) + 1  # CPU tensor: no device sync
            for st in states:
                st["step"] += 1
            generator = self._generator(ortho, device, step, self._index_of[id(params[0])])
            batched = self.batch if self.batch is not None else device.type != "cpu"
            if not batched or len(params) == 1:
                # CPU BLAS gains nothing from batching, and stacking/unstacking copies cost ~10% of a step
                # there (measured, GPT-2 shapes): one matrix at a time, with torch.optim.Muon's own kernels.
                outs = [orthogonalize(u.reshape(shape), ortho, generator=generator) for u in updates]
            else:
                # Accelerators are launch-bound on small matrices: one batched call per bucket (2x+ on H100).
                outs = list(orthogonalize(torch.stack([u.reshape(shape) for u in updates]), ortho, generator=generator))
            if ok is not None:
                # Zero the skipped layers' updates; multiplying by exactly 1.0 keeps the others bit-identical
                # to an unmasked step (and so to torch.optim.Muon). Each output is fresh: in place is safe.
                torch._foreach_mul_(outs, list(ok.to(outs[0].dtype).unbind(0)))
            if wd != 0:
                if ok is None:
                    torch._foreach_mul_(params, 1 - lr * wd)
                else:
                    # Python scalars, not torch.tensor(..., device=...): building a device tensor from a
                    # host value would block the host on every step.
                    torch._foreach_mul_(params, list(torch.where(ok, 1 - lr * wd, 1.0).unbind(0)))
            factors = [self._plan_of[id(p)].lr_factor for p in params]
            for o, f in zip(outs, factors):
                if f != factors[0]:
                    o.mul_(f / factors[0])
            torch._foreach_add_(params, [o.view_as(p) for o, p in zip(outs, params)], alpha=-lr * factors[0])

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("ProfiledMuon does not support sparse gradients")
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        ok = self._finite_mask(grads, params[0].device) if self.skip_nonfinite else None
        if ok is not None:
            self._count_nonfinite(states, ok)
        # Per-tensor (never per-element) loop with tensor-valued step counts and a 0/1 gate per layer,
        # so that a skipped layer's moments and step stay put and nothing here waits for the device.
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            layer_lr = lr * self._plan_of[id(p)].lr_scale
            if ok is None:
                gate: float | Tensor = 1.0
            else:
                gate = ok[i].to(torch.float32)
                g = torch.where(ok[i], g, torch.zeros_like(g))
            st["step"] += gate
            step = st["step"].clamp(min=1)
            st["exp_avg"].lerp_(g, _weight((1 - beta1) * gate, g))
            st["exp_avg_sq"].lerp_(g * g, _weight((1 - beta2) * gate, g))
            denom = (st["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(eps)
            if wd != 0:
                p.mul_(1 - layer_lr * wd * gate)
            p.sub_(st["exp_avg"] / denom * (layer_lr * gate / (1 - beta1**step)))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _finite_mask(grads: list[Tensor], device: torch.device) -> Tensor | None:
        """(B,) bool: which gradients are entirely finite (a norm is finite iff every entry is), or None
        when all are and we may know it for free: on CPU reading the mask is not a device sync, so the
        common all-finite step skips the masking passes (measured ~15-40% of a CPU step at GPT-2 sizes).
        On accelerators the mask is always applied, so the host never waits for the device."""
        ok = torch.isfinite(torch.stack(torch._foreach_norm(grads)).float())
        if device.type == "cpu" and bool(ok.all()):
            return None
        return ok

    @staticmethod
    def _count_nonfinite(states: list[dict[str, Any]], ok: Tensor) -> None:
        bad = (~ok).to(torch.int32)
        for i, st in enumerate(states):
            if "nonfinite_steps" not in st:
                st["nonfinite_steps"] = torch.zeros((), dtype=torch.int32, device=ok.device)
            st["nonfinite_steps"] += bad[i]

    def _generator(self, ortho: OrthoConfig, device: torch.device, step: int, bucket: int) -> torch.Generator | None:
        if ortho.method not in ("lowrank", "rsvd"):
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + step * 10_007 + bucket) % (2**63 - 1))
        return generator

    # ------------------------------------------------------------------ reporting

    def nonfinite_counts(self) -> dict[str, int]:
        """Steps skipped per layer because of NaN/Inf gradients (synchronizes: call it outside the loop)."""
        return {
            self._plan_of[id(p)].name: int(st["nonfinite_steps"])
            for p, st in self.state.items()
            if "nonfinite_steps" in st and int(st["nonfinite_steps"]) > 0
        }

    def describe(self) -> list[dict[str, Any]]:
        """One row per parameter: optimizer, why, orthogonalizer and the resolved lr factor."""
        return [
            {
                "name": plan.name,
                "shape": list(plan.shape),
                "optimizer": plan.optimizer,
                "reason": plan.reason,
                "ortho": plan.ortho.label() if plan.ortho else None,
                "lr_rule": plan.lr_rule if plan.optimizer == "muon" else None,
                "lr_factor": plan.lr_factor,
            }
            for plan in self.plans.values()
        ]


def _weight(w: float | Tensor, like: Tensor) -> float | Tensor:
    """lerp_ wants a Python float or a tensor of the input's dtype."""
    return w.to(like.dtype) if isinstance(w, Tensor) else w


def _named_and_routes(
    source: nn.Module | Iterable[tuple[str, Tensor]],
) -> tuple[list[tuple[str, Tensor]], dict[str, tuple[str, str]]]:
    if isinstance(source, nn.Module):
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
        routes = route_module(source)
    else:
        try:
            named = [(str(n), p) for n, p in source]  # type: ignore[misc]
        except (TypeError, ValueError):
            raise TypeError(
                "ProfiledMuon takes an nn.Module or (name, parameter) pairs, e.g. model.named_parameters()"
            ) from None
        if not all(isinstance(p, Tensor) for _, p in named):
            raise TypeError("ProfiledMuon takes (name, parameter) pairs; got a non-tensor parameter")
        named = [(n, p) for n, p in named if p.requires_grad]
        routes = route_named_parameters(named)
    if not named:
        raise ValueError("ProfiledMuon got no trainable parameters")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("ProfiledMuon got duplicate parameter names")
    return named, routes


def _check_hparams(
    lr: float,
    momentum: float,
    weight_decay: float,
    adamw_lr: float,
    adamw_betas: tuple[float, float],
    adamw_eps: float,
    adamw_weight_decay: float,
) -> None:
    checks = [
        (lr >= 0, f"lr must be >= 0, got {lr}"),
        (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        (adamw_lr >= 0, f"adamw_lr must be >= 0, got {adamw_lr}"),
        (
            len(adamw_betas) == 2 and all(0 <= b < 1 for b in adamw_betas),
            f"adamw_betas must be in [0, 1), got {adamw_betas}",
        ),
        (adamw_eps > 0, f"adamw_eps must be > 0, got {adamw_eps}"),
        (adamw_weight_decay >= 0, f"adamw_weight_decay must be >= 0, got {adamw_weight_decay}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)

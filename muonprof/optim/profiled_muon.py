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

LiMuon, per layer: ``momentum: "storm"`` replaces the EMA by M_t = g(x_t) + mu (M_{t-1} - g(x_{t-1})) on the
same batch (``step(closure)``, two backward passes); ``momentum_rank: r`` keeps the momentum as rank-r
factors and steps along their U V^T (``lowrank_momentum``).

Error feedback (``error_feedback: true`` on a lowrank / rsvd layer) and Dion2-style subset orthogonalization
(``method: "subset"``) keep what the update did not apply in the momentum and decay only the applied part:
E_t = X_t - (1 - mu) A_t with X_t = E_{t-1} + (1 - mu) g_t (``momentum_rules``); at full rank / fraction 1
that is the EMA step above to float rounding. Not yet under torch.distributed (refused at construction).

The math is in ``functional`` (pure functions over lists of tensors: the momentum forms, the orthogonalizer
calls, the update, AdamW through torch's fused / foreach kernels); this class owns the state, the plans, the
buckets and the ranks, as torch's optimizers keep ``_multi_tensor_*`` / ``_fused_*`` behind a thin class.

Under torch.distributed each Muon layer's expensive part runs on one owner rank and the results are
all-gathered (DDP), or gathered to and scattered from the owner (FSDP2): see ``distributed``.

Non-finite gradients: a layer whose gradient holds a NaN or an Inf is skipped for that step (its
weights, momentum / Adam moments and step count stay as they were) while the other layers update;
``nonfinite_counts()`` reports how often that happened. The check is a tensor mask, not a host sync,
so it costs no pipeline stall; ``skip_nonfinite=False`` turns it off (then NaN spreads, as in torch).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..ortho import OrthoConfig
from ..ortho.signals import applied_share
from ..profile import LayerPlan, Profile, load_profile, resolve_layers
from . import distributed as dist_split
from . import functional as F
from .ladder import RungState, decide
from .lowrank_momentum import compress, expand, polar_of_factors
from .routing import fan_layouts, route_module, route_named_parameters
from .usage import example_runner, trace_parameter_use

ProfileSource = Profile | str | os.PathLike[str] | dict[str, Any] | None


@dataclass
class _Bucket:
    """Same-shape layers with the same recipe, on their way through one step."""

    params: list[Tensor]  # the parameters (keys for state and plans)
    tensors: list[Tensor]  # what is updated: the parameters, or their local rows under FSDP2
    states: list[dict[str, Any]]
    shape: tuple[int, int]
    device: torch.device
    ortho: OrthoConfig | None
    momentum: str
    rank: int | None
    steps: list[int]
    owners: list[bool]  # does this rank compute the layer's update
    ok: Tensor | None = None
    inputs: list[Any] = field(default_factory=list)
    before: list[Tensor] | None = None
    momenta: list[Tensor] | None = None  # tail-keeping layers: this step's momentum X (momentum_rules)
    mu: float = 0.0


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
        example_inputs: a batch for one forward pass (``model(*inputs)`` for a tuple, ``model(**inputs)`` for a
            dict, else ``model(inputs)``), run once under ``no_grad`` in eval mode: routing then follows what the
            model does (``usage``): the layers the input meets first and the outputs come from last go to AdamW,
            and so do parameters it adds, concatenates or indexes, whatever their names or registration order.
        adamw_impl: ``"fused"`` or ``"foreach"``: which of torch's AdamW kernels the AdamW group runs
            (``functional.adamw``; the result equals ``torch.optim.AdamW(fused=True)`` or ``(foreach=True)``).
            None (default): fused wherever torch has the kernel for the device and dtype, else foreach.
        ladder_trace: a JSON-lines file each ladder move is appended to (step, layer, from, to, signal, ...;
            rank 0 only): ``muonprof profile trace FILE`` summarizes it. Layers without a ladder never move.

    Ladders (a profile's per-layer ``ladder``): the layer runs one rung of its recipe list at a time; every
    ``every`` steps the active rung's quality signal is measured on the device (``ortho.signals``) and read
    on the host once for all layers (the only sync, after an all_reduce under torch.distributed), and the
    controller (``ladder``) moves the layer up or down. A move only changes the layer's plan: buckets are
    regrouped from the plans at every step anyway. The momentum buffer is kept across a move; between a
    tail-keeping rung (error feedback / subset, whose buffer holds E = X - (1 - mu) A) and a plain one (torch's
    B) it is rescaled (B = E / mu, E = mu B) so the first step on the new rung continues the same momentum X,
    the not-yet-applied tail included. ``state_dict`` carries the rungs, the counters and a bounded signal
    history, so a resumed run takes the same decisions.
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
        adamw_impl: F.AdamWImpl | None = None,
        example_inputs: Any = None,
        distributed: bool | None = None,
        process_group: Any = None,
        ladder_trace: str | os.PathLike[str] | None = None,
    ) -> None:
        _check_hparams(lr, momentum, weight_decay, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        named, routes, layouts = _named_and_routes(model_or_named_params, example_inputs)
        self.profile: Profile | None = load_profile(profile) if profile is not None else None
        shapes = {name: tuple(p.shape) for name, p in named}
        self.plans: dict[str, LayerPlan] = resolve_layers(self.profile, shapes, routes, strict=strict, layouts=layouts)
        self._plan_of: dict[int, LayerPlan] = {id(p): self.plans[name] for name, p in named}
        self._index_of: dict[int, int] = {id(p): i for i, (_, p) in enumerate(named)}
        self.skip_nonfinite = skip_nonfinite
        self.seed = int(seed)
        self.batch = batch
        if adamw_impl not in (None, "fused", "foreach"):
            raise ValueError(f"adamw_impl must be 'fused', 'foreach' or None, got {adamw_impl!r}")
        self.adamw_impl: F.AdamWImpl | None = adamw_impl

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
        self._storm: list[Tensor] = [p for p in muon if self._plan_of[id(p)].momentum == "storm"]
        self._corrections: dict[int, tuple[Tensor | None, Tensor]] = {}
        # Everything every rank must agree on besides the plans (the groups' settings, minus the tensors).
        hyper = {"groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]}
        self._setup_distributed(named, distributed, process_group, {**hyper, "skip": skip_nonfinite, "seed": seed})
        self._setup_ladders(muon, ladder_trace)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, plus (with ladders) ``"ladder"``: the step clock and each adaptive layer's
        rung, counters and recent signals (``ladder.RungState``), by layer name."""
        saved = super().state_dict()
        if self._ladder_params:
            saved["ladder"] = {
                "clock": self._ladder_clock,
                "layers": {self._plan_of[id(p)].name: self._rungs[id(p)].to_dict() for p in self._ladder_params},
            }
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after checking that the saved state fits this profile's recipes.

        A state saved under another profile (a layer moved between Muon and AdamW, or to/from low-rank
        momentum) would otherwise load silently and fail later inside ``step`` on a missing internal key;
        here it is one ValueError that names the layer whose saved state does not match. Ladder positions
        are restored first (the saved buffers are in the saved rung's form)."""
        _check_saved_state(state_dict, self.param_groups, self._plan_of)
        state_dict = dict(state_dict)
        ladder = state_dict.pop("ladder", None)
        if ladder is not None:
            self._load_ladder_state(ladder)
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ ladders

    def _setup_ladders(self, muon: list[Tensor], trace: str | os.PathLike[str] | None) -> None:
        """The adaptive layers (a ladder of two rungs or more), their positions, and the trace file."""
        self._ladder_params: list[Tensor] = [
            p for p in muon if (ladder := self._plan_of[id(p)].ladder) is not None and len(ladder.rungs) > 1
        ]
        self._rungs: dict[int, RungState] = {
            id(p): RungState(self._plan_of[id(p)].ladder.start) for p in self._ladder_params  # type: ignore[union-attr]
        }
        self._ladder_clock = 0
        self._due: set[int] = set()
        self._signals: dict[int, tuple[Tensor, Tensor]] = {}
        self.ladder_trace = Path(trace) if trace is not None else None
        if self._group is not None:
            tail = [
                self._plan_of[id(p)].name
                for p in self._ladder_params
                if any(r.keeps_tail for r in self._plan_of[id(p)].ladder.rungs)  # type: ignore[union-attr]
            ]
            if tail:
                raise dist_split.DistributedSetupError(
                    f"{tail[0]}: its ladder has an error_feedback / subset rung, which is not supported under "
                    "torch.distributed yet; drop those rungs for distributed runs"
                )

    def _load_ladder_state(self, saved: dict[str, Any]) -> None:
        by_name = {self._plan_of[id(p)].name: p for p in self._ladder_params}
        layers = saved.get("layers", {})
        unknown = sorted(set(layers) - set(by_name))
        if unknown:
            raise ValueError(f"state_dict has ladder state for {unknown[0]!r}, which has no ladder in this profile")
        for name, data in layers.items():
            p = by_name[name]
            state = RungState.from_dict(data)
            ladder = self._plan_of[id(p)].ladder
            assert ladder is not None
            if not 0 <= state.rung < len(ladder.rungs):
                raise ValueError(f"state_dict puts {name!r} on rung {state.rung}; its ladder has {len(ladder.rungs)}")
            self._rungs[id(p)] = state
            self._set_rung(p, state.rung)
        self._ladder_clock = int(saved.get("clock", 0))

    def _set_rung(self, p: Tensor, rung: int) -> None:
        """Run ``p`` on ``rung`` from the next step on (its plan; the buckets follow the plans)."""
        plan = self._plan_of[id(p)]
        assert plan.ladder is not None
        new = replace(plan, ortho=plan.ladder.rungs[rung], lr_scale=plan.ladder.lr_scales[rung])
        self._plan_of[id(p)] = new
        self.plans[plan.name] = new

    def _move(self, p: Tensor, frm: int, rung: int, signal: float, mu: float) -> None:
        """A decided move: the plan, the momentum buffer's form (see the class docstring) and the trace."""
        plan = self._plan_of[id(p)]
        assert plan.ladder is not None and plan.ortho is not None
        old, new = plan.ortho, plan.ladder.rungs[rung]
        buffer = self.state[p].get("momentum_buffer")
        if buffer is not None and old.keeps_tail != new.keeps_tail and mu > 0:
            if new.keeps_tail:
                buffer.mul_(mu)
            else:
                buffer.div_(mu)
        self._set_rung(p, rung)
        if self.ladder_trace is not None and self._rank == 0:
            row = {
                "step": self._ladder_clock,
                "layer": plan.name,
                "from": frm,
                "to": rung,
                "from_recipe": old.label(),
                "to_recipe": new.label(),
                "signal": signal,
                "floor": plan.ladder.floor,
            }
            with open(self.ladder_trace, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def _signal_generator(self, p: Tensor, device: torch.device) -> torch.Generator:
        """The probes' generator: from (seed, clock, layer index), like the sketches, so any rank and a resumed
        run draw the same probes (and the global RNG is left alone)."""
        generator = torch.Generator(device=device)
        index = self._index_of[id(p)]
        generator.manual_seed((self.seed * 998_244_353 + self._ladder_clock * 10_009 + index + 7) % (2**63 - 1))
        return generator

    def _record_signals(self, bucket: _Bucket, mine: list[int], signals: list[Tensor]) -> None:
        """Keep the signals of the layers due this step; a skipped (non-finite) layer's does not count."""
        for i, value in zip(mine, signals):
            p = bucket.params[i]
            if id(p) not in self._due:
                continue
            valid = torch.ones((), dtype=torch.float32, device=value.device)
            if bucket.ok is not None:
                valid = bucket.ok[i].to(torch.float32)
            self._signals[id(p)] = (torch.where(valid > 0, value.float(), 0.0), valid)

    def _decide(self) -> None:
        """One host read of every due layer's signal (summed over ranks: only owners measure), then the moves."""
        due = [p for p in self._ladder_params if id(p) in self._due]
        device = due[0].device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        values = [self._signals.get(id(p), (zero, zero)) for p in due]
        table = torch.stack(
            [torch.stack([v.to(device) for v, _ in values]), torch.stack([c.to(device) for _, c in values])]
        )
        if self._group is not None:
            import torch.distributed as dist

            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self._group)
        sums, counts = table.tolist()
        mu = next(g["momentum"] for g in self.param_groups if g["use_muon"])
        for p, total, count in zip(due, sums, counts):
            if count <= 0:
                continue  # no gradient, or skipped as non-finite, on every rank: nothing measured
            signal = total / count
            state = self._rungs[id(p)]
            before = state.rung
            ladder = self._plan_of[id(p)].ladder
            assert ladder is not None
            after = decide(state, ladder, signal, self._ladder_clock)
            if after != before:
                self._move(p, before, after, signal, mu)
        self._signals = {}

    def ladder_status(self) -> dict[str, dict[str, Any]]:
        """Per adaptive layer: its rung, that rung's recipe and its recent (step, signal, rung) measurements."""
        out = {}
        for p in self._ladder_params:
            plan, state = self._plan_of[id(p)], self._rungs[id(p)]
            assert plan.ortho is not None
            out[plan.name] = {"rung": state.rung, "recipe": plan.ortho.label(), **state.to_dict()}
        return out

    def _setup_distributed(
        self, named: list[tuple[str, Tensor]], distributed: bool | None, process_group: Any, hyper: dict[str, Any]
    ) -> None:
        """Pick the process group, check every rank resolved the same plans, and assign layer owners."""
        self._group = dist_split.resolve_group(distributed, process_group)
        self._rank, self._world = 0, 1
        self._owner_of: dict[int, int] = {}
        self.owners: dict[str, int] = {}
        self.cost_source: str | None = None
        # Exchange buffers reused across steps (not optimizer state: never saved, rebuilt on demand).
        self._workspace: dict[Any, tuple[Tensor, list[Tensor]]] = {}
        self._fsdp = False
        mesh_group = dist_split.check_sharding(named, self.plans, distributed, process_group)
        if mesh_group is not None:
            self._group, self._fsdp = mesh_group, True
        if self._group is None:
            return
        import torch.distributed as dist

        self._rank, self._world = dist.get_rank(self._group), dist.get_world_size(self._group)
        dist_split.check_same_everywhere(dist_split.plans_digest(self.plans, hyper), self._group)
        if self._world == 1 and not self._fsdp:
            self._group = None
            return
        tail = [n for n, p in self.plans.items() if p.optimizer == "muon" and p.ortho and p.ortho.keeps_tail]
        if tail:
            more = f" and {len(tail) - 1} more" if len(tail) > 1 else ""
            raise dist_split.DistributedSetupError(
                f"{tail[0]}{more}: error_feedback / subset keep a momentum only the owner rank could update "
                "(the applied part comes from the orthogonalizer): not supported under torch.distributed yet; "
                "run them in one process or drop them for distributed runs"
            )
        muon = [(name, p) for name, p in named if self.plans[name].optimizer == "muon"]
        costs, self.cost_source = dist_split.layer_costs([self.plans[n] for n, _ in muon], self.profile)
        for (name, p), owner in zip(muon, dist_split.assign_owners(costs, self._world)):
            self._owner_of[id(p)] = owner
            self.owners[name] = owner

    # ------------------------------------------------------------------ stepping

    @property
    def needs_closure(self) -> bool:
        """True when some layer uses ``momentum: "storm"``: ``step`` then needs a closure it can call twice."""
        return bool(self._storm)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step.

        ``closure`` re-evaluates the loss: it must zero the gradients (we also clear them before each
        call), compute the loss on the current batch and call ``backward()``. Without storm layers it is
        called once, first, as in every torch optimizer. With storm layers it is required and is called
        twice on the same batch (two forward/backward passes): once with the storm layers moved back to
        their previous parameters, for g(x_{t-1}; xi_t), then at the current parameters, which is the
        gradient left in ``.grad`` and the loss returned. The global RNG state is replayed for the second
        call, so dropout masks match. The first step has no previous iterate and calls it once.
        """
        loss = None
        self._corrections = {}
        if self._ladder_params:
            self._ladder_clock += 1
            clock = self._ladder_clock
            self._due = {id(p) for p in self._ladder_params if clock % self._plan_of[id(p)].ladder.every == 0}  # type: ignore[union-attr]
        if self._storm:
            if closure is None:
                names = ", ".join(self._plan_of[id(p)].name for p in self._storm[:3])
                more = f" and {len(self._storm) - 3} more" if len(self._storm) > 3 else ""
                raise RuntimeError(
                    f"layers {names}{more} use momentum 'storm', which needs two gradients per step: "
                    "call optimizer.step(closure) with a closure that zeroes the grads, computes the loss "
                    "on the current batch, calls backward() and returns the loss"
                )
            loss = self._storm_evaluations(closure)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        self._corrections = {}
        if self._due:
            self._decide()
            self._due = set()
        return loss

    def _storm_evaluations(self, closure: Callable[[], Any]) -> Any:
        """Both closure calls of a storm step; leaves mu (M_{t-1} - g(x_{t-1}; xi_t)) per storm layer."""
        mu_of = {id(p): g["momentum"] for g in self.param_groups if g["use_muon"] for p in g["params"]}
        earlier = [p for p in self._storm if "prev_param" in self.state[p] or "storm_undo" in self.state[p]]
        rng = _rng_state({p.device for p in self._storm})
        if earlier:
            # x_{t-1} for every storm layer: stored (full-rank momentum) or rebuilt from the low-rank
            # factors, which are exactly the ones whose U V^T made the last update. The swap buffers hold
            # x_t meanwhile, so x_t comes back bit for bit.
            held = [self.state[p].get("prev_param") for p in earlier]
            held = [h if h is not None else self._rebuild_previous(p) for p, h in zip(earlier, held)]
            for p, h in zip(earlier, held):
                _swap(_local(p), h)
            try:
                self.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    closure()
            finally:
                for p, h in zip(earlier, held):
                    _swap(_local(p), h)
            del held
            for p in earlier:
                if p.grad is None:
                    continue
                st, plan = self.state[p], self._plan_of[id(p)]
                g_prev = _rows(_local(p.grad))
                if plan.momentum_rank is None:
                    previous = _rows(st["momentum_buffer"])
                elif self._is_owner(p):
                    previous = expand(st["momentum_U"], st["momentum_S"], st["momentum_V"])
                else:
                    # Only the owner rebuilds a low-rank momentum; the others just need g's finiteness.
                    self._corrections[id(p)] = (None, _all_finite(g_prev))
                    continue
                correction = (previous - g_prev.to(previous.dtype)).mul_(mu_of[id(p)])
                self._corrections[id(p)] = (correction, _all_finite(g_prev))
            _set_rng_state(rng)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return closure()

    def _rebuild_previous(self, p: Tensor) -> Tensor:
        """x_{t-1} of a low-rank storm layer from x_t = decay x_{t-1} - lr_step U V^T (a transient).

        LiMuon's light variant: only the factors persist, not a copy of the layer. Exact up to float
        rounding (the gradient at x_{t-1} is taken a few ulps away from the true iterate); a layer that
        did not move last step (non-finite skip) is its own previous iterate.
        """
        st = self.state[p]
        x = _local(p).detach()
        direction = polar_of_factors(st["momentum_U"], st["momentum_S"], st["momentum_V"]).view_as(x)
        lr_step, decay, moved = st["storm_undo"].float().unbind(0)
        decay = torch.where(decay > 0, decay, torch.ones_like(decay))  # lr * wd = 1 cannot be undone
        previous = ((x.float() + lr_step * direction) / decay).to(x.dtype)
        return torch.where(moved > 0, previous, x)

    def _buckets(self, group: dict[str, Any]) -> dict[tuple[Any, ...], list[Tensor]]:
        """Parameters with a gradient, grouped so that each group is one batched update computation."""
        buckets: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ProfiledMuon does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("ProfiledMuon does not support complex parameters")
            plan = self._plan_of[id(p)]
            ortho = None if plan.momentum_rank is not None else plan.ortho
            key = (plan.matrix_shape, p.dtype, p.device, ortho, plan.momentum, plan.momentum_rank)
            buckets[key].append(p)
        return buckets

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Three phases: momentum on every rank; the expensive part (orthogonalization, or compressing a
        low-rank momentum) only by each layer's owner; then the exchange and the update on every rank."""
        lr, wd = group["lr"], group["weight_decay"]
        prepared = [self._prepare_bucket(key, params, group) for key, params in self._buckets(group).items()]
        results: dict[int, list[Tensor]] = {}
        for bucket in prepared:
            results.update(self._compute_owned(bucket))
        if self._group is not None and not self._fsdp and prepared:
            results = self._exchange(prepared, results)
        for bucket in prepared:
            self._apply(bucket, results, lr, wd)

    def _prepare_bucket(self, key: tuple[Any, ...], params: list[Tensor], group: dict[str, Any]) -> _Bucket:
        shape, _, device, ortho, momentum, rank = key
        mu = group["momentum"]
        states = [self.state[p] for p in params]
        owners = [self._is_owner(p) for p in params]
        grads = [_local(p.grad) for p in params]
        tensors = [_local(p) for p in params]  # FSDP2: this rank's rows; otherwise the parameters themselves
        for t, st in zip(tensors, states):
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
                if rank is None:
                    st["momentum_buffer"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                else:
                    m, n = shape
                    st["momentum_U"] = torch.zeros(m, rank, dtype=t.dtype, device=t.device)
                    st["momentum_S"] = torch.zeros(rank, dtype=t.dtype, device=t.device)
                    st["momentum_V"] = torch.zeros(n, rank, dtype=t.dtype, device=t.device)
        steps = [int(st["step"]) + 1 for st in states]  # CPU tensors: no device sync
        for st in states:
            st["step"] += 1
        bucket = _Bucket(params, tensors, states, shape, device, ortho, momentum, rank, steps, owners, mu=mu)
        tail = rank is None and momentum == "ema" and ortho is not None and ortho.keeps_tail
        plain_ema = rank is None and momentum == "ema" and not tail
        ok = self._layer_mask(grads, device)
        if momentum == "storm":
            ok = self._with_correction_finiteness(params, ok, device)
        bucket.ok = ok
        if ok is not None:
            self._count_nonfinite(states, ok)
        if ok is not None and not plain_ema:
            # A bad gradient is replaced by zeros so that nothing below makes NaNs; the layer's update is
            # zeroed and its state kept (see _apply).
            grads = F.zero_where_skipped(grads, ok)
        corrections = [self._corrections.get(id(p), (None, None))[0] for p in params]

        buffers = [st["momentum_buffer"] for st in states] if rank is None else []
        if tail:  # error feedback / subset: X and U now, the buffer only once the applied part is known
            bucket.momenta, bucket.inputs = F.tail_inputs(buffers, grads, mu, group["nesterov"])
        elif rank is None and momentum == "ema":
            bucket.inputs = F.ema_momentum(buffers, grads, mu, group["nesterov"], ok)
        elif rank is None:  # storm, full buffer: M_t = g_t + mu (M_{t-1} - g~), replicated on every rank
            bucket.inputs = F.storm_momentum(buffers, grads, corrections, ok)
        else:  # low-rank momentum: only the owner rebuilds and recompresses it
            factors = [(st["momentum_U"], st["momentum_S"], st["momentum_V"]) for st in states]
            bucket.inputs = F.lowrank_momentum_inputs(factors, grads, shape, mu, momentum, corrections, owners)
        if ok is not None and not plain_ema:
            # A NaN from g(x_{t-1}) reaches the input through the correction: feed skipped layers zeros.
            bucket.inputs = [
                x if x is None else torch.where(ok[i], x, torch.zeros_like(x)) for i, x in enumerate(bucket.inputs)
            ]  # (entries may be None: not this rank's low-rank layers)
        if momentum == "storm" and rank is None:
            bucket.before = [t.detach().clone() for t in tensors]  # x_t, the next step's previous iterate
        return bucket

    def _layer_mask(self, grads: list[Tensor], device: torch.device) -> Tensor | None:
        """Which layers step (see ``functional.finite_mask``). Under FSDP2 each rank sees only its rows, so the
        ranks agree on the mask with one all_reduce: a layer is skipped everywhere or nowhere."""
        if not self.skip_nonfinite:
            return None
        if not self._fsdp:
            return F.finite_mask(grads, device)
        import torch.distributed as dist

        ok = torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=float("inf"))).float()).to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self._group)
        ok = ok.bool()
        if device.type == "cpu" and bool(ok.all()):
            return None
        return ok

    def _with_correction_finiteness(
        self, params: list[Tensor], ok: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """Fold the finiteness of g(x_{t-1}) into the layer mask: a NaN there also poisons M_t."""
        if not self.skip_nonfinite or not any(id(p) in self._corrections for p in params):
            return ok
        prev_ok = torch.stack(
            [
                self._corrections[id(p)][1] if id(p) in self._corrections else torch.tensor(True, device=device)
                for p in params
            ]
        )
        if self._fsdp:
            import torch.distributed as dist

            flags = prev_ok.to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self._group)
            prev_ok = flags.bool()
        if device.type == "cpu" and bool(prev_ok.all()):
            return ok
        base = ok if ok is not None else torch.ones(len(params), dtype=torch.bool, device=device)
        return base & prev_ok

    def _compute_owned(self, bucket: _Bucket) -> dict[int, list[Tensor]]:
        """The expensive part for the layers this rank owns: {param index: [O]} or {index: [U, S, V]}.
        Under FSDP2 the owner first gathers the layer's rows and afterwards scatters each rank its rows
        of the result, so the dict then holds every layer's local rows."""
        inputs = bucket.inputs
        if self._fsdp:
            inputs = [
                dist_split.gather_rows(x, bucket.shape, self._owner_of[id(p)], self._group)
                for x, p in zip(inputs, bucket.params)
            ]
        mine = [i for i, owner in enumerate(bucket.owners) if owner]
        indices = [self._index_of[id(bucket.params[i])] for i in mine]
        generators = self._generators(bucket, mine, indices)
        results: dict[int, list[Tensor]] = {}
        if mine and bucket.rank is not None:
            owned = [inputs[i] for i in mine]
            if len(owned) == 1 or not self._batched(bucket.device):
                factors = [
                    compress(x, bucket.rank, generator=[g] if generators else None)
                    for x, g in zip(owned, generators or [None] * len(owned))
                ]
            else:
                U, S, V = compress(torch.stack(owned), bucket.rank, generator=generators)
                factors = list(zip(U.unbind(0), S.unbind(0), V.unbind(0)))
            results = {idx: list(f) for idx, f in zip(indices, factors)}
        elif mine and bucket.momenta is not None:
            results = self._tail_updates(bucket, mine, indices, generators)
        elif mine and any(id(bucket.params[i]) in self._due for i in mine):
            outs, signals = F.orthogonalize_all_with_signals(
                [inputs[i] for i in mine],
                bucket.shape,
                bucket.ortho,
                batched=self._batched(bucket.device),
                generators=generators,
                probe_generators=[self._signal_generator(bucket.params[i], bucket.device) for i in mine],
            )
            self._record_signals(bucket, mine, signals)
            results = {idx: [o] for idx, o in zip(indices, outs)}
        elif mine:
            outs = F.orthogonalize_all(
                [inputs[i] for i in mine],
                bucket.shape,
                bucket.ortho,
                batched=self._batched(bucket.device),
                generators=generators,
            )
            results = {idx: [o] for idx, o in zip(indices, outs)}
        if self._fsdp:
            for p, t in zip(bucket.params, bucket.tensors):
                idx = self._index_of[id(p)]
                full = results[idx][0] if idx in results else None
                dtype = _output_dtype(bucket.ortho, t.dtype)
                results[idx] = [
                    dist_split.scatter_rows(full, t, bucket.shape, dtype, self._owner_of[id(p)], self._group)
                ]
        return results

    def _tail_updates(
        self, bucket: _Bucket, mine: list[int], indices: list[int], generators: list[torch.Generator] | None
    ) -> dict[int, list[Tensor]]:
        """{index: [O, A]} for error-feedback / subset layers: the update and the part of the momentum it
        applied (``ortho.applied_update``), one matrix at a time on CPU, batched on accelerators."""
        assert bucket.momenta is not None and bucket.ortho is not None
        pairs = F.applied_updates_all(
            [bucket.inputs[i] for i in mine],
            [bucket.momenta[i] for i in mine],
            bucket.shape,
            bucket.ortho,
            batched=self._batched(bucket.device),
            generators=generators,
        )
        if any(id(bucket.params[i]) in self._due for i in mine):
            signals = [
                applied_share(bucket.momenta[i], a)[0] for i, (_, a) in zip(mine, pairs)
            ]
            self._record_signals(bucket, mine, signals)
        return {idx: [o, a] for idx, (o, a) in zip(indices, pairs)}

    def _apply(self, bucket: _Bucket, results: dict[int, list[Tensor]], lr: float, wd: float) -> None:
        params, states, ok = bucket.tensors, bucket.states, bucket.ok
        keys = [self._index_of[id(p)] for p in bucket.params]
        if bucket.momenta is not None:
            # E <- X - (1 - mu) A; a skipped layer keeps its buffer (its X was built from a zero gradient).
            buffers = [st["momentum_buffer"] for st in states]
            F.tail_commit(buffers, bucket.momenta, [results[key][1] for key in keys], bucket.mu, ok)
        if bucket.rank is not None:
            factors = [(st["momentum_U"], st["momentum_S"], st["momentum_V"]) for st in states]
            outs = F.lowrank_momentum_commit(factors, [results[key] for key in keys], ok)
        else:
            outs = [results[key][0] for key in keys]
        if bucket.before is not None:
            for i, (st, before) in enumerate(zip(states, bucket.before)):
                if "prev_param" not in st:
                    st["prev_param"] = before
                elif ok is None:
                    st["prev_param"].copy_(before)
                else:
                    st["prev_param"].copy_(torch.where(ok[i], before, st["prev_param"]))
        factors = [self._plan_of[id(p)].lr_factor for p in bucket.params]
        if bucket.momentum == "storm" and bucket.rank is not None:
            # What _rebuild_previous needs to undo this step, [lr_step, decay, moved], kept as a device
            # tensor (filled on the device: no host sync) so a skipped layer keeps the last real move.
            # In the parameter's dtype, as load_state_dict would cast it anyway.
            for i, (st, f, t) in enumerate(zip(states, factors, params)):
                undo = torch.empty(3, dtype=t.dtype, device=t.device)
                undo[0], undo[1], undo[2] = lr * f, 1 - lr * wd, 1.0
                if ok is not None:
                    old = st.get("storm_undo")
                    if old is None:
                        old = torch.zeros(3, dtype=t.dtype, device=t.device)
                        old[1] = 1.0
                    undo = torch.where(ok[i], undo, old)
                st["storm_undo"] = undo
        # Each output is fresh (orthogonalize's result, or polar_of_factors'): muon_apply may scale it in place.
        F.muon_apply(params, outs, lr=lr, weight_decay=wd, lr_factors=factors, ok=ok)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("ProfiledMuon does not support sparse gradients")
        grads = [_local(p.grad) for p in params]
        states = [self.state[p] for p in params]
        lr_scales = [self._plan_of[id(p)].lr_scale for p in params]
        params = [_local(p) for p in params]  # FSDP2: AdamW is elementwise, so each rank updates its rows
        for p, st in zip(params, states):
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        ok = self._layer_mask(grads, params[0].device)
        if ok is not None:
            self._count_nonfinite(states, ok)
        F.adamw(
            params,
            grads,
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [st["step"] for st in states],
            lr=lr,
            lr_scales=lr_scales,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=wd,
            ok=ok,
            impl=self.adamw_impl or F.default_adamw_impl(params),
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _count_nonfinite(states: list[dict[str, Any]], ok: Tensor) -> None:
        bad = (~ok).to(torch.int32)
        for i, st in enumerate(states):
            if "nonfinite_steps" not in st:
                st["nonfinite_steps"] = torch.zeros((), dtype=torch.int32, device=ok.device)
            st["nonfinite_steps"] += bad[i]

    def _generators(self, bucket: _Bucket, mine: list[int], indices: list[int]) -> list[torch.Generator] | None:
        """One generator per layer, seeded from (seed, the layer's step, the layer's index): a layer's
        sketch then does not depend on its bucket-mates, on batching or on which rank computes it, and a
        resumed run draws what an uninterrupted one would."""
        if bucket.rank is None and (bucket.ortho is None or bucket.ortho.method not in ("lowrank", "rsvd")):
            return None
        generators = []
        for i, index in zip(mine, indices):
            generator = torch.Generator(device=bucket.device)
            generator.manual_seed((self.seed * 1_000_003 + bucket.steps[i] * 10_007 + index) % (2**63 - 1))
            generators.append(generator)
        return generators

    def _batched(self, device: torch.device) -> bool:
        return self.batch if self.batch is not None else device.type != "cpu"

    def _is_owner(self, p: Tensor) -> bool:
        return self._group is None or self._owner_of[id(p)] == self._rank

    def _exchange(self, prepared: list[_Bucket], owned: dict[int, list[Tensor]]) -> dict[int, list[Tensor]]:
        """Every rank gets every layer's result (one all_gather for the whole step)."""
        layout = []
        for bucket in prepared:
            for p in bucket.params:
                m, n = bucket.shape
                if bucket.rank is None:
                    parts = [((m, n), _output_dtype(bucket.ortho, p.dtype))]
                else:
                    r = bucket.rank
                    parts = [((m, r), torch.float32), ((r,), torch.float32), ((n, r), torch.float32)]
                layout.append((self._index_of[id(p)], self._owner_of[id(p)], parts))
        return dist_split.exchange(owned, layout, self._group, prepared[0].device, self._workspace)

    # ------------------------------------------------------------------ reporting

    def nonfinite_counts(self) -> dict[str, int]:
        """Steps skipped per layer because of NaN/Inf gradients (synchronizes: call it outside the loop)."""
        return {
            self._plan_of[id(p)].name: int(st["nonfinite_steps"])
            for p, st in self.state.items()
            if "nonfinite_steps" in st and int(st["nonfinite_steps"]) > 0
        }

    def describe(self) -> list[dict[str, Any]]:
        """One row per parameter: optimizer, why, orthogonalizer, the resolved lr factor, the momentum form
        and (under torch.distributed) the rank that computes the layer's update."""
        return [
            {
                "name": plan.name,
                "shape": list(plan.shape),
                "optimizer": plan.optimizer,
                "reason": plan.reason,
                "ortho": plan.ortho.label() if plan.ortho else None,
                "lr_rule": plan.lr_rule if plan.optimizer == "muon" else None,
                "lr_factor": plan.lr_factor,
                "layout": plan.layout if plan.optimizer == "muon" else None,
                "momentum": plan.momentum_label if plan.optimizer == "muon" else None,
                "owner_rank": self.owners.get(plan.name),
            }
            for plan in self.plans.values()
        ]


def _named_and_routes(
    source: nn.Module | Iterable[tuple[str, Tensor]], example_inputs: Any = None
) -> tuple[list[tuple[str, Tensor]], dict[str, tuple[str, str]], dict[str, str]]:
    """The trainable (name, parameter) pairs, their routes and (for a module) the transposed weights' layouts.
    With ``example_inputs`` a module is routed from one traced forward pass (``usage``)."""
    layouts: dict[str, str] = {}
    if isinstance(source, nn.Module):
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
        use = None
        if example_inputs is not None:
            use = trace_parameter_use(source, example_runner(source, example_inputs))
        routes = route_module(source, use)
        layouts = fan_layouts(source)
    else:
        if example_inputs is not None:
            raise ValueError("example_inputs needs the model itself (an nn.Module), not (name, parameter) pairs")
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
    return named, routes, layouts


def _expected_state(plan: LayerPlan, p: Tensor) -> dict[str, tuple[int, ...]]:
    """The state tensors (and their shapes) this optimizer keeps for ``p`` under ``plan`` once it has stepped.

    Shapes are this rank's (``_local``: an FSDP2 shard), as the state is allocated; the low-rank factors are
    checked by their rank (``momentum_S``), which does not depend on the sharding."""
    local = tuple(_local(p).shape)
    if plan.optimizer == "adamw":
        return {"exp_avg": local, "exp_avg_sq": local}
    if plan.momentum_rank:
        return {"momentum_S": (int(plan.momentum_rank),)}
    return {"momentum_buffer": local}


def _check_saved_state(
    state_dict: dict[str, Any], groups: list[dict[str, Any]], plan_of: dict[int, LayerPlan]
) -> None:
    """ValueError naming the first layer whose saved state does not fit its plan here (see load_state_dict)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("load_state_dict expects a ProfiledMuon.state_dict() (a dict with 'state' and 'param_groups')")
    saved = state_dict["param_groups"]
    ours = [("muon" if g.get("use_muon") else "adamw", len(g["params"])) for g in groups]
    theirs = [("muon" if g.get("use_muon") else "adamw", len(g.get("params", []))) for g in saved]
    if ours != theirs:
        raise ValueError(
            f"this state_dict was saved under another profile or model: its parameter groups are {theirs}, "
            f"this optimizer's are {ours} (layers moved between Muon and AdamW?)"
        )
    for saved_group, group in zip(saved, groups):
        for index, p in zip(saved_group["params"], group["params"]):
            state = state_dict["state"].get(index)
            if not state:
                continue  # not stepped yet when saved: nothing to match
            plan = plan_of[id(p)]
            for key, shape in _expected_state(plan, p).items():
                value = state.get(key)
                got = tuple(value.shape) if isinstance(value, Tensor) else None
                if got != shape:
                    found = ", ".join(sorted(k for k in state if k != "step")) or "nothing"
                    raise ValueError(
                        f"state_dict does not match this profile: layer {plan.name!r} ({plan.optimizer}"
                        f"{', ' + plan.momentum_label if plan.optimizer == 'muon' else ''}) needs {key} of shape "
                        f"{list(shape)}, the saved state holds {found} (saved under another profile?)"
                    )


def _check_hparams(
    lr: float,
    momentum: float,
    weight_decay: float,
    adamw_lr: float,
    adamw_betas: tuple[float, float],
    adamw_eps: float,
    adamw_weight_decay: float,
) -> None:
    """One ValueError naming the first bad hyperparameter. Every one must be a finite number: an infinite
    lr or weight decay is not refused by a plain range check (inf >= 0) and turns every weight to NaN/0."""

    def finite(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    betas = tuple(adamw_betas) if isinstance(adamw_betas, tuple | list) else ()
    checks = [
        (finite(lr) and lr >= 0, f"lr must be >= 0 and finite, got {lr}"),
        (finite(momentum) and 0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
        (finite(weight_decay) and weight_decay >= 0, f"weight_decay must be >= 0 and finite, got {weight_decay}"),
        (finite(adamw_lr) and adamw_lr >= 0, f"adamw_lr must be >= 0 and finite, got {adamw_lr}"),
        (
            len(betas) == 2 and all(finite(b) and 0 <= b < 1 for b in betas),
            f"adamw_betas must be two numbers in [0, 1), got {adamw_betas}",
        ),
        (finite(adamw_eps) and adamw_eps > 0, f"adamw_eps must be > 0 and finite, got {adamw_eps}"),
        (
            finite(adamw_weight_decay) and adamw_weight_decay >= 0,
            f"adamw_weight_decay must be >= 0 and finite, got {adamw_weight_decay}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _output_dtype(ortho: OrthoConfig | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``orthogonalize`` returns for this config (the exact SVD computes in float32/64)."""
    ortho = ortho or OrthoConfig()
    if ortho.method == "svd":
        return torch.float64 if param_dtype == torch.float64 else torch.float32
    return ortho.torch_dtype


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _rows(t: Tensor) -> Tensor:
    """A parameter-shaped tensor as the matrix Muon sees (conv kernels flattened per output channel)."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def _all_finite(t: Tensor) -> Tensor:
    return torch.isfinite(torch.linalg.vector_norm(t, ord=float("inf")))


def _swap(p: Tensor, other: Tensor) -> None:
    """Exchange the values of a parameter and a same-shape buffer in place (one transient copy)."""
    held = p.detach().clone()
    p.copy_(other)
    other.copy_(held)


def _rng_state(devices: set[torch.device]) -> tuple[Tensor, dict[int, Tensor]]:
    cuda = {d.index or 0: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, dict[int, Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for index, value in cuda.items():
        torch.cuda.set_rng_state(value, index)

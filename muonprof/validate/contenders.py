"""The optimizers ``muonprof validate`` races: a profile, ProfiledMuon's defaults, torch.optim.Muon, AdamW.

- ``profile``: ``ProfiledMuon(model, profile)`` (adaptive when the profile has ladders).
- ``static``: the same profile with its ladders removed (``profile.without_ladders``: every layer on its own
  recipe): what an adaptive profile must beat to show that adapting pays. Runs by default when the profile
  has ladders; skipped with a reason when it has none (it would be ``profile`` again).
- ``default``: ``ProfiledMuon(model)``: torch.optim.Muon's algorithm on the hidden matrices, AdamW for the
  rest (lr 0.02, momentum 0.95, Nesterov, no weight decay; AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8).
- ``default-lr``: the default recipe (Jordan x5 bf16 everywhere) with the *profile's* tuned learning rates:
  the reference ``muonprof tune``'s race judged the profile against (``provenance.race.reference_profile``).
  A tuned profile carries stage 2's learning rates; against ``default`` it would win by its LR alone, so
  when this contender runs it is the reference (``results.choose_reference``). Skipped with a reason for a
  profile that records no race.
- ``torch``: ``torch.optim.Muon`` on the same hidden matrices with ``torch.optim.AdamW`` on the rest, set to
  the same numbers as ``default`` (torch's own defaults are lr 1e-3 and weight_decay 0.1; its docs' example
  uses lr 0.02, momentum 0.95; we pass lr 0.02, weight_decay 0, momentum 0.95, nesterov, adjust_lr_fn
  "original", ns_steps 5 and its default coefficients), so ``torch`` vs ``default`` differ only by
  implementation. torch's Muon takes 2-D parameters only: Muon-routed conv weights (4-D) go to its AdamW.
  Skipped with a reason when the installed torch has no ``torch.optim.Muon`` (< 2.9).
- ``adamw``: ``torch.optim.AdamW`` on every parameter, betas (0.9, 0.95), eps 1e-8, no weight decay, at an
  lr chosen by model size (``adamw_lr_for``): 3e-3 below 10M parameters, 1e-3 up to 100M, 6e-4 above (the
  usual GPT-2 / nanoGPT-scale settings, 6e-4 being GPT-2-small's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..optim import ProfiledMuon
from ..optim.routing import route_module

CONTENDERS = ("profile", "static", "default-lr", "default", "torch", "adamw")
DEFAULT_AGAINST = ("default", "torch", "adamw")

MUON_LR = 0.02
MUON_MOMENTUM = 0.95
MUON_ADAMW_LR = 3e-4
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


class ContenderError(ValueError):
    """An unknown contender name, or one that cannot be built as asked (one-line message)."""


class ContenderSkipped(RuntimeError):
    """This contender cannot run here (e.g. torch has no torch.optim.Muon); the message is the reason."""


def adamw_lr_for(num_parameters: int) -> float:
    """The all-AdamW baseline's lr: 3e-3 below 10M parameters, 1e-3 up to 100M, 6e-4 above."""
    if num_parameters < 10_000_000:
        return 3e-3
    if num_parameters <= 100_000_000:
        return 1e-3
    return 6e-4


def parse_contenders(
    against: str | list[str] | tuple[str, ...] | None, *, with_profile: bool, adaptive: bool = False
) -> list[str]:
    """The contenders to run, in order: ``profile`` first when a profile is given, then ``against`` (by
    default ``static`` for a profile with ladders (``adaptive``), ``default-lr`` with a profile, then default,
    torch, adamw).

    ``against`` is a comma-separated string or a list; duplicates are dropped. Raises ContenderError for an
    unknown name (listing the valid ones), for ``profile`` without a profile, or for nothing to run.
    """
    if against is None:
        names = (["static"] if with_profile and adaptive else []) + (["default-lr"] if with_profile else [])
        names += list(DEFAULT_AGAINST)
    elif isinstance(against, str):
        names = [n.strip() for n in against.split(",") if n.strip()]
    else:
        names = [n.strip() for n in against]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ContenderError(
            f"unknown contender{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(CONTENDERS)}"
        )
    for needs in ("profile", "static", "default-lr"):
        if needs in names and not with_profile:
            raise ContenderError(f"contender {needs!r} needs --profile FILE")
    ordered = (["profile"] if with_profile else []) + [n for n in names if n != "profile"]
    out = list(dict.fromkeys(ordered))
    if len(out) < 1:
        raise ContenderError(f"nothing to run: give --profile FILE and/or --against (valid: {', '.join(CONTENDERS)})")
    return out


class OptimizerGroup:
    """Several optimizers over disjoint parameters stepped as one (``torch``: Muon + AdamW).

    Offers what a training loop uses: ``step()``, ``zero_grad()``, ``param_groups`` and ``state`` (merged,
    read-only view), ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        self.optimizers = dict(optimizers)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers.values())


@dataclass
class BuiltContender:
    """An optimizer ready to train, with the settings that describe it in the results."""

    name: str
    optimizer: Any
    config: dict[str, Any] = field(default_factory=dict)


def build_contender(
    name: str,
    model: nn.Module,
    *,
    profile: str | os.PathLike[str] | Any | None = None,
    lr: float | None = None,
    adamw_lr: float | None = None,
    baseline_lr: float | None = None,
    seed: int = 0,
) -> BuiltContender:
    """Build contender ``name``'s optimizer over ``model``'s trainable parameters.

    ``lr``: the Muon lr of profile/default/torch (default 0.02). ``adamw_lr``: their AdamW group's lr
    (default 3e-4). ``baseline_lr``: the all-AdamW contender's lr (default ``adamw_lr_for(#params)``).
    Raises ContenderError (unknown name, no profile), ContenderSkipped (torch without Muon) and, for
    ``profile``, muonprof.profile.ProfileError when the profile does not fit the model.
    """
    muon_lr = MUON_LR if lr is None else float(lr)
    group_lr = MUON_ADAMW_LR if adamw_lr is None else float(adamw_lr)
    muon_common = {
        "lr": muon_lr,
        "momentum": MUON_MOMENTUM,
        "nesterov": True,
        "weight_decay": 0.0,
        "adamw_lr": group_lr,
        "adamw_betas": list(ADAMW_BETAS),
        "adamw_eps": ADAMW_EPS,
        "adamw_weight_decay": 0.0,
    }
    if name in ("profile", "static", "default-lr"):
        if profile is None:
            raise ContenderError(f"contender {name!r} needs --profile FILE")
        if name == "static":
            chosen = static_profile(profile)
        else:
            chosen = profile if name == "profile" else reference_profile(profile)
        opt = ProfiledMuon(
            model,
            chosen,
            lr=muon_lr,
            momentum=MUON_MOMENTUM,
            adamw_lr=group_lr,
            adamw_betas=ADAMW_BETAS,
            adamw_eps=ADAMW_EPS,
            seed=seed,
        )
        source = str(profile) if isinstance(profile, (str, os.PathLike)) else "(in memory)"
        source = {"profile": source, "static": f"{source}, ladders removed"}.get(name, "race reference")
        return BuiltContender(name, opt, {"optimizer": "ProfiledMuon", "profile": source, **muon_common})
    if name == "default":
        opt = ProfiledMuon(
            model, lr=muon_lr, momentum=MUON_MOMENTUM, adamw_lr=group_lr, adamw_betas=ADAMW_BETAS, adamw_eps=ADAMW_EPS
        )
        return BuiltContender(name, opt, {"optimizer": "ProfiledMuon", "profile": None, **muon_common})
    if name == "torch":
        return _build_torch(model, muon_lr, group_lr, muon_common)
    if name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        chosen = adamw_lr_for(count) if baseline_lr is None else float(baseline_lr)
        opt = torch.optim.AdamW(params, lr=chosen, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
        rule = "given" if baseline_lr is not None else "by size: 3e-3 < 10M params, 1e-3 <= 100M, 6e-4 above"
        config = {
            "optimizer": "torch.optim.AdamW",
            "lr": chosen,
            "lr_rule": rule,
            "betas": list(ADAMW_BETAS),
            "eps": ADAMW_EPS,
            "weight_decay": 0.0,
        }
        return BuiltContender(name, opt, config)
    raise ContenderError(f"unknown contender {name!r}; valid: {', '.join(CONTENDERS)}")


def reference_profile(profile: Any) -> dict[str, Any]:
    """The race's reference recorded in a tuned profile (the default recipe with its learning rates), or
    ContenderSkipped naming why there is none."""
    from ..profile import Profile, load_profile

    if profile is None:
        raise ContenderError("contender 'default-lr' needs --profile FILE")
    loaded = profile if isinstance(profile, Profile) else load_profile(profile)
    race = (loaded.provenance.model_dump() if loaded.provenance else {}).get("race") or {}
    reference = race.get("reference_profile")
    if not isinstance(reference, dict):
        raise ContenderSkipped("the profile records no race reference (it was not made by muonprof tune's race)")
    return reference


def static_profile(profile: Any) -> Any:
    """The profile without its ladders (``static``), or ContenderSkipped when it has none to remove."""
    from ..profile import Profile, has_ladders, load_profile, without_ladders

    loaded = profile if isinstance(profile, Profile) else load_profile(profile)
    if not has_ladders(loaded):
        raise ContenderSkipped("the profile has no ladders: 'static' would be the 'profile' contender again")
    return without_ladders(loaded)


def torch_muon_available() -> bool:
    return hasattr(torch.optim, "Muon")


def _build_torch(model: nn.Module, muon_lr: float, group_lr: float, common: dict[str, Any]) -> BuiltContender:
    if not torch_muon_available():
        raise ContenderSkipped(f"torch {torch.__version__} has no torch.optim.Muon (needs torch >= 2.9)")
    routes = route_module(model)
    muon, other, not_2d = [], [], []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if routes[pname][0] == "muon" and p.ndim == 2:
            muon.append(p)
        else:
            other.append(p)
            if routes[pname][0] == "muon":
                not_2d.append(pname)
    if not muon:
        raise ContenderSkipped("the model has no 2-D hidden matrices for torch.optim.Muon")
    optimizers: dict[str, torch.optim.Optimizer] = {
        "muon": torch.optim.Muon(
            muon,
            lr=muon_lr,
            weight_decay=0.0,
            momentum=MUON_MOMENTUM,
            nesterov=True,
            adjust_lr_fn="original",
        )
    }
    if other:
        optimizers["adamw"] = torch.optim.AdamW(other, lr=group_lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    config = {"optimizer": "torch.optim.Muon + torch.optim.AdamW", "adjust_lr_fn": "original", **common}
    if not_2d:
        config["muon_routed_to_adamw"] = not_2d  # torch's Muon takes 2-D parameters only
    return BuiltContender("torch", OptimizerGroup(optimizers), config)


__all__ = [
    "CONTENDERS",
    "DEFAULT_AGAINST",
    "BuiltContender",
    "ContenderError",
    "ContenderSkipped",
    "OptimizerGroup",
    "adamw_lr_for",
    "build_contender",
    "parse_contenders",
    "static_profile",
    "torch_muon_available",
]

"""Other Muon implementations as contenders for ``bench_step``: optimuon, HeavyBall and Keller Jordan's Muon.

Why: "as fast as torch.optim.Muon" says little if other libraries are much faster on the same shapes. Each
peer is configured from a reading of its own source (the pinned versions below), given only the hidden
matrices (every one of them is a >= 2-D hidden weight here), with the benchmark's shared lr / momentum /
Nesterov / weight decay, and its other settings left at what the library does by default unless the row
says otherwise:

- ``optimuon`` 0.1.1 (``optimuon.Muon``): its default is Gram Newton-Schulz (iterate on the short side's
  Gram matrix, restart after step 2) in **float16**, the 5-row Polar Express table with the input divided
  by 1.02 x its Frobenius norm, same-shape batching, NorMuon (a per-row second-moment rescale of the
  orthogonalized update) and cautious weight decay. Its fastest configuration is the bf16 Gram path with
  the extras off (``gram_ns=True, ns_dtype=torch.bfloat16, normuon=False, cautious_wd=False``): the same
  orthogonalizer in bf16 and nothing else on top, i.e. the least work the library can do per step.
- ``heavyball`` 3.2.1 (``heavyball.Muon``): Nesterov EMA, then per-matrix Newton-Schulz, 5 steps of You
  Jiacheng's table in bf16 (stochastic rounding of the normalized input), scaled by sqrt(max(1, m/n)).
  By default it compiles its step functions with ``torch.compile(mode="max-autotune-no-cudagraphs")``;
  on a CPU that takes minutes (one compile per shape), so ``--quick`` runs it eager unless told otherwise
  (``--heavyball-compile``). Its ``betas[0]`` is the momentum. It consumes ``.grad`` (sets it to None),
  so the benchmark re-sets the gradients before each of its steps, outside the timing.
- ``muon-optimizer`` 0.1.0 (module ``muon``): ``SingleDeviceMuon`` (the non-distributed variant, so no
  process group is needed): per-matrix Jordan quintic x5 in bf16, exactly torch.optim.Muon's recipe. It
  overwrites ``.grad`` with the Nesterov blend; the gradients are re-set before each of its steps too.

Install (``--no-deps``, so that pip never replaces the installed torch)::

    pip install --no-deps optimuon==0.1.1 heavyball==3.2.1 opt-einsum==3.4.0 muon-optimizer==0.1.0

(HeavyBall also imports numpy >= 2.3.4, already a dependency of the dev environment.) A peer that is not
installed is skipped with a line that says this.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from muonprof.ortho.config import OrthoConfig
from muonprof.ortho.newton_schulz import newton_schulz_flops

PIP_INSTALL = "pip install --no-deps optimuon==0.1.1 heavyball==3.2.1 opt-einsum==3.4.0 muon-optimizer==0.1.0"
PINS: dict[str, str] = {
    "optimuon": "optimuon==0.1.1",
    "heavyball": "heavyball==3.2.1 opt-einsum==3.4.0",
    "muon": "muon-optimizer==0.1.0",
}
OPTIMUON_RESTART_AFTER = 2  # optimuon 0.1.1's GNS_RESTART_AFTER_DEFAULT


@dataclass(frozen=True)
class Peer:
    """One peer configuration: how to build it on a list of matrices and what it computes."""

    key: str
    label: str
    module: str  # the import name; missing -> the row is skipped
    dtype: str  # what its orthogonalizer computes in
    ortho: str  # a short description of the orthogonalizer, for the table
    make: Callable[[list[Tensor], dict[str, Any]], torch.optim.Optimizer]
    matrix_flops: Callable[[int, int], float]  # counted matmul flops of one m x n matrix per step
    resets_grads: bool = False  # the step consumes or overwrites .grad: re-set it before each step
    # Its update as a pure spectral polynomial, for the predicted descent share; None where it is not one
    # (NorMuon rescales rows after the polynomial).
    spectral: OrthoConfig | None = None
    version_pin: str = ""
    note: str = ""


def missing(peer: Peer) -> str | None:
    """None when ``peer`` can be imported, else a one-line reason with the install command."""
    try:
        importlib.import_module(peer.module)
    except Exception as err:  # ImportError, or a broken install raising anything at import time
        why = f"{type(err).__name__}: {err}".splitlines()[0]
        return f"{peer.label}: skipped, cannot import {peer.module!r} ({why}); install: {PIP_INSTALL}"
    return None


def installed_version(module: str) -> str | None:
    """The installed distribution version of a peer (None when absent)."""
    dist = {"optimuon": "optimuon", "heavyball": "heavyball", "muon": "muon-optimizer"}.get(module, module)
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# --------------------------------------------------------------------------- flop counts


def optimuon_gram_flops(m: int, n: int, steps: int = 5, restart_after: int | None = OPTIMUON_RESTART_AFTER) -> float:
    """Matmul flops of optimuon 0.1.1's ``gram_newton_schulz`` on one m x n matrix (counted from its source).

    With s the short and l the long side: the Gram matrix R = X X^T (2 s^2 l); per step Z = bR + cR^2
    (2 s^3), the accumulated transform Q <- Q Z (2 s^3, skipped on the first step and after a restart,
    where Q is the identity), and R <- Z R Z (two s x s products, 4 s^3, computed on the last step too);
    a restart after step ``restart_after`` (unless it is the last) applies Q to X and rebuilds R
    (4 s^2 l); finally X <- Q X (2 s^2 l). Square matrices fall back to plain Newton-Schulz.
    """
    if m == n:
        return newton_schulz_flops(m, n, steps)
    s, long = min(m, n), max(m, n)
    flops = 2 * s * s * long  # R = X X^T
    identity = True
    for t in range(steps):
        flops += 2 * s**3 + (0 if identity else 2 * s**3) + 4 * s**3
        identity = False
        if restart_after is not None and t == restart_after and t < steps - 1:
            flops += 4 * s * s * long
            identity = True
    return float(flops + 2 * s * s * long)


def _ns5_flops(m: int, n: int) -> float:
    return newton_schulz_flops(m, n, 5)


# --------------------------------------------------------------------------- constructors


def _optimuon(**overrides: Any) -> Callable[[list[Tensor], dict[str, Any]], torch.optim.Optimizer]:
    def make(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
        import optimuon

        return optimuon.Muon(
            params,
            lr=hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
            weight_decay=hp["weight_decay"],
            **overrides,
        )

    return make


@contextlib.contextmanager
def heavyball_eager() -> Iterator[None]:
    """Run HeavyBall without ``torch.compile`` (its wrappers read the module-level ``compile_mode`` per call)."""
    import heavyball.utils as hb_utils

    saved = hb_utils.compile_mode
    hb_utils.compile_mode = None
    try:
        yield
    finally:
        hb_utils.compile_mode = saved


def _eager_step(step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with heavyball_eager():
        return step(*args, **kwargs)


def _heavyball(compiled: bool) -> Callable[[list[Tensor], dict[str, Any]], torch.optim.Optimizer]:
    def make(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
        import heavyball

        opt = heavyball.Muon(
            params,
            lr=hp["lr"],
            betas=(hp["momentum"], 0.99),  # beta2 unused by Muon
            weight_decay=hp["weight_decay"],
            nesterov=hp["nesterov"],
        )
        if not compiled:
            opt.step = functools.partial(_eager_step, opt.step)  # type: ignore[method-assign]
        return opt

    return make


def _keller_jordan(params: list[Tensor], hp: dict[str, Any]) -> torch.optim.Optimizer:
    from muon import SingleDeviceMuon

    if not hp["nesterov"]:
        raise ValueError("muon-optimizer's SingleDeviceMuon is always Nesterov")
    return SingleDeviceMuon(params, lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=hp["momentum"])


def peers(heavyball_compiled: bool) -> list[Peer]:
    """Every peer row, in table order."""
    pe5 = OrthoConfig(coefficients="polar_express_nanogpt", ns_steps=5)
    hb_mode = "torch.compile max-autotune" if heavyball_compiled else "eager (compile off)"
    return [
        Peer(
            "optimuon_default",
            "optimuon default (gram fp16)",
            "optimuon",
            "float16",
            "gram-ns5-polar_express_nanogpt-fp16 + NorMuon",
            _optimuon(),
            optimuon_gram_flops,
            version_pin=PINS["optimuon"],
            note="library defaults: Gram NS in fp16, Polar Express x5, NorMuon, cautious wd, batched",
        ),
        Peer(
            "optimuon_fast",
            "optimuon fastest (gram bf16)",
            "optimuon",
            "bfloat16",
            "gram-ns5-polar_express_nanogpt-bf16",
            _optimuon(gram_ns=True, ns_dtype=torch.bfloat16, normuon=False, cautious_wd=False),
            optimuon_gram_flops,
            spectral=pe5,
            version_pin=PINS["optimuon"],
            note="gram_ns=True, ns_dtype=bf16, normuon=False, cautious_wd=False (batched, foreach)",
        ),
        Peer(
            "heavyball",
            "HeavyBall Muon",
            "heavyball",
            "bfloat16",
            "ns5-you-bf16",
            _heavyball(heavyball_compiled),
            _ns5_flops,
            resets_grads=True,
            spectral=OrthoConfig(coefficients="you", ns_steps=5),
            version_pin=PINS["heavyball"],
            note=f"heavyball.Muon defaults, {hb_mode}",
        ),
        Peer(
            "kj_muon",
            "muon-optimizer (KJ)",
            "muon",
            "bfloat16",
            "ns5-jordan-bf16",
            _keller_jordan,
            _ns5_flops,
            resets_grads=True,
            spectral=OrthoConfig(),
            version_pin=PINS["muon"],
            note="Keller Jordan's reference, non-distributed variant",
        ),
    ]

"""Time the whole optimizer step on an embedding-heavy LM: ProfiledMuon vs torch.optim.Muon + fused AdamW.

Why this exists: on a small LM most parameters are not hidden matrices. muonprof's llama-20m has an untied
32000 x 256 embedding and a 256 -> 32000 head (16.4M of its ~19.6M parameters), which go to AdamW; its
28 hidden matrices (4 layers x q/k/v/o 256x256 + gate/up 256->688 + down 688->256) go to Muon. So the whole
``step()`` is dominated by AdamW over those two tables, and a Muon-only benchmark (``bench_step``) says
nothing about it. Compared here, side by side in one process with the same weights, gradients and
hyper-parameters, routed the same way (the torch contenders take ProfiledMuon's own ``describe()`` split):

- ``pm_step``: ``ProfiledMuon(model)`` (default profile), ``step()``: Muon group + AdamW group.
- ``torch_split``: ``torch.optim.Muon`` on the hidden matrices + ``torch.optim.AdamW(fused=True)`` on the rest.
- ``torch_muon``: ``torch.optim.Muon`` alone on the hidden matrices (how much of ``torch_split`` is Muon).
- ``pm_adamw``: ProfiledMuon's AdamW group alone: the same optimizer with the hidden matrices' gradients
  set to None (a parameter without a gradient is skipped), so only its AdamW code runs.
- ``pm_adamw_nocheck``: the same with ``skip_nonfinite=False``: the price of the per-layer non-finite check.
- ``torch_adamw_fused``: ``torch.optim.AdamW(fused=True)`` alone on the same tensors.
- ``torch_adamw_foreach``: ``torch.optim.AdamW(foreach=True)`` alone (the multi-tensor kernel, for scale).

Targets (the issue): the whole step no slower than torch Muon + fused AdamW; ProfiledMuon's AdamW group
within 1.2x of the fused kernel. Once, outside the timing, the first step of each pair is compared
(ProfiledMuon's AdamW parameters vs torch AdamW's, and the Muon parameters): max |difference|.

Timing: ``bench_step.run_interleaved`` (rounds in shuffled order, medians and IQR, load average before and
after, CPU model and flags in the output). Gradients are fixed random tensors set once (no forward or
backward pass), dense, as ``nn.Embedding``'s default gradient is.

Run from the repository root (excluded from the default pytest run)::

    python -m tests.benchmarks.bench_lm_step --quick                 # smoke test, < 60 s
    python -m tests.benchmarks.bench_lm_step --json bench-out/lm.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import muonprof  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from muonprof import ProfiledMuon
from muonprof.models import llama

try:
    from tests.benchmarks import bench_step as bs
except ImportError:  # run as a script: this folder is sys.path[0]
    import bench_step as bs  # type: ignore[no-redef]

MODELS = tuple(name for name in llama.CONFIGS)
DEFAULT_MODEL = "llama-20m"
MUON: dict[str, Any] = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
ADAMW: dict[str, Any] = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
WHOLE_TARGET = 1.0  # ProfiledMuon step / (torch Muon + fused AdamW)
ADAMW_TARGET = 1.2  # ProfiledMuon's AdamW group / fused AdamW
ADAMW_BYTES_PER_ELEMENT = 7 * 4  # reads p, g, m, v and writes p, m, v, all fp32: the traffic a fused kernel needs


# --------------------------------------------------------------------------- the model


@dataclass
class LMFixture:
    """A llama model's weights and fixed gradients, and the Muon/AdamW split ProfiledMuon routes."""

    name: str
    model: nn.Module  # the template; each contender steps its own deep copy
    grads: dict[str, Tensor]
    muon_names: list[str]
    adamw_names: list[str]
    reasons: dict[str, str]

    @classmethod
    def make(cls, name: str, device: torch.device, seed: int) -> LMFixture:
        if name not in llama.CONFIGS:
            raise SystemExit(f"--model: unknown model {name!r} (known: {', '.join(MODELS)})")
        torch.manual_seed(seed)
        model = llama.build(llama.CONFIGS[name][0]).to(device)
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        grads = {n: torch.randn(p.shape, generator=gen).to(device) for n, p in model.named_parameters()}
        rows = ProfiledMuon(model, None, **MUON).describe()  # the routing every contender uses
        muon = [r["name"] for r in rows if r["optimizer"] == "muon"]
        adamw = [r["name"] for r in rows if r["optimizer"] == "adamw"]
        return cls(name, model, grads, muon, adamw, {r["name"]: r["reason"] for r in rows})

    def copy(self, with_grads: set[str] | None = None) -> nn.Module:
        """A fresh copy of the model with the fixed gradients set (only on ``with_grads`` if given)."""
        model = copy.deepcopy(self.model)
        for n, p in model.named_parameters():
            p.grad = self.grads[n].clone() if with_grads is None or n in with_grads else None
        return model

    def numel(self, names: list[str]) -> int:
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n in names)

    def summary(self) -> dict[str, Any]:
        params = dict(self.model.named_parameters())
        groups: dict[str, list[str]] = {}
        for n in self.adamw_names:
            groups.setdefault(self.reasons[n], []).append(n)
        return {
            "model": self.name,
            "muon_matrices": len(self.muon_names),
            "muon_params": self.numel(self.muon_names),
            "muon_shapes": sorted({tuple(params[n].shape) for n in self.muon_names}),
            "adamw_tensors": len(self.adamw_names),
            "adamw_params": self.numel(self.adamw_names),
            "adamw_by_reason": {
                reason: {
                    "tensors": len(ns),
                    "params": self.numel(ns),
                    "shapes": sorted({tuple(params[n].shape) for n in ns}),
                }
                for reason, ns in groups.items()
            },
        }


# --------------------------------------------------------------------------- contenders


@dataclass
class LMContender:
    key: str
    label: str
    kind: str  # "whole" (Muon + AdamW) | "muon" | "adamw": which reference its ratio is against
    model: nn.Module
    step: Callable[[], Any]
    optimizers: list[torch.optim.Optimizer]


def pm_adamw_kwargs() -> dict[str, Any]:
    return dict(
        adamw_lr=ADAMW["lr"],
        adamw_betas=ADAMW["betas"],
        adamw_eps=ADAMW["eps"],
        adamw_weight_decay=ADAMW["weight_decay"],
    )


def build_contenders(fx: LMFixture, has_torch_muon: bool) -> list[LMContender]:
    """Each contender on its own copy of the weights and gradients (see the module docstring for the list)."""

    def params(model: nn.Module, names: list[str]) -> list[Tensor]:
        named = dict(model.named_parameters())
        return [named[n] for n in names]

    out = []
    model = fx.copy()
    pm = ProfiledMuon(model, None, **MUON, **pm_adamw_kwargs())
    out.append(LMContender("pm_step", "ProfiledMuon step()", "whole", model, pm.step, [pm]))
    if has_torch_muon:
        model = fx.copy()
        muon = torch.optim.Muon(params(model, fx.muon_names), **MUON)  # type: ignore[attr-defined]
        adamw = torch.optim.AdamW(params(model, fx.adamw_names), fused=True, **ADAMW)

        def split_step(muon: torch.optim.Optimizer = muon, adamw: torch.optim.Optimizer = adamw) -> None:
            muon.step()
            adamw.step()

        out.append(LMContender("torch_split", "torch Muon + AdamW(fused)", "whole", model, split_step, [muon, adamw]))
        model = fx.copy(set(fx.muon_names))
        muon = torch.optim.Muon(params(model, fx.muon_names), **MUON)  # type: ignore[attr-defined]
        out.append(LMContender("torch_muon", "torch.optim.Muon alone", "muon", model, muon.step, [muon]))
    model = fx.copy(set(fx.adamw_names))
    pm = ProfiledMuon(model, None, **MUON, **pm_adamw_kwargs())
    out.append(LMContender("pm_adamw", "ProfiledMuon AdamW group", "adamw", model, pm.step, [pm]))
    # The same without the per-layer non-finite check: what that check (one read of every gradient) costs.
    model = fx.copy(set(fx.adamw_names))
    pm = ProfiledMuon(model, None, skip_nonfinite=False, **MUON, **pm_adamw_kwargs())
    out.append(LMContender("pm_adamw_nocheck", "ProfiledMuon AdamW, no NaN check", "adamw", model, pm.step, [pm]))
    for key, label, kw in (
        ("torch_adamw_fused", "torch AdamW(fused=True)", {"fused": True}),
        ("torch_adamw_foreach", "torch AdamW(foreach=True)", {"foreach": True}),
    ):
        model = fx.copy(set(fx.adamw_names))
        adamw = torch.optim.AdamW(params(model, fx.adamw_names), **kw, **ADAMW)
        out.append(LMContender(key, label, "adamw", model, adamw.step, [adamw]))
    return out


REFERENCE = {"whole": "torch_split", "muon": "torch_muon", "adamw": "torch_adamw_fused"}
# (contender, reference, which parameters): compared after the first step from identical weights.
AGREEMENT = (
    ("pm_step", "torch_split", "adamw"),
    ("pm_step", "torch_split", "muon"),
    ("pm_adamw", "torch_adamw_fused", "adamw"),
    ("pm_adamw_nocheck", "torch_adamw_fused", "adamw"),
    ("torch_adamw_foreach", "torch_adamw_fused", "adamw"),
)


@dataclass
class LMRow:
    key: str
    label: str
    kind: str
    times_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    median_s: float = math.nan
    min_s: float = math.nan
    max_s: float = math.nan
    iqr_s: float = math.nan
    vs_reference: float | None = None  # ratio of the medians
    paired_vs_reference: float | None = None  # median of the per-round ratios (bench_step.paired_ratio)
    paired_q: tuple[float, float] | None = None
    reference: str | None = None
    adamw_gb_per_s: float | None = None  # AdamW rows: ADAMW_BYTES_PER_ELEMENT x elements / median


@torch.no_grad()
def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor], names: list[str]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in names) if names else 0.0


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    repeats = args.repeats or (5 if args.quick else (50 if on_gpu else 30))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (5 if on_gpu else 2))
    progress = bs.Progress(not args.silent)
    info = bs.device_info(device)
    has_torch_muon = hasattr(torch.optim, "Muon")

    fx = LMFixture.make(args.model, device, args.seed)
    contenders = build_contenders(fx, has_torch_muon)
    by_key = {c.key: c for c in contenders}
    names = {"muon": fx.muon_names, "adamw": fx.adamw_names}
    after_first: dict[str, dict[str, Tensor]] = {}
    needed = {k for triple in AGREEMENT for k in triple[:2]}

    def capture(entry: bs.Timed) -> None:
        if entry.key in needed:
            after_first[entry.key] = {n: p.detach().clone() for n, p in by_key[entry.key].model.named_parameters()}

    entries = [bs.Timed(c.key, c.label, c.step) for c in contenders]
    timing = bs.run_interleaved(
        entries,
        device,
        warmup=warmup,
        repeats=repeats,
        max_mean_s=args.max_row_s,
        seed=args.seed,
        progress=progress,
        after_first=capture,
    )
    agreement = []
    for key, ref, which in AGREEMENT:
        if key in after_first and ref in after_first:
            diff = max_abs_diff(after_first[key], after_first[ref], names[which])
            moved = max_abs_diff(after_first[ref], dict(fx.model.named_parameters()), names[which])
            agreement.append(
                {"contender": key, "reference": ref, "params": which, "max_abs_diff": diff, "max_abs_update": moved}
            )
    after_first.clear()

    rows = []
    for c, e in zip(contenders, entries):
        row = LMRow(c.key, c.label, c.kind, e.times_s, e.warmup_s)
        for k, v in bs.summarize(e.times_s).items():
            setattr(row, k, v)
        if c.kind == "adamw":
            row.adamw_gb_per_s = ADAMW_BYTES_PER_ELEMENT * fx.numel(fx.adamw_names) / row.median_s / 1e9
        rows.append(row)
    medians = {r.key: r.median_s for r in rows}
    by_key = {r.key: r for r in rows}
    for r in rows:
        ref = REFERENCE[r.kind]
        if ref in medians:
            r.reference, r.vs_reference = ref, r.median_s / medians[ref]
            r.paired_vs_reference, r.paired_q = bs.paired_ratio(r.times_s, by_key[ref].times_s)

    def ratio(key: str, ref: str) -> float:
        """The paired per-round ratio where the rounds pair up, else the ratio of the medians."""
        paired = by_key[key].paired_vs_reference if by_key[key].reference == ref else None
        return paired if paired is not None else medians[key] / medians[ref]

    targets = []
    if "torch_split" in medians:
        v = ratio("pm_step", "torch_split")
        targets.append(
            {
                "target": f"whole step: ProfiledMuon / (torch Muon + fused AdamW) <= {WHOLE_TARGET}",
                "value": v,
                "met": v <= WHOLE_TARGET,
            }
        )
    v = ratio("pm_adamw", "torch_adamw_fused")
    targets.append(
        {
            "target": f"AdamW group: ProfiledMuon / torch AdamW(fused) <= {ADAMW_TARGET}",
            "value": v,
            "met": v <= ADAMW_TARGET,
        }
    )
    return {
        "info": info,
        "config": {
            "model": args.model,
            "repeats": repeats,
            "warmup": warmup,
            "max_row_s": args.max_row_s,
            "muon": MUON,
            "adamw": {**ADAMW, "betas": list(ADAMW["betas"])},
            "quick": args.quick,
            "has_torch_muon": has_torch_muon,
            "seed": args.seed,
        },
        "params": fx.summary(),
        "timing": timing,
        "rows": [asdict(r) for r in rows],
        "agreement": agreement,
        "targets": targets,
    }


# --------------------------------------------------------------------------- output


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    info, cfg, ps, t = result["info"], result["config"], result["params"], result["timing"]
    cpu = info["cpu"]
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.get("flags", {}).items())
    console.print(
        f"[bold]torch[/bold] {info['torch']}  muonprof {info['muonprof']} (git {info['git']['commit'] or '?'}"
        f"{' + uncommitted muonprof changes' if info['git']['muonprof_changes'] else ''})  device {info['device']}"
    )
    if "gpu" in info:
        console.print(f"[bold]GPU[/bold] {info['gpu']['name']} (CUDA {info['gpu']['cuda']})")
    console.print(f"[bold]CPU[/bold] {cpu['model']}  threads {info['threads']}  flags: {flags}")
    console.print(
        f"model {ps['model']}: Muon {ps['muon_matrices']} hidden matrices ({ps['muon_params'] / 1e6:.2f}M params, "
        f"shapes {', '.join('x'.join(map(str, s)) for s in ps['muon_shapes'])}); AdamW {ps['adamw_tensors']} tensors "
        f"({ps['adamw_params'] / 1e6:.2f}M params: "
        + "; ".join(
            f"{reason} {g['tensors']} ({', '.join('x'.join(map(str, s)) for s in g['shapes'])})"
            for reason, g in ps["adamw_by_reason"].items()
        )
        + ")"
    )
    console.print(
        f"Muon {cfg['muon']}  AdamW {cfg['adamw']}; {t['rounds']} interleaved rounds (shuffled, seed "
        f"{t['order_seed']}) after {cfg['warmup']} warm-up; load average before {t['load_before']}, "
        f"after {t['load_after']}"
    )
    table = Table(title="whole optimizer step (medians)")
    columns = (
        *("contender", "steps", "n", "median ms", "IQR ms", "min-max ms"),
        *("t / reference", "paired (IQR)", "AdamW GB/s"),
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("contender", "steps") else "right")
    what = {"whole": "Muon + AdamW", "muon": "Muon only", "adamw": "AdamW only"}
    for r in result["rows"]:
        table.add_row(
            r["label"],
            what[r["kind"]],
            str(len(r["times_s"])),
            f"{r['median_s'] * 1e3:,.2f}",
            "-" if not math.isfinite(r["iqr_s"]) else f"{r['iqr_s'] * 1e3:,.2f}",
            f"{r['min_s'] * 1e3:,.1f}-{r['max_s'] * 1e3:,.1f}",
            "-" if r["vs_reference"] is None else f"{r['vs_reference']:.2f} ({r['reference']})",
            bs.fmt_paired(r["paired_vs_reference"], r["paired_q"]),
            "-" if r["adamw_gb_per_s"] is None else f"{r['adamw_gb_per_s']:,.1f}",
        )
    console.print(table)
    console.print(
        f"AdamW GB/s: {ADAMW_BYTES_PER_ELEMENT} bytes per AdamW element (fp32 p, g, m, v read; p, m, v written) "
        "over the median: the memory traffic a fused kernel needs, so a comparison with the machine's bandwidth."
    )
    for a in result["agreement"]:
        console.print(
            f"after one step, {a['contender']} vs {a['reference']} on the {a['params']} parameters: "
            f"max |diff| {a['max_abs_diff']:.3g} (the step itself moved them by up to {a['max_abs_update']:.3g})"
        )
    if cfg["quick"]:
        console.print("[yellow]--quick: few rounds; the ratios are indicative only[/yellow]")
    for tg in result["targets"]:
        mark = "[green]met[/green]" if tg["met"] else "[red]NOT met[/red]"
        console.print(f"target {tg['target']}: {tg['value']:.2f} -> {mark}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument(
        "--model", choices=MODELS, default=DEFAULT_MODEL, help=f"muonprof's llama configs (default {DEFAULT_MODEL})"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30 on CPU, 50 on GPU; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 CPU, 5 GPU; --quick 1)")
    p.add_argument(
        "--max-row-s", type=float, default=20.0, help="stop once each contender spent this long on average (0: never)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="5 rounds after 1 warm-up: a smoke test, < 60 s")
    p.add_argument("--json", type=Path, default=None, help="write every number (and the machine's details) here")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    bs.run_and_report(parse_args(argv), run, render)


if __name__ == "__main__":
    main()

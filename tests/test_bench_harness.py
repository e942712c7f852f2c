"""The benchmark harness (tests/benchmarks) is not collected by pytest; its counting and timing logic is.

Why: a speed ratio is only as good as the harness that produced it. The peer flop count is checked
against torch's own FLOP counter on optimuon's code, the interleaving against a recorded call order, and
both benchmarks run end to end on tiny models (parity with torch.optim.Muon exact, AdamW agreement).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.benchmarks` from the repository root

from muonprof.ortho.newton_schulz import newton_schulz_flops
from tests.benchmarks import bench_lm_step, bench_step, peers

HAS_TORCH_MUON = hasattr(torch.optim, "Muon")


def test_optimuon_gram_flops_hand_count() -> None:
    # 5 steps, restart after step index 2: s^3 terms 6 + 8 + 8 + 6 + 8 = 36; s^2 l: 2 (R) + 4 (restart) + 2 (final)
    s, long = 64, 256
    assert peers.optimuon_gram_flops(s, long) == 36 * s**3 + 8 * s * s * long
    assert peers.optimuon_gram_flops(long, s) == peers.optimuon_gram_flops(s, long)  # tall: same work
    assert peers.optimuon_gram_flops(s, s) == newton_schulz_flops(s, s, 5)  # square: plain NS
    # no restart: 6 + 8 * 4 = 38 s^3 and 4 s^2 l
    assert peers.optimuon_gram_flops(s, long, restart_after=None) == 38 * s**3 + 4 * s * s * long


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)])
@pytest.mark.parametrize("steps", [3, 5])
def test_optimuon_gram_flops_match_torch_flop_counter(shape: tuple[int, int], steps: int) -> None:
    optimuon = pytest.importorskip("optimuon")
    from torch.utils.flop_counter import FlopCounterMode

    G = torch.randn(*shape)
    with FlopCounterMode(display=False) as counter:
        optimuon.gram_newton_schulz(G, ns_steps=steps, ns_dtype=torch.float32)
    assert counter.get_total_flops() == peers.optimuon_gram_flops(*shape, steps)


def test_ns5_flops_match_torch_flop_counter_on_muon() -> None:
    """torch.optim.Muon's (and so Keller Jordan's / HeavyBall's) per-matrix count is newton_schulz_flops(m, n, 5)."""
    if not HAS_TORCH_MUON:
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    from torch.utils.flop_counter import FlopCounterMode

    p = torch.nn.Parameter(torch.randn(96, 40))
    p.grad = torch.randn_like(p)
    opt = torch.optim.Muon([p], lr=0.02)
    with FlopCounterMode(display=False) as counter:
        opt.step()
    assert counter.get_total_flops() == newton_schulz_flops(96, 40, 5)


def test_run_interleaved_order_hooks_and_counts() -> None:
    calls: list[str] = []
    firsts: list[str] = []
    entries = []
    for key in "abcd":
        entries.append(
            bench_step.Timed(
                key,
                key,
                step=lambda key=key: calls.append(key),
                before=lambda key=key: calls.append(f"before-{key}"),
            )
        )
    out = bench_step.run_interleaved(
        entries,
        torch.device("cpu"),
        warmup=2,
        repeats=6,
        max_mean_s=0,
        seed=3,
        progress=bench_step.Progress(False),
        after_first=lambda e: firsts.append(e.key),
    )
    assert firsts == list("abcd")  # the first warm-up round keeps the given order, reference first
    steps = [c for c in calls if not c.startswith("before-")]
    assert all(calls[i] == f"before-{calls[i + 1]}" for i in range(0, len(calls), 2))  # a hook before each step
    assert steps[:4] == list("abcd")
    rounds = [steps[i : i + 4] for i in range(0, len(steps), 4)]
    assert len(rounds) == 2 + 6 and all(sorted(r) == list("abcd") for r in rounds)  # each once per round
    assert len({tuple(r) for r in rounds[2:]}) > 1  # the timed rounds are shuffled
    assert out["rounds"] == 6 and all(len(e.times_s) == 6 and len(e.warmup_s) == 2 for e in entries)


def test_run_interleaved_time_cap_keeps_three_rounds() -> None:
    entries = [bench_step.Timed(k, k, step=lambda: sum(range(1000))) for k in "ab"]
    out = bench_step.run_interleaved(
        entries,
        torch.device("cpu"),
        warmup=1,
        repeats=50,
        max_mean_s=1e-9,
        seed=0,
        progress=bench_step.Progress(False),
    )
    assert out["rounds"] == 3


def test_summarize() -> None:
    t = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    s = bench_step.summarize(t)
    q = statistics.quantiles(sorted(t), n=4)
    assert s == {"median_s": 3.5, "min_s": 1.0, "max_s": 10.0, "iqr_s": q[2] - q[0]}
    assert math.isnan(bench_step.summarize([1.0, 2.0])["iqr_s"])


def test_update_distance() -> None:
    w0 = {"a": torch.zeros(2, 2)}
    ref = {"a": torch.ones(2, 2)}
    assert bench_step.update_distance(w0, {"a": torch.ones(2, 2)}, ref) == 0.0
    assert bench_step.update_distance(w0, {"a": torch.full((2, 2), 1.5)}, ref) == pytest.approx(0.5)


def _row(key: str, median: float, share: float | None) -> bench_step.Row:
    row = bench_step.Row(key, key, "bfloat16", 768, "x", median_s=median)
    row.descent_share = share
    return row


def test_gram_target_picks_fewest_steps_at_the_default_share() -> None:
    rows = {
        "torch_muon": _row("torch_muon", 1.0, 0.80),
        "pm_default": _row("pm_default", 1.0, 0.80),
        "pm_gram_pe5": _row("pm_gram_pe5", 0.7, 0.90),
        "pm_gram_pe4": _row("pm_gram_pe4", 0.55, 0.81),
        "pm_gram_pe3": _row("pm_gram_pe3", 0.4, 0.60),
    }
    t = bench_step.gram_target(rows)
    assert t is not None and t["row"] == "pm_gram_pe4" and t["value"] == pytest.approx(0.55) and t["met"]
    rows["pm_gram_pe4"].median_s = 0.65
    assert not bench_step.gram_target(rows)["met"]  # type: ignore[index]
    for k in ("pm_gram_pe4", "pm_gram_pe5"):
        del rows[k]
    none_reach = bench_step.gram_target(rows)
    assert none_reach is not None and not none_reach["met"] and math.isnan(none_reach["value"])
    assert bench_step.gram_target({"pm_default": rows["pm_default"]}) is None


def test_missing_peer_gives_an_install_line() -> None:
    fake = peers.Peer(
        "x", "Fake peer", "no_such_module_for_muonprof", "bfloat16", "-", lambda p, hp: None, lambda m, n: 0.0
    )  # type: ignore[arg-type,return-value]
    line = peers.missing(fake)
    assert line is not None and "pip install --no-deps" in line and "Fake peer" in line


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon needs torch >= 2.9")
def test_bench_step_end_to_end_tiny() -> None:
    args = bench_step.parse_args(
        [
            *("--device", "cpu", "--width", "128", "--blocks", "1", "--repeats", "1", "--warmup", "1", "--silent"),
            *("--only", "torch_muon", "pm_default", "pm_ns3_bf16", "kj_muon", "--quick"),
        ]
    )
    result = bench_step.run(args)
    keys = {r["key"] for r in result["rows"]}
    assert {"torch_muon", "pm_default", "pm_ns3_bf16"} <= keys
    assert result["parity"]["exact"]
    by_key = {r["key"]: r for r in result["rows"]}
    assert by_key["pm_default"]["update_vs_torch"] == 0.0
    assert by_key["pm_ns3_bf16"]["update_vs_torch"] > 0.05  # a different recipe: a visibly different update
    assert by_key["torch_muon"]["descent_share"] == pytest.approx(by_key["pm_default"]["descent_share"])
    assert set(result["timing"]["bf16"]) >= {"load_before", "load_after", "rounds"}
    if "kj_muon" in keys:  # installed: the same recipe as torch, up to bf16 rounding of another op order
        assert by_key["kj_muon"]["update_vs_torch"] < 0.1
    else:
        assert any("muon-optimizer" in line for line in result["skipped"])


def test_bench_lm_step_end_to_end_tiny() -> None:
    args = bench_lm_step.parse_args(
        ["--device", "cpu", "--model", "llama-tiny", "--quick", "--repeats", "2", "--silent"]
    )
    result = bench_lm_step.run(args)
    params = result["params"]
    assert params["muon_matrices"] == 2 * 7  # q k v o gate up down per layer
    assert set(params["adamw_by_reason"]) == {
        "embedding",
        "vector (gain/bias)",
        "output head (projects to the vocabulary)",
    }
    rows = {r["key"]: r for r in result["rows"]}
    assert {"pm_step", "pm_adamw", "torch_adamw_fused", "torch_adamw_foreach"} <= set(rows)
    assert rows["torch_adamw_fused"]["vs_reference"] == 1.0
    agree = {(a["contender"], a["params"]): a for a in result["agreement"]}
    assert agree[("pm_adamw", "adamw")]["max_abs_update"] > 0
    assert agree[("pm_adamw", "adamw")]["max_abs_diff"] < 1e-6
    if HAS_TORCH_MUON:
        assert agree[("pm_step", "muon")]["max_abs_diff"] == 0.0  # the default path is torch.optim.Muon's
        assert agree[("pm_step", "adamw")]["max_abs_diff"] < 1e-6
    assert len(result["targets"]) == (2 if HAS_TORCH_MUON else 1)


def test_drop_slow_fp16_rows() -> None:
    def row(key: str, dtype: str) -> bench_step.Contender:
        return bench_step.Contender(key, key, dtype, "bf16", lambda m: None, matrix_flops=lambda m, n: 1e9)  # type: ignore[arg-type,return-value]

    rows = [row("a", "float16"), row("b", "bfloat16")]
    # 8 matrices x 1 GFLOP at 1 GFLOP/s = 8 s per step
    kept, skipped = bench_step.drop_slow_fp16(rows, 128, 2, 1e9, budget_s=5)
    assert [c.key for c in kept] == ["b"] and len(skipped) == 1 and "~8 s" in skipped[0]
    kept, skipped = bench_step.drop_slow_fp16(rows, 128, 2, 1e9, budget_s=10)
    assert [c.key for c in kept] == ["a", "b"] and not skipped


@pytest.mark.parametrize("key", ["optimuon_default", "optimuon_fast", "heavyball", "kj_muon"])
def test_peer_grad_flag_matches_what_its_step_does(key: str) -> None:
    """A peer not flagged ``resets_grads`` must leave ``.grad`` as it was, else later steps would see other
    gradients than the rest; and a flagged one must really need it (else the flag costs a copy for nothing)."""
    peer = next(p for p in peers.peers(heavyball_compiled=False) if p.key == key)
    if peers.missing(peer) is not None:
        pytest.skip(f"{peer.module} not installed")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 64) * 0.02), torch.nn.Parameter(torch.randn(64, 64) * 0.02)]
    grads = [torch.randn_like(p) for p in params]
    start = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    hp = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
    opt = peer.make(params, hp)
    for _ in range(2):
        opt.step()
    unchanged = all(p.grad is not None and torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert unchanged != peer.resets_grads
    assert not any(torch.equal(p.detach(), w0) for p, w0 in zip(params, start))  # it did step

"""Bench timing on a shared machine (issue 16): interleaved seeded rounds, a low-quantile figure that load spikes
cannot move, a re-measure of high-spread candidates, certainty per figure, the load record, and old bench files.

Everything runs on fake clocks or fake timers (deterministic); one test times real ops on the CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_bench import FakeClock, tiny_spectra

from muonprof.bench import BenchError, CostRecord, build_candidates, load_bench, parse_grid, run_bench, save_bench
from muonprof.bench.cost import (
    Timing,
    grade,
    interleaved_samples,
    measure_costs,
    summarize,
    time_interleaved,
)
from muonprof.device.load import LoadProbe, cpu_times, interval_shares
from muonprof.device.probe import Timer

CPU = torch.device("cpu")
NEW_KEYS = ("time_estimate_s", "estimator", "time_q1_s", "time_q3_s", "spread", "rounds", "remeasured", "certainty")


def scripted(clock: FakeClock, durations: dict[str, Callable[[int], float]], calls: list[str]) -> dict[str, object]:
    """Fake ops: op ``key``'s i-th call (0 = warm-up) advances ``clock`` by ``durations[key](i)``; every call
    is appended to ``calls``."""
    count = dict.fromkeys(durations, 0)

    def make(key: str) -> Callable[[], None]:
        def op() -> None:
            clock.now += durations[key](count[key])
            count[key] += 1
            calls.append(key)

        return op

    return {key: make(key) for key in durations}


def steady(seconds: float) -> Callable[[int], float]:
    return lambda _i: seconds


# ------------------------------------------------------------------------------------------- interleaving


def test_each_round_visits_every_candidate_once_in_a_seeded_shuffled_order() -> None:
    def order(seed: int) -> list[str]:
        clock, calls = FakeClock(), []
        ops = scripted(clock, {k: steady(0.01) for k in "ABCD"}, calls)
        interleaved_samples(ops, Timer(clock=clock), min_repeats=6, max_repeats=6, target_s=0.0, seed=seed)
        return calls

    calls = order(0)
    assert calls[:4] == list("ABCD")  # the warm-up, in the given order
    rounds = [calls[4 + 4 * i : 8 + 4 * i] for i in range(6)]
    assert len(calls) == 4 + 6 * 4
    assert all(sorted(r) == list("ABCD") for r in rounds)  # every round: each candidate exactly once
    assert len({"".join(r) for r in rounds}) > 1  # shuffled, not one fixed order (A B C D A B C D ...)
    assert order(0) == calls  # seeded: the same order again
    assert order(1) != calls


def test_only_fast_candidates_go_on_and_a_pathological_one_gets_one_sample() -> None:
    clock, calls = FakeClock(), []
    ops = scripted(clock, {"fast": steady(0.001), "mid": steady(0.05), "slow": steady(6.0)}, calls)
    got = interleaved_samples(ops, Timer(clock=clock), min_repeats=3, max_repeats=15, target_s=0.15, slow_s=5.0)
    assert [len(got.times[k]) for k in ("fast", "mid", "slow")] == [15, 3, 1]
    first = calls[3:6]
    assert sorted(first) == ["fast", "mid", "slow"]  # round 1 has all three
    assert sorted(calls[6:8]) == ["fast", "mid"]  # then the slow one is done


def test_a_spike_on_the_warm_up_alone_does_not_cut_the_rounds_and_load_does_not_either() -> None:
    clock, calls = FakeClock(), []
    # "spiky": 8 s warm-up (a load spike), then 0.01 s; "loaded": every sample 10x its 0.001 s first one.
    ops = scripted(clock, {"spiky": lambda i: 8.0 if i == 0 else 0.01, "loaded": lambda i: 0.001 if i < 2 else 0.01},
                   calls)  # fmt: skip
    got = interleaved_samples(ops, Timer(clock=clock), min_repeats=3, max_repeats=15, target_s=0.15, slow_s=5.0)
    assert len(got.times["spiky"]) == 15  # 15 x 0.01 s = its budget: not treated as pathological
    assert len(got.times["loaded"]) == 15  # budget counted at its fastest sample (0.001 s), not the loaded ones


def test_out_of_memory_mid_rounds_drops_only_that_candidate() -> None:
    clock = FakeClock()
    n = {"calls": 0}

    def flaky() -> None:
        n["calls"] += 1
        clock.now += 0.01
        if n["calls"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fine() -> None:
        clock.now += 0.01

    timings, failed = time_interleaved({"a": flaky, "b": fine}, Timer(clock=clock), min_repeats=4, max_repeats=4)
    assert set(timings) == {"b"} and timings["b"].rounds == 4
    assert failed["a"].startswith("out of memory: OutOfMemoryError")


def test_any_timer_works_as_cuda_event_timers_do() -> None:
    """The harness only calls ``timer.measure`` (CudaEventTimer overrides it to read CUDA events): a timer
    that returns scripted device times without any clock gives exactly those figures."""

    class EventTimer(Timer):
        def __init__(self) -> None:
            super().__init__()
            self.times = iter([9.0, 9.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0])

        def measure(self, op: Callable[[], object], inner: int = 1) -> float:
            op()
            return next(self.times)

    timings, _ = time_interleaved({"x": lambda: None, "y": lambda: None}, EventTimer(), min_repeats=5, max_repeats=5)
    assert {timings["x"].warmup_s, timings["y"].warmup_s} == {9.0}
    assert sorted([timings["x"].median_s, timings["y"].median_s]) == [1.0, 2.0]  # no cross-talk between keys


# ------------------------------------------------------------------------------------------- the figure


def test_the_figure_ignores_load_spikes_that_move_the_median() -> None:
    """Half of A's rounds hit by a load spike (+10x): the median doubles, the figure (q1) stays at A's cost,
    and A still ranks below B, whose rounds were clean."""
    clock, calls = FakeClock(), []
    spikes = {1, 3, 4, 7}  # calls 1..8 are the rounds (0 is the warm-up)
    ops = scripted(clock, {"A": lambda i: 0.10 if i not in spikes else 1.0, "B": steady(0.15)}, calls)
    timings, _ = time_interleaved(
        ops, Timer(clock=clock), min_repeats=8, max_repeats=8, target_s=0.0, remeasure_spread=float("inf")
    )
    a, b = timings["A"], timings["B"]
    assert a.median_s == pytest.approx(0.55)  # what the old statistic reported: A looks 3.7x slower than B
    assert a.figure_s == pytest.approx(0.10) and b.figure_s == pytest.approx(0.15)
    assert a.figure_s < b.figure_s and a.estimator == "q1" and a.rounds == 8


def test_estimators_and_summaries() -> None:
    t = summarize([4.0, 1.0, 3.0, 2.0, 5.0], 9.0, estimator="min", rounds=5)
    assert t.estimate_s == 1.0 and t.figure_s == 1.0 and t.median_s == 3.0 and t.warmup_s == 9.0
    assert t.q1_s == 2.0 and t.q3_s == 4.0 and t.spread == pytest.approx(2 / 3)
    assert summarize([4.0, 1.0, 3.0, 2.0, 5.0], 0.0, estimator="median").figure_s == 3.0
    with pytest.raises(ValueError, match="unknown timing estimator 'mean'"):
        summarize([1.0], 0.0, estimator="mean")
    with pytest.raises(ValueError, match="unknown timing estimator"):
        time_interleaved({}, Timer(), estimator="mean")


def test_certainty_grades() -> None:
    assert grade(5, 0.05) == "high" and grade(15, 0.10) == "high"
    assert grade(4, 0.05) == "medium" and grade(5, 0.2) == "medium"
    assert grade(2, 0.0) == "low" and grade(15, 0.3) == "low"
    legacy = Timing(1.0, 1.0, 1.0, 1.0, 1.0, 3, 1.0)  # an old file's timing: no quartiles
    assert legacy.spread is None and legacy.certainty is None and legacy.figure_s == 1.0


# ------------------------------------------------------------------------------------------- re-measure


def test_a_high_spread_candidate_is_re_measured_and_graded() -> None:
    clock, calls = FakeClock(), []
    ops = scripted(
        clock,
        {"steady": steady(0.1), "noisy": lambda i: 0.1 if i % 2 else 0.3, "also": lambda i: 0.1 if i % 2 else 0.5},
        calls,
    )
    timings, _ = time_interleaved(ops, Timer(clock=clock), min_repeats=6, max_repeats=6, target_s=0.0)
    assert not timings["steady"].remeasured and timings["steady"].rounds == 6
    assert timings["noisy"].remeasured and timings["noisy"].rounds == 12  # as many rounds again
    assert timings["also"].remeasured and timings["also"].rounds == 12
    extra = calls[3 + 6 * 3 :]
    assert len(extra) == 12 and "steady" not in extra
    assert all(sorted(extra[i : i + 2]) == ["also", "noisy"] for i in range(0, 12, 2))  # still interleaved
    assert timings["steady"].certainty == "high" and timings["noisy"].certainty == "low"
    assert timings["noisy"].figure_s == pytest.approx(0.1)


def test_a_quiet_spread_is_not_re_measured() -> None:
    clock, calls = FakeClock(), []
    ops = scripted(clock, {"a": lambda i: 0.1 + 0.001 * (i % 3)}, calls)
    timings, _ = time_interleaved(ops, Timer(clock=clock), min_repeats=5, max_repeats=5, target_s=0.0)
    assert not timings["a"].remeasured and timings["a"].rounds == 5 and len(calls) == 6


# ------------------------------------------------------------------------------------------- artifact


def test_measure_costs_interleaves_a_shapes_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    from muonprof.bench import cost as cost_module

    calls: list[str] = []
    clock = FakeClock()
    real = cost_module.orthogonalize

    def fake(G: torch.Tensor, config: object, generator: torch.Generator | None = None) -> torch.Tensor:
        calls.append(f"{G.shape[0]}:{config.ns_steps}")
        clock.now += 0.001 * config.ns_steps
        return G

    monkeypatch.setattr(cost_module, "orthogonalize", fake)
    grid = parse_grid(methods="newton_schulz", steps="2,5", schedules="jordan,polar_express", dtypes="fp32")
    records = measure_costs(
        {(8, 6): 2, (10, 6): 1}, build_candidates(grid), CPU, timer=Timer(clock=clock), min_repeats=4, max_repeats=4
    )
    monkeypatch.setattr(cost_module, "orthogonalize", real)
    # per shape: warm-up of the 3 timed costs (bf16 ns5 baseline, fp32 ns2, fp32 ns5), then 4 shuffled rounds
    assert len(calls) == 2 * (3 + 4 * 3)
    assert {c.split(":")[0] for c in calls[:15]} == {"8"} and {c.split(":")[0] for c in calls[15:]} == {"10"}
    by = {(r.shape, r.label): r for r in records}
    ns2 = by[((8, 6), "ns2-jordan-fp32")]
    assert ns2.timing.rounds == 4 and ns2.timing.figure_s == pytest.approx(0.002)
    assert ns2.per_layer_s == ns2.timing.figure_s
    shared = by[((8, 6), "ns2-polar_express-fp32")]
    assert shared.shared_from == "ns2-jordan-fp32" and shared.timing is ns2.timing


def test_the_artifact_round_trips_the_certainty_and_records_the_load(tmp_path: Path) -> None:
    grid = parse_grid(methods="newton_schulz", steps="2", schedules="jordan", dtypes="fp32")
    result = run_bench(
        tiny_spectra(), device=CPU, grid=grid, seeds=1, probe=False, timing={"max_repeats": 3, "target_s": 0.0}
    )
    row = result.costs[0].to_json()
    assert set(NEW_KEYS) <= set(row)
    assert row["rounds"] == (6 if row["remeasured"] else 3)  # real timings: a noisy one is re-measured
    assert row["certainty"] in ("high", "medium", "low") and row["estimator"] == "q1"
    assert row["time_q1_s"] == row["time_estimate_s"] <= row["time_q3_s"]
    assert set(row["time_s"]) == {"median_s", "min_s", "max_s", "p10_s", "p90_s", "repeats", "warmup_s"}
    load = result.meta["load"]
    assert {"loadavg_before", "loadavg_after", "usable_cpus", "cpu_count", "torch_threads", "steal_fraction",
            "busy_fraction", "interval_s"} <= set(load)  # fmt: skip
    assert load["usable_cpus"] >= 1 and load["torch_threads"] == torch.get_num_threads()
    assert result.meta["timing"]["estimator"] == "q1" and result.meta["timing"]["max_repeats"] == 3

    path = save_bench(result, tmp_path / "x.bench.json")
    back = load_bench(path)
    assert back.to_json() == json.loads(result.dumps())
    for a, b in zip(back.costs, result.costs):
        assert a.timing == b.timing and a.per_layer_s == b.per_layer_s

    # A file from before: no certainty keys beside time_s. It loads; its figure is the median, as it was.
    old = json.loads(path.read_text())
    for c in old["costs"]:
        for key in NEW_KEYS:
            c.pop(key, None)
    del old["meta"]["load"], old["meta"]["timing"]
    (tmp_path / "old.bench.json").write_text(json.dumps(old))
    legacy = load_bench(tmp_path / "old.bench.json")
    for c in legacy.costs:
        if c.timing is not None:
            assert c.timing.rounds is None and c.timing.remeasured is False and c.timing.certainty is None
            assert c.per_layer_s == c.timing.median_s / c.batch
            assert c.to_json()["certainty"] is None and c.to_json()["spread"] is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("time_q1_s", -1.0, r"costs\[0\]\.time_q1_s: Input should be greater than or equal to 0"),
        ("time_estimate_s", "fast", r"costs\[0\]\.time_estimate_s: Input should be a valid number"),
        ("rounds", 2.5, r"costs\[0\]\.rounds: Input should be a valid integer"),
        ("remeasured", "yes", r"costs\[0\]\.remeasured: Input should be a valid boolean"),
        ("estimator", "mean", r"costs\[0\]\.estimator: Input should be 'min', 'p10', 'q1' or 'median'"),
    ],
)
def test_a_bad_certainty_field_is_a_one_line_bench_error(tmp_path: Path, key: str, value: object, message: str) -> None:
    time_s = {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "p10_s": 1.0, "p90_s": 1.0, "repeats": 3, "warmup_s": 1.0}
    cost = {"shape": [4, 3], "label": "svd", "config": {"method": "svd"}, "count": 1, "batch": 1, "time_s": time_s,
            key: value}  # fmt: skip
    data = {"format": "muonprof.bench/1", "meta": {}, "layers": [], "costs": [cost], "accuracy": {}}
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(BenchError, match=message) as info:
        load_bench(tmp_path / "b.json")
    assert "\n" not in str(info.value)
    assert CostRecord.from_json({**cost, key: None} if key != "remeasured" else {**cost, key: False}).timing is not None


# ------------------------------------------------------------------------------------------- load record


STAT = "cpu  {} 0 {} {} {} 0 0 {} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n"


def test_load_shares_from_proc_stat() -> None:
    before = cpu_times(STAT.format(100, 50, 800, 50, 0))
    after = cpu_times(STAT.format(400, 150, 1300, 50, 100))  # +300 user +100 system +500 idle +100 steal
    assert before == [100, 0, 50, 800, 50, 0, 0, 0]
    shares = interval_shares(before, after)
    assert shares == {"busy_fraction": pytest.approx(0.5), "steal_fraction": pytest.approx(0.1)}
    assert interval_shares(None, after) == {"busy_fraction": None, "steal_fraction": None}
    assert cpu_times("intr 1\n") is None and cpu_times("cpu a b c\n") is None


def test_load_probe_record_is_plain_json() -> None:
    record = LoadProbe().record()
    json.dumps(record)
    assert record["torch_threads"] == torch.get_num_threads() and record["interval_s"] >= 0


def test_the_report_grades_each_role_by_its_least_sure_shape_and_flags_a_busy_machine() -> None:
    from muonprof.bench import BenchResult
    from muonprof.commands.bench import _certainty_by_role, _timing_line

    def row(shape: tuple[int, int], timing: Timing) -> CostRecord:
        from muonprof.bench import BASELINE

        return CostRecord(shape, "ns5-jordan-bf16", BASELINE, 1, 1, timing=timing)

    sure = summarize([1.0] * 6, 1.0, estimator="q1", rounds=6)
    shaky = summarize([1.0, 3.0] * 4, 1.0, estimator="q1", rounds=8, remeasured=True)
    layers = [{"name": "a", "matrix_shape": [4, 3], "role": "up"}, {"name": "b", "matrix_shape": [5, 3], "role": "up"},
              {"name": "c", "matrix_shape": [4, 3], "role": "out"}]  # fmt: skip
    load = {"loadavg_before": [5.0, 1, 1], "loadavg_after": [6.0, 1, 1], "usable_cpus": 2, "torch_threads": 2}
    result = BenchResult(meta={"load": load}, layers=layers, costs=[row((4, 3), sure), row((5, 3), shaky)], accuracy={})
    assert _certainty_by_role(result) == {"up": {"ns5-jordan-bf16": "low, re"}, "out": {"ns5-jordan-bf16": "high"}}
    line, loaded = _timing_line(result)
    assert loaded and line.startswith("timing certainty (rounds, IQR/median): 1 high, 0 medium, 1 low; 1 re-measured")
    assert "load 5 -> 6 on 2 CPUs, 2 torch threads: the machine was busy" in line
    result.meta["load"] = {**load, "loadavg_before": [0.5, 1, 1], "loadavg_after": [1.0, 1, 1]}
    assert _timing_line(result)[1] is False
    old = BenchResult(meta={}, layers=layers, costs=[row((4, 3), Timing(1.0, 1.0, 1.0, 1.0, 1.0, 3, 1.0))], accuracy={})
    assert _timing_line(old) == (None, False) and _certainty_by_role(old) == {"up": {}, "out": {}}

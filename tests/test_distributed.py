"""ProfiledMuon under torch.distributed: 2 gloo processes on CPU (loopback, file rendezvous)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dist_workers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muonprof import ProfiledMuon
from muonprof.optim.distributed import DistributedSetupError, assign_owners, layer_costs

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def spawn(fn: Any, tmp_path: Path, *args: Any, world: int = 2) -> None:
    rendezvous = tmp_path / "rendezvous"
    mp.spawn(fn, args=(world, str(rendezvous), str(tmp_path), *args), nprocs=world, join=True)


def load(tmp_path: Path, rank: int) -> dict[str, Any]:
    return torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize(
    "kwargs", [{}, {"batch": True}, {"own_group": True}], ids=["per-matrix", "batched", "process_group="]
)
def test_ddp_split_matches_single_process_bit_for_bit(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    spawn(dist_workers.ddp_equivalence, tmp_path, 4, kwargs)
    ranks = [load(tmp_path, r) for r in range(2)]
    for found in ranks:
        assert found["losses"] == found["ref_losses"]
        for name, value in found["params"].items():
            assert torch.equal(value, found["reference"][name]), name
    # Both ranks hold the same parameters and the same (replicated) optimizer state.
    for name in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
    owners = ranks[0]["owners"]
    assert owners == ranks[1]["owners"]
    assert set(owners.values()) == {0, 1}, "both ranks must own layers"
    assert ranks[0]["cost_source"] == "flops"
    s0, s1 = ranks[0]["state"]["state"], ranks[1]["state"]["state"]
    for key in s0:
        for k, v in s0[key].items():
            assert torch.equal(v, s1[key][k]) if isinstance(v, torch.Tensor) else v == s1[key][k], (key, k)


def test_two_gloo_ranks_take_identical_ladder_decisions(tmp_path: Path) -> None:
    spawn(dist_workers.ladder_equivalence, tmp_path, 8)
    ranks = [load(tmp_path, r) for r in range(2)]
    assert set(ranks[0]["owners"][n] for n in dist_workers.LADDER_LAYERS) == {0, 1}, "both ranks must measure"
    status = ranks[0]["status"]
    assert status == ranks[1]["status"] == ranks[0]["ref_status"]
    assert status["0.weight"]["rung"] == 1 and status["4.weight"]["rung"] == 0  # it climbed, it descended
    assert status["2.weight"]["rung"] > 0
    for found in ranks:
        for name, value in found["params"].items():
            assert torch.equal(value, found["reference"][name]), name
    # Only rank 0 writes the trace, and it holds the single process's moves.
    assert (tmp_path / "ddp.jsonl").read_text() == (tmp_path / "ref0.jsonl").read_text() != ""


def test_fsdp2_rows_gathered_on_the_owner_match_single_process_bit_for_bit(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    spawn(dist_workers.fsdp_equivalence, tmp_path, 4)
    ranks = [load(tmp_path, r) for r in range(2)]
    for found in ranks:
        assert found["losses"] == found["ref_losses"]
        for name, value in found["params"].items():
            assert torch.equal(value, found["reference"][name]), name
    assert ranks[0]["owners"] == ranks[1]["owners"] and set(ranks[0]["owners"].values()) == {0, 1}


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("fsdp_low_rank_momentum", "momentum_rank (low-rank momentum) with FSDP2 is not supported yet"),
        ("column_sharded", "only FSDP2 row sharding (Shard(0)) is supported"),
        ("partly_sharded", "apply fully_shard to the root module too"),
        ("disagreeing_profiles", "ranks disagree on the profile"),
        ("disagreeing_lr", "ranks disagree on the profile or the optimizer settings"),
        ("storm_without_closure", "needs two gradients per step"),
        ("ddp_error_feedback", "error_feedback / subset keep a momentum only the owner rank could update"),
        ("fsdp_subset", "error_feedback / subset keep a momentum only the owner rank could update"),
    ],
)
def test_bad_distributed_setups_fail_on_every_rank(tmp_path: Path, scenario: str, expected: str) -> None:
    spawn(dist_workers.expect_error, tmp_path, scenario)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert expected in message, message


def test_owners_balance_cost_not_count() -> None:
    # One expensive layer and six cheap ones: by count each rank would get 3-4 layers; by cost the
    # expensive one stands alone.
    owners = assign_owners([60.0, 10, 10, 10, 10, 10, 10], 2)
    assert owners[0] != owners[1] and len(set(owners[1:])) == 1
    loads = [sum(c for c, o in zip([60.0, 10, 10, 10, 10, 10, 10], owners) if o == r) for r in (0, 1)]
    assert loads == [60.0, 60.0]
    assert assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_layer_costs_come_from_the_profile_only_when_every_layer_was_measured() -> None:
    model = dist_workers.build_model()
    names = [n for n, p in model.named_parameters() if p.ndim == 2][:-1]
    measured = {n: {"measured": {"time_ms": float(i + 1)}} for i, n in enumerate(names)}
    opt = ProfiledMuon(model, dist_workers.profile(measured), distributed=False)
    plans = [opt.plans[n] for n in names]
    costs, source = layer_costs(plans, opt.profile)
    assert source == "profile" and costs == [float(i + 1) for i in range(len(names))]
    del measured[names[0]]
    opt = ProfiledMuon(model, dist_workers.profile(measured), distributed=False)
    costs, source = layer_costs([opt.plans[n] for n in names], opt.profile)
    assert source == "flops" and all(c > 0 for c in costs)


def test_distributed_true_without_a_process_group_is_a_clear_error() -> None:
    with pytest.raises(DistributedSetupError, match="init_process_group first"):
        ProfiledMuon(dist_workers.build_model(), distributed=True)
    assert ProfiledMuon(dist_workers.build_model()).owners == {}

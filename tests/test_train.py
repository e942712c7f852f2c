"""The shared training loop: what it records, when it evaluates and stops, and how it reports divergence."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from muonprof import ProfiledMuon
from muonprof.train import TrainResult, evaluate, optimizer_state_bytes, train
from muonprof.workload import Workload, build_workload

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> Workload:
    return build_workload("mlp", batch_size=4, seed=0)


class FakeClock:
    """Advances by ``rate`` seconds on every read: train() reads it 3 times a step, so a step takes 2*rate."""

    def __init__(self, rate: float = 1.0) -> None:
        self.now = 0.0
        self.rate = rate

    def __call__(self) -> float:
        self.now += self.rate
        return self.now


def test_records_losses_times_evals_and_state() -> None:
    w = mlp()
    opt = ProfiledMuon(w.model)
    steps_seen: list[int] = []
    evals_seen: list[int] = []
    r = train(
        w,
        opt,
        steps=7,
        eval_every=3,
        on_step=lambda s, _: steps_seen.append(s),
        on_eval=lambda s, _: evals_seen.append(s),
    )
    assert r.steps_done == 7 and len(r.train_losses) == 7 and len(r.wall_s) == 7 and r.stop_reason == "steps"
    assert steps_seen == list(range(1, 8))
    assert [e.step for e in r.evals] == evals_seen == [0, 3, 6, 7]  # step 0, every 3, and the end
    assert all(math.isfinite(v) for v in r.train_losses)
    assert all(o <= s for o, s in zip(r.optimizer_step_s, r.step_s))
    assert all(b > a for a, b in zip(r.wall_s, r.wall_s[1:]))
    assert r.wall_s[-1] == pytest.approx(sum(r.step_s))
    assert r.evals[0].wall_s == 0.0 and r.evals[-1].wall_s == r.wall_s[-1]  # eval time is not training time
    assert 0 < r.median_optimizer_step_s <= r.median_step_s
    assert r.state_bytes > 0 and r.state_bytes == optimizer_state_bytes(opt)
    assert r.peak_memory_bytes and r.peak_memory_bytes > 10 * 2**20 and r.peak_memory_kind.startswith("process_peak")
    assert r.final_val_loss == r.evals[-1].val_loss < r.evals[0].val_loss
    assert r.final_train_loss() == r.train_losses[-1]  # 10% of 7 steps rounds to 1 step
    assert r.final_train_loss(0.5) == pytest.approx(sum(r.train_losses[-4:]) / 4)
    assert w.model.training


def test_state_bytes_counts_adam_moments() -> None:
    w = mlp()
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-3)
    r = train(w, opt, steps=1, eval_every=1)
    params = list(w.model.parameters())
    moments = 2 * sum(p.nbytes for p in params)
    steps = sum(opt.state[p]["step"].nbytes for p in params)
    assert r.state_bytes == moments + steps


def test_evaluate_is_no_grad_eval_mode_and_restores() -> None:
    w = mlp()
    seen: list[tuple[bool, bool]] = []
    inner = w.loss_fn

    def loss_fn(model: torch.nn.Module, batch: object) -> torch.Tensor:
        seen.append((model.training, torch.is_grad_enabled()))
        return inner(model, batch)

    w = dataclasses.replace(w, loss_fn=loss_fn)
    w.model.train()
    value = evaluate(w)
    assert seen and all(state == (False, False) for state in seen) and w.model.training
    with torch.no_grad():
        expected = float(torch.stack([inner(w.model, b) for b in w.val_batches()]).mean())
    assert value == pytest.approx(expected, rel=1e-5)
    assert evaluate(dataclasses.replace(w, val_batches=list)) is None


def test_time_budget_with_fake_clock() -> None:
    w = mlp()
    clock = FakeClock(1.0)  # every step: 2 s in total, 1 s of it optimizer.step()
    r = train(w, ProfiledMuon(w.model), steps=50, eval_every=2, time_budget_s=5.0, clock=clock)
    assert r.steps_done == 3 and r.stop_reason == "time_budget"  # 2, 4, 6 >= 5: stops after the step that crosses
    assert r.step_s == [2.0, 2.0, 2.0] and r.optimizer_step_s == [1.0, 1.0, 1.0] and r.wall_s == [2.0, 4.0, 6.0]
    assert [(e.step, e.wall_s) for e in r.evals] == [(0, 0.0), (2, 4.0), (3, 6.0)]  # a final eval where it stopped
    assert r.median_step_s == 2.0 and r.median_optimizer_step_s == 1.0
    exact = train(mlp(), ProfiledMuon(mlp().model), steps=3, eval_every=5, time_budget_s=6.0, clock=FakeClock())
    assert exact.stop_reason == "steps" and exact.steps_done == 3  # budget reached at the last step: not a stop


def test_nonfinite_loss_marks_divergence_without_raising() -> None:
    w = mlp()
    opt = ProfiledMuon(w.model)
    first = next(w.model.parameters())

    def poison(step: int, loss: float) -> None:
        if step == 2:
            with torch.no_grad():
                first.fill_(float("nan"))

    r = train(w, opt, steps=10, eval_every=5, on_step=poison)
    assert r.diverged_at == 3 and r.stop_reason == "diverged"
    assert r.steps_done == 2 and len(r.train_losses) == 3 and math.isnan(r.train_losses[-1])
    assert r.final_val_loss is None and r.final_train_loss() is None
    assert [e.step for e in r.evals] == [0]  # no evaluation of a diverged model
    text = json.dumps(r.to_dict(), allow_nan=False)  # strict JSON: the NaN is stored as null
    back = TrainResult.from_dict(json.loads(text))
    assert back.diverged_at == 3 and math.isnan(back.train_losses[-1]) and back.steps_done == 2


def test_on_eval_exception_stops_the_run_and_propagates() -> None:
    class Pruned(Exception):
        pass

    steps: list[int] = []

    def prune(step: int, val_loss: float | None) -> None:
        if step >= 4:
            raise Pruned(step)

    w = mlp()
    with pytest.raises(Pruned):
        train(w, ProfiledMuon(w.model), steps=20, eval_every=2, on_eval=prune, on_step=lambda s, _: steps.append(s))
    assert steps == [1, 2, 3, 4]


def test_round_trip_and_bad_arguments() -> None:
    w = mlp()
    r = train(w, ProfiledMuon(w.model), steps=3, eval_every=2)
    back = TrainResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.to_dict() == r.to_dict()
    for kwargs in ({"steps": 0, "eval_every": 1}, {"steps": 2, "eval_every": 0}):
        with pytest.raises(ValueError):
            train(w, ProfiledMuon(w.model), **kwargs)
    with pytest.raises(ValueError, match="time budget"):
        train(w, ProfiledMuon(w.model), steps=2, eval_every=1, time_budget_s=0)


# ------------------------------------------------------------------------------------ closure optimizers


class ClosureSGD(torch.optim.SGD):
    """Needs a closure, as ProfiledMuon with a storm layer does: calls it ``calls(step)`` times per step and
    keeps what every call saw (loss, gradients)."""

    needs_closure = True

    def __init__(self, params, calls=lambda step: 2) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=0.1)
        self.calls = calls
        self.steps = 0
        self.seen: list[list[tuple[float, list[torch.Tensor]]]] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        assert closure is not None, "train() must pass a closure when needs_closure is true"
        self.steps += 1
        record = []
        loss = None
        for _ in range(self.calls(self.steps)):
            with torch.no_grad():  # as torch.optim.Optimizer.step runs: the closure must enable grad itself
                loss = closure()
            grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
            record.append((float(loss.detach()), grads))
        self.seen.append(record)
        super().step()
        return loss


def dropout_workload() -> Workload:
    w = mlp()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)
    )
    return dataclasses.replace(w, model=model)


def test_closure_optimizer_gets_a_closure_that_replays_the_same_batch_and_dropout() -> None:
    w = dropout_workload()
    batches: list[int] = []
    inner = w.train_batch
    w = dataclasses.replace(w, train_batch=lambda step: (batches.append(step), inner(step))[1])
    opt = ClosureSGD(w.model.parameters(), calls=lambda step: 1 if step == 1 else 2)  # storm's pattern
    r = train(w, opt, steps=4, eval_every=2)
    assert r.steps_done == 4 and batches == [0, 1, 2, 3]  # the batch is fetched once per step
    assert [len(calls) for calls in opt.seen] == [1, 2, 2, 2]
    assert r.grad_evals == [1, 3, 5, 7] and r.total_grad_evals == 7  # counted, not assumed
    for calls in opt.seen[1:]:
        (loss_a, grads_a), (loss_b, grads_b) = calls
        assert loss_a == loss_b  # same batch, same dropout mask (RNG restored for each call)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert r.train_losses == [calls[-1][0] for calls in opt.seen]  # what step(closure) returned
    # Dropout really is on: without the RNG restore two forward passes would differ.
    x, _ = w.train_batch(0)
    w.model.train()
    assert not torch.equal(w.model(x), w.model(x))
    assert all(o <= s for o, s in zip(r.optimizer_step_s, r.step_s))
    assert TrainResult.from_dict(json.loads(json.dumps(r.to_dict()))).grad_evals == [1, 3, 5, 7]


def test_closure_matches_the_plain_loop_and_plain_counts_one_eval_per_step() -> None:
    """A closure called once is the plain loop: same losses, same weights, one gradient evaluation a step."""
    w1, w2 = dropout_workload(), dropout_workload()
    torch.manual_seed(1)
    plain = train(w1, torch.optim.SGD(w1.model.parameters(), lr=0.1), steps=3, eval_every=3)
    torch.manual_seed(1)
    closed = train(w2, ClosureSGD(w2.model.parameters(), calls=lambda step: 1), steps=3, eval_every=3)
    assert plain.train_losses == closed.train_losses and plain.grad_evals == closed.grad_evals == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(w1.model.parameters(), w2.model.parameters()))
    old = plain.to_dict()
    del old["grad_evals"]  # a results file from before grad_evals: one evaluation per applied step
    assert TrainResult.from_dict(old).grad_evals == [1, 2, 3]


def test_nonfinite_loss_inside_the_closure_stops_before_the_update() -> None:
    w = mlp()
    opt = ClosureSGD(w.model.parameters())
    first = next(w.model.parameters())

    def poison(step: int, loss: float) -> None:
        if step == 2:
            with torch.no_grad():
                first.fill_(float("nan"))

    r = train(w, opt, steps=5, eval_every=5, on_step=poison)
    assert r.diverged_at == 3 and r.steps_done == 2 and math.isnan(r.train_losses[-1])
    assert opt.steps == 3 and len(opt.seen) == 2  # step 3 was abandoned inside its first closure call
    assert r.grad_evals == [2, 4]


def test_storm_profiled_muon_steps_through_train() -> None:
    w = mlp()
    opt = ProfiledMuon(w.model, {"format": "muonprof.profile/1", "defaults": {"momentum": "storm"}})
    if not getattr(opt, "needs_closure", False):
        pytest.skip("this ProfiledMuon has no storm momentum")
    r = train(w, opt, steps=3, eval_every=3)
    assert r.steps_done == 3 and r.diverged_at is None
    assert r.grad_evals == [1, 3, 5]  # no previous iterate at step 1, two gradients from step 2 on


def test_eval_at_adds_evaluations_where_a_run_is_judged() -> None:
    w = mlp()
    r = train(w, ProfiledMuon(w.model), steps=20, eval_every=8, eval_at=(10, 13))
    assert [p.step for p in r.evals] == [0, 8, 10, 13, 16, 20]

import dataclasses
import json
import math
import os
import re
import signal
import types

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.commands.launch import launch_command_parser
from accelerate.state import AcceleratorState
from torch import nn

from densecl_vit.training.engine import guards
from densecl_vit.training.engine.guards import (
    NonFiniteGuard,
    PreemptionHandler,
    TrainingDiverged,
    grad_norm_of,
)
from densecl_vit.training.engine.runlog import MetricsLogger, ThroughputMeter, progress_bar, write_json
from densecl_vit.training.engine.setup import TrainingArgs


def test_sigterm_sets_flag_and_handlers_are_restored():
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run inside the block")

    old_term = signal.signal(signal.SIGTERM, previous)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        with PreemptionHandler() as handler:
            assert not handler.should_stop and not handler.should_stop_at(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert handler.should_stop and handler.signal_received == signal.SIGTERM
            assert handler.should_stop_at(3)  # single process: the local flag is the agreed one
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is old_int
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_second_sigint_interrupts():
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.signal_received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_sync_every_must_be_positive():
    with pytest.raises(ValueError, match="sync_every"):
        PreemptionHandler(sync_every=0)


def _agree_on_stop(sync_every):
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    results = []
    with PreemptionHandler(acc, sync_every=sync_every) as handler:
        for step in range(1, 8):
            if acc.process_index == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is preempted
            results.append(handler.should_stop_at(step, force_sync=(step == 5)))
    # Synced at steps 3 and 6 (multiples of 3) and at the forced step 5; in between the last agreed value.
    assert results == [False, False, True, True, True, True, True], (acc.process_index, results)


@pytest.mark.timeout(180)
def test_two_processes_agree_on_stop():
    AcceleratorState._reset_state(reset_partial_state=True)
    debug_launcher(_agree_on_stop, args=(3,), num_processes=2)


def _forced_sync_only(_):
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    with PreemptionHandler(acc, sync_every=100) as handler:
        if acc.process_index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        assert handler.should_stop_at(1) is False  # not a sync step: the other rank has not agreed yet
        assert handler.should_stop_at(2, force_sync=True) is True


@pytest.mark.timeout(180)
def test_two_processes_agree_at_forced_sync():
    AcceleratorState._reset_state(reset_partial_state=True)
    debug_launcher(_forced_sync_only, args=(None,), num_processes=2)


def test_non_finite_guard_skips_and_resets():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0), grad_norm=torch.tensor(2.0)) is False
    assert guard.check(torch.tensor(float("nan")), grad_norm=torch.tensor(2.0)) is True
    assert guard.check(torch.tensor(1.0), grad_norm=torch.tensor(float("inf"))) is True
    assert guard.consecutive == 2 and guard.num_skipped == 2
    assert guard.check(torch.tensor(1.0)) is False
    assert guard.consecutive == 0 and guard.num_skipped == 2


def test_non_finite_guard_reads_model_gradients():
    model = nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    guard = NonFiniteGuard(max_consecutive=5)
    assert guard.check(torch.tensor(0.5), model) is False
    model.weight.grad[0, 1] = float("inf")
    assert guard.check(torch.tensor(0.5), model) is True
    assert math.isinf(grad_norm_of(model.parameters()).item())


def test_grad_norm_matches_clip_grad_norm():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    expected = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    torch.testing.assert_close(grad_norm_of(model.parameters()), expected)
    assert grad_norm_of(nn.Linear(2, 2).parameters()) is None


def test_finite_flag_is_a_tensor():
    flag = NonFiniteGuard.finite_flag(torch.tensor([1.0, 2.0]), 3.0)
    assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.item()
    assert not NonFiniteGuard.finite_flag(torch.tensor(float("-inf"))).item()


def test_non_finite_guard_raises_after_k_consecutive():
    guard = NonFiniteGuard(max_consecutive=2)
    assert guard.check(torch.tensor(float("nan")), step=10) is True
    with pytest.raises(TrainingDiverged) as err:
        guard.check(torch.tensor(float("nan")), grad_norm=torch.tensor(float("inf")), step=11)
    message = str(err.value)
    assert message.startswith(
        "training diverged at step 11: 2 consecutive non-finite steps (loss=nan, grad_norm=inf)"
    )
    for cause in ("learning rate too high", "--lr", "fp16 overflow", "bf16", "gradient clipping"):
        assert cause in message
    with pytest.raises(ValueError):
        NonFiniteGuard(max_consecutive=0)


def test_metrics_logger_writes_main_process_jsonl(tmp_path):
    class Rank:
        def __init__(self, main):
            self.is_main_process = main

    with MetricsLogger(tmp_path, Rank(True)) as log:
        record = log.log(1, loss=torch.tensor(0.5), lr=1e-4, grad_norm=float("nan"))
        log.log(2, loss=0.25)
        # Flushed: readable before close.
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert MetricsLogger(tmp_path / "other", Rank(False)).log(1, loss=1.0) is None
    assert not (tmp_path / "other").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == record and set(lines[0]) == {"step", "time", "loss", "lr", "grad_norm"}
    assert lines[0]["loss"] == 0.5 and lines[0]["grad_norm"] is None and lines[1]["step"] == 2
    with MetricsLogger(tmp_path) as log:  # appends on resume
        log.log(3, loss=0.1)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_write_json_atomic_and_strict(tmp_path):
    path = tmp_path / "a" / "results.json"
    write_json(path, {"miou": torch.tensor(0.25), "per_class": [1.0, float("inf")], "dir": tmp_path})
    assert json.loads(path.read_text()) == {"miou": 0.25, "per_class": [1.0, None], "dir": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind


def test_throughput_meter_window():
    meter = ThroughputMeter(window=2, now=0.0)
    assert meter.rate == 0.0
    meter.update(10, now=1.0)
    assert meter.rate == pytest.approx(10.0)
    meter.update(30, now=2.0)
    assert meter.rate == pytest.approx(20.0)  # 40 images in 2 s
    meter.update(50, now=3.0)
    assert meter.rate == pytest.approx(40.0)  # window of 2: (30 + 50) / (3 - 1)
    assert meter.total == 90


def test_progress_bar_main_process_only():
    class Rank:
        def __init__(self, main):
            self.is_main_process = main

    assert progress_bar(5, Rank(False)).disable is True
    bar = progress_bar(5, Rank(True), desc="train")
    assert bar.disable is False and bar.total == 5
    bar.close()


# --- the device-side decision (`defer` / `sync`) --------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def test_deferred_guard_counts_what_check_counts_and_reads_back_only_at_sync():
    losses = [1.0, NAN, 2.0, NAN, NAN, 3.0, INF, 1.0]
    host, device = NonFiniteGuard(max_consecutive=3), NonFiniteGuard(max_consecutive=3)
    for step, value in enumerate(losses):
        expected = host.check(torch.tensor(value), grad_norm=torch.tensor(1.0), step=step)
        flag = device.defer(torch.tensor(value), torch.tensor(1.0), step)
        assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and bool(flag) == expected
        if step == 4:  # counts reach the host only at a sync
            assert device.num_skipped == 0
            device.sync()
            assert (device.consecutive, device.num_skipped) == (host.consecutive, host.num_skipped) == (2, 3)
    device.sync()
    assert (device.consecutive, device.num_skipped) == (host.consecutive, host.num_skipped) == (0, 4)
    device.sync()  # nothing pending: a no-op
    assert device.num_skipped == 4


def test_deferred_guard_names_the_step_where_the_streak_reached_the_limit():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.defer(torch.tensor(1.0), torch.tensor(0.5), 6)
    guard.sync()
    guard.defer(torch.tensor(NAN), torch.tensor(0.5), 7)  # streak 1: across the sync
    guard.sync()
    guard.defer(torch.tensor(2.0), torch.tensor(INF), 8)  # streak 2 here: diverged at step 8
    guard.defer(torch.tensor(NAN), torch.tensor(NAN), 9)
    with pytest.raises(TrainingDiverged) as err:
        guard.sync()
    assert str(err.value).startswith(
        "training diverged at step 8: 2 consecutive non-finite steps (loss=2, grad_norm=inf)"
    )
    assert guard.consecutive == 3 and guard.num_skipped == 3
    unnamed = NonFiniteGuard(max_consecutive=1)
    unnamed.defer(torch.tensor(NAN))  # no step given, no gradient norm
    with pytest.raises(TrainingDiverged, match=r"^training diverged: 1 consecutive .*grad_norm=n/a"):
        unnamed.sync()


def _linear_run(accelerator, bad_batch):
    """A linear model trained by `loop.train_step` over 4 batches with a constant lr; batch 2 is NaN when
    `bad_batch`, left out otherwise."""
    from densecl_vit.training.engine.loop import train_step
    from densecl_vit.training.engine.optim import build_adamw, param_groups_weight_decay

    class Regression(nn.Linear):
        def forward(self, x):
            return types.SimpleNamespace(loss=super().forward(x).pow(2).mean())

    torch.manual_seed(0)
    model = Regression(4, 3)
    optimizer = build_adamw(param_groups_weight_decay(model, 0.05), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    guard, flags = NonFiniteGuard(max_consecutive=3), []
    for index in range(4):
        x = torch.randn(5, 4)
        if index == 2:
            if not bad_batch:
                continue
            x[0, 0] = NAN
        flags.append(train_step(accelerator, model, optimizer, scheduler, {"x": x}, guard, step=index)[1])
    guard.sync()
    return model, optimizer, guard, flags


def test_a_fused_optimizer_skips_a_non_finite_update_on_the_device():
    accelerator = Accelerator(cpu=True)
    try:
        model, optimizer, guard, flags = _linear_run(accelerator, bad_batch=True)
        reference, reference_optimizer, _, _ = _linear_run(accelerator, bad_batch=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert optimizer.optimizer.defaults["fused"]  # the optimiser the training scripts build, on the CPU too
    assert all(isinstance(flag, torch.Tensor) for flag in flags) and [bool(f) for f in flags] == [0, 0, 1, 0]
    assert guard.num_skipped == 1 and guard.consecutive == 0
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.isfinite(mine).all() and torch.equal(mine, theirs)  # the NaN step changed nothing
    states = (optimizer.state_dict()["state"].values(), reference_optimizer.state_dict()["state"].values())
    for mine, theirs in zip(*states):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


def test_gradient_norm_without_clipping_is_torchs_norm_and_leaves_the_gradients_alone():
    from densecl_vit.training.engine.loop import gradient_norm

    accelerator = Accelerator(cpu=True)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        model(torch.randn(5, 3)).pow(2).sum().backward()
        grads = [p.grad for p in model.parameters()]
        before = [g.clone() for g in grads]
        norm = gradient_norm(accelerator, model.parameters())
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # not replaced
        assert all(torch.equal(g, b) for g, b in zip(grads, before))
        assert torch.equal(norm, nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf))
        clipped = gradient_norm(accelerator, model.parameters(), grad_clip=0.5)
        assert torch.equal(clipped, norm)  # the norm before clipping, as torch returns it
        torch.testing.assert_close(grad_norm_of(model.parameters()), torch.tensor(0.5))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_the_module_example_and_the_divergence_message_name_real_options():
    fields = {f.name for f in dataclasses.fields(TrainingArgs)}
    message = NonFiniteGuard._message(10, float("nan"), None, 3)
    ours = set(re.findall(r"(?<!_)--([a-z][a-z-]*[a-z])\b", message))
    launch = set(re.findall(r"accelerate launch (--[a-z_]+)", message))
    assert ours and launch
    assert {name.replace("-", "_") for name in ours} <= fields
    launch_flags = {flag for action in launch_command_parser()._actions for flag in action.option_strings}
    assert launch <= launch_flags
    assert set(re.findall(r"cfg\.(\w+)", guards.__doc__)) <= fields

import json
import math
import os
import signal

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from torch import nn

from densecl_vit.training.guards import NonFiniteGuard, PreemptionHandler, TrainingDiverged, grad_norm_of
from densecl_vit.training.runlog import MetricsLogger, ThroughputMeter, progress_bar, write_json


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

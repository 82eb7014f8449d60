"""DataLoader workers and stop signals: a SIGTERM sent to the whole process group (timeout, SLURM, kill -- -PGID)
must not kill the workers, whether it lands while they start or once they serve batches."""

import os
import signal

import torch

from densecl_vit.training.data.loader import ignore_stop_signals, stop_signals_held


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        range(12), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals
    )


def test_workers_outlive_a_sigterm_sent_while_they_start():
    with stop_signals_held():
        batches = iter(_loader())
        # before worker_init_fn can have run: the signal waits, then is dropped
        for worker in batches._workers:
            os.kill(worker.pid, signal.SIGTERM)
    assert [b.tolist() for b in batches] == [[i, i + 1] for i in range(0, 12, 2)]


def test_workers_outlive_a_sigterm_sent_while_they_serve_batches():
    batches = iter(_loader())
    served = [next(batches), next(batches)]  # one batch from each worker: both have run worker_init_fn
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    served += list(batches)
    assert [b.tolist() for b in served] == [[i, i + 1] for i in range(0, 12, 2)]


def test_holding_the_signals_restores_the_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_signals_held():
        assert {signal.SIGTERM, signal.SIGINT} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before

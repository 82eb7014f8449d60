"""Pre-training across two gloo CPU processes: gathered negatives through the real model, accelerate and DDP
equal one process on the concatenated batch; a SIGTERM seen by one rank stops both at the same step with
one checkpoint, and the resumed two-process run equals an uninterrupted one; `accelerate launch` end to end."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from test_pretrain import (
    REPO,
    TINY,
    assert_same_weights,
    comparable_metrics,
    metrics,
    patch_loss,
    results,
    tiny_args,
    write_parquet,
)

from densecl_vit.training.engine.setup import cli_main
from densecl_vit.training.tasks.pretraining import PretrainConfig, build_model, main

WORLD, LOCAL_BATCH = 2, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-data")
    (root / "tiny.json").write_text(json.dumps(TINY))
    return {"tiny": root / "tiny.json", "data16": write_parquet(root / "data16.parquet", 16)}


@pytest.fixture(autouse=True)
def fresh_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _one_step(model_json: str, out_file: str) -> None:
    """Each rank: a step on its half of a fixed batch through DDP; rank 0 compares with one process on all of it."""
    AcceleratorState._reset_state(
        reset_partial_state=True
    )  # forked: drop the state inherited from the parent
    accelerator = Accelerator(cpu=True)
    generator = torch.Generator().manual_seed(0)
    views = [
        torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32, generator=generator, dtype=torch.float64)
        for _ in range(2)
    ]
    rank = accelerator.process_index
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    report = {}
    for gather in (True, False):
        cfg = PretrainConfig(
            dataset="-", model=model_json, image_size=32, max_steps=1, gather_negatives=gather
        )
        cfg.projection_dim, cfg.projection_hidden_size = 16, 32
        torch.manual_seed(0)
        model = build_model(cfg).double()  # float64: differences are the wiring's, not rounding's
        reference = copy.deepcopy(model)
        reference.config.gather_negatives = False  # one process: the batch's own images are all the negatives
        ddp = accelerator.prepare(model)
        loss = ddp(pixel_values=views[0][local], pixel_values_2=views[1][local]).loss
        accelerator.backward(loss)
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # DDP averages gradients alike
        if rank == 0:
            full = reference(pixel_values=views[0], pixel_values_2=views[1]).loss
            full.backward()
            grads = dict(reference.named_parameters())
            errors = [(p.grad - grads[n].grad).abs().max().item() for n, p in model.named_parameters()]
            report[str(gather)] = {
                "loss": abs(mean_loss - full.item()),
                "grad": max(errors),
                "world": dist.get_world_size(),
            }
    if rank == 0:
        Path(out_file).write_text(json.dumps(report))


def test_gathered_negatives_match_one_process_on_the_whole_batch(files, tmp_path):
    out = tmp_path / "report.json"
    debug_launcher(_one_step, args=(str(files["tiny"]), str(out)), num_processes=WORLD)
    report = json.loads(out.read_text())
    assert report["True"]["world"] == WORLD
    assert report["True"]["loss"] <= 1e-5 and report["True"]["grad"] <= 1e-5, report
    # Without the gather each process sees one other image only: a different loss (the check can fail).
    assert report["False"]["loss"] > 1e-3, report


def _run_script(argv: list[str]) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    status = cli_main(main, PretrainConfig, argv)
    if status != 0:
        raise RuntimeError(f"rank {dist.get_rank()} exited with status {status}")


def _sigterm_rank_1_in_step_2(call: int, loss: torch.Tensor) -> torch.Tensor:
    if call == 1 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss


def test_sigterm_on_one_rank_stops_both_and_resumes_exactly(files, tmp_path, monkeypatch):
    def argv(out, *extra):
        return tiny_args(
            files, out, "--max-steps", "4", "--checkpoint-every", "4", "--gather-negatives", *extra
        )

    debug_launcher(_run_script, args=(argv(tmp_path / "reference"),), num_processes=WORLD)
    summary = results(tmp_path / "reference")
    assert summary["images_seen"] == 4 * WORLD * 4 and summary["total_batch_size"] == 8
    state = json.loads((tmp_path / "reference/checkpoints/step-00000004/trainer_state.json").read_text())
    assert len(state["data_states"]) == WORLD and state["num_processes"] == WORLD

    out = tmp_path / "run"
    patch_loss(monkeypatch, _sigterm_rank_1_in_step_2)  # forked workers inherit the patch
    debug_launcher(_run_script, args=(argv(out),), num_processes=WORLD)
    monkeypatch.undo()
    assert results(out)["status"] == "preempted" and results(out)["steps"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]

    debug_launcher(_run_script, args=(argv(out, "--resume-from", "latest"),), num_processes=WORLD)
    assert_same_weights(out, tmp_path / "reference")

    # One process cannot continue a two-process run: the stream positions and the batch differ.
    status = cli_main(main, PretrainConfig, argv(out, "--resume-from", "latest", "--max-steps", "6"))
    assert status == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_runs_the_script_on_two_cpu_processes(files, tmp_path):
    """`accelerate launch` (torchrun) with gloo: on CPUs `--cpu --num_processes 2` starts one process, so
    ACCELERATE_USE_CPU=1 with --multi_gpu is the launch line for several CPU processes."""
    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "accelerate"
    command = [
        str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "scripts/pretrain.py", *tiny_args(files, out, "--max-steps", "4", "--checkpoint-every", "2"),
        "--gather-negatives", "--num-workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = results(out)
    assert (
        summary["status"] == "completed" and summary["total_batch_size"] == 8 and summary["images_seen"] == 32
    )
    assert (out / "final" / "model.safetensors").is_file()


def _launch(files, out, *extra) -> subprocess.Popen:
    """`accelerate launch` of 2 CPU processes with a DataLoader worker each, in a session of its own. The module
    form runs this interpreter: the `accelerate` script's shebang may name another environment."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "scripts/pretrain.py",
        *tiny_args(files, out, "--max-steps", "30", "--checkpoint-every", "10", "--num-workers", "1", *extra),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _signal_after_step(proc: subprocess.Popen, out: Path, step: int, send) -> int:
    """Call `send(proc)` once metrics.jsonl logs a step past `step`; returns the launcher's exit status."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        logged = [r["step"] for r in metrics(out)] if (out / "metrics.jsonl").exists() else []
        if logged and logged[-1] > step:
            send(proc)
            break
        time.sleep(0.02)
    return proc.wait(timeout=300)


def _ranks(proc: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]


def _sigterm_each_rank_group(proc: subprocess.Popen) -> None:
    """What `pkill -TERM -P <launcher pid>` and a scheduler signalling every task do: each rank, and here its
    DataLoader worker too (a rank leads its own process group), gets SIGTERM; the launcher does not."""
    for pid in _ranks(proc):
        os.killpg(pid, signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_to_an_accelerate_launch_saves_on_every_rank_and_resumes_exactly(files, tmp_path):
    """Three launches to one result: stopped through its ranks, stopped through the launcher's process group, then
    finished; the weights and metrics.jsonl equal an uninterrupted two-process run's."""
    reference = tmp_path / "reference"
    assert _launch(files, reference).wait(timeout=300) == 0  # launched alike: same threads, same sums

    out = tmp_path / "run"
    # The ranks signalled: each saves at the same step and exits 0, so the launcher exits 0 too.
    assert _signal_after_step(_launch(files, out), out, 2, _sigterm_each_rank_group) == 0
    first = results(out)
    assert first["status"] == "preempted" and 2 < first["steps"] < 30
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{first['steps']:08d}"]

    # The launcher's group signalled: torch's elastic agent forwards SIGTERM to every rank's process group, the
    # ranks save and exit 0, and the agent itself ends with 143 (SignalException), whatever the ranks did.
    proc = _launch(files, out, "--resume-from", "latest")
    assert (
        _signal_after_step(proc, out, first["steps"] + 1, lambda p: os.killpg(p.pid, signal.SIGTERM)) == 143
    )
    second = results(out)
    assert second["status"] == "preempted" and first["steps"] < second["steps"] < 30
    assert (out / "checkpoints" / f"step-{second['steps']:08d}" / "COMPLETE").is_file()

    proc = _launch(files, out, "--resume-from", "latest")
    assert proc.wait(timeout=300) == 0 and results(out)["status"] == "completed"
    assert_same_weights(out, reference)
    assert comparable_metrics(out) == comparable_metrics(reference)

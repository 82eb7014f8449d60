"""Pre-training end to end on a tiny model and local parquet data: learning, outputs, exact resumption after
kill -9 / SIGTERM / a truncated checkpoint, non-finite steps, bad data, bad settings; and the shared engine."""

import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from densecl_vit import (
    DenseCLViTConfig,
    DenseCLViTForPreTraining,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTModel,
)
from densecl_vit.training.engine.checkpoint import validate_checkpoint
from densecl_vit.training.engine.config import ConfigError, parse_config
from densecl_vit.training.engine.loop import train_loop
from densecl_vit.training.engine.setup import TrainerState, TrainingArgs, cli_main, total_steps_for
from densecl_vit.training.tasks.pretraining import PretrainConfig, build_data, build_model, main

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
STEPS, EVERY = 12, 4  # the resume tests' run: checkpoints at steps 4, 8, 12 (the last two kept)


# --- data and runs ----------------------------------------------------------------------------------------


def textured_png(seed: int, size: int = 40) -> bytes:
    """An image with its own colour and stripe orientation/frequency, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    fx, fy = rng.uniform(2, 8, 2)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy))
    pixels = (
        0.6 * rng.random(3) + 0.4 * stripes[..., None] * rng.random(3) + rng.normal(0, 0.05, (size, size, 3))
    )
    buffer = io.BytesIO()
    Image.fromarray((255 * np.clip(pixels, 0, 1)).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_parquet(path: Path, num_images: int, corrupt: set[int] = frozenset()) -> Path:
    """`num_images` rows (image, idx); rows in `corrupt` hold truncated PNG bytes."""
    images = [textured_png(i)[: 60 if i in corrupt else None] for i in range(num_images)]
    features = datasets.Features({"image": datasets.Image(), "idx": datasets.Value("int64")})
    rows = {"image": [{"bytes": b, "path": None} for b in images], "idx": list(range(num_images))}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    (root / "tiny.json").write_text(json.dumps(TINY))
    return {
        "tiny": root / "tiny.json",
        "data16": write_parquet(root / "data16.parquet", 16),
        "data8": write_parquet(root / "data8.parquet", 8),
    }


def tiny_args(files, out, *extra, data="data16") -> list[str]:
    return [
        "--dataset", str(files[data]), "--model", str(files["tiny"]), "--image-size", "32",
        "--per-device-batch-size", "4", "--projection-dim", "16", "--projection-hidden-size", "32",
        "--output-dir", str(out), "--num-workers", "0", "--shuffle-buffer", "16", "--log-every", "1",
        "--lr", "0.2", "--no-plot-curves", *extra,
    ]  # fmt: skip


def run(argv: list[str]) -> int:
    """The script in this process: its exit status."""
    try:
        return cli_main(main, PretrainConfig, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def resume_args(files, out, *extra) -> list[str]:
    return tiny_args(files, out, "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), *extra)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    for name in ("final", "final_pretraining"):
        got, want = weights(run_dir / name), weights(reference / name)
        assert got.keys() == want.keys()
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{name}: {different}"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable_metrics(out: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields (`time`, `images_per_s`), which no two runs share."""
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in metrics(out)]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted run of the resume tests' settings."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(resume_args(files, out)) == 0
    return out


def patch_loss(monkeypatch, effect) -> None:
    """Wrap the model's loss: `effect(call_index, loss)` returns the loss to use (a test hook, in-process)."""
    original = DenseCLViTForPreTraining.contrastive_loss
    calls = itertools.count()

    def patched(self, *args):
        return effect(next(calls), original(self, *args))

    monkeypatch.setattr(DenseCLViTForPreTraining, "contrastive_loss", patched)


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--per-device-batch-size", "1"], "--per-device-batch-size must be >= 2"),
        (
            ["--image-size", "30", "--patch-size", "8"],
            "--image-size 30 is not a multiple of the patch size 8",
        ),
        (["--image-size", "200"], "--image-size 200 is not a multiple of the patch size 16"),
        (["--model", "vit-huge"], "unknown --model 'vit-huge'"),
        (["--epochs", "2"], "set exactly one of --max-steps and --epochs"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--projection-dim", "0"], "--projection-dim must be >= 1"),
        (["--warmup-fraction", "1"], r"--warmup-fraction must be in \[0, 1\)"),
        (["--image-size", "4", "--patch-size", "4"], "image_size must exceed the blur radius"),
    ],
)
def test_bad_settings_fail_with_one_line(options, message):
    cfg = parse_config(PretrainConfig, ["--dataset", "x", "--max-steps", "10", *options])
    with pytest.raises(ValueError, match=message) as error:
        cfg.validate()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_recipes_hold_the_papers_settings(size):
    from densecl_vit.training.engine.optim import scaled_lr

    cfg = parse_config(
        PretrainConfig, ["--config", str(REPO / "training" / "recipes" / f"pretrain_vit_{size}.yaml")]
    )
    cfg.validate()
    assert cfg.model == f"vit-{size}" and cfg.image_size == 224 and cfg.loss == "local-global"
    assert cfg.per_device_batch_size == 128 and scaled_lr(cfg.lr, 16 * 128) == pytest.approx(8e-4)
    assert cfg.warmup_fraction == 0.05 and cfg.temperature == 0.1 and cfg.resume_from == "latest"


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_local_local_recipes_differ_from_the_papers_only_in_loss_and_output(size):
    recipes = REPO / "training" / "recipes"
    paper = parse_config(PretrainConfig, ["--config", str(recipes / f"pretrain_vit_{size}.yaml")])
    dense = parse_config(PretrainConfig, ["--config", str(recipes / f"pretrain_vit_{size}_local_local.yaml")])
    dense.validate()
    differing = {k for k, v in vars(dense).items() if vars(paper)[k] != v}
    assert differing == {"loss", "output_dir"}
    assert dense.loss == "local-local" and dense.output_dir == f"outputs/pretrain-vit-{size}-local-local"


def test_unknown_loss_and_option_are_config_errors():
    with pytest.raises(ValueError, match="--loss: .*one of local-global, global, local-local"):
        parse_config(PretrainConfig, ["--dataset", "x", "--max-steps", "1", "--loss", "dense"]).validate()
    with pytest.raises(ConfigError, match="did you mean --gather-negatives"):
        parse_config(PretrainConfig, ["--dataset", "x", "--gather-negative"])


def test_unknown_column_lists_the_columns(files):
    cfg = parse_config(
        PretrainConfig, ["--dataset", str(files["data8"]), "--max-steps", "1", "--image-column", "img"]
    )
    with pytest.raises(ValueError, match="set --image-column to one of: image, idx"):
        build_data(cfg)


def test_epochs_need_a_stream_length():
    cfg = parse_config(PretrainConfig, ["--dataset", "x", "--epochs", "2.5", "--per-device-batch-size", "4"])
    assert total_steps_for(cfg, num_processes=2, num_examples=100) == 31  # floor(2.5 * 100 / 8)
    with pytest.raises(ValueError, match="set --num-train-samples"):
        total_steps_for(cfg, num_processes=1)
    cfg.num_train_samples = 16
    assert total_steps_for(cfg, num_processes=1, num_examples=100) == 10


def test_script_exits_2_with_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/pretrain.py", "--dataset", "x", "--max-steps", "5", "--per-device-batch-size", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "--per-device-batch-size must be >= 2" in errors[0]


# --- learning and outputs ---------------------------------------------------------------------------------


def test_sixty_steps_lower_the_loss_and_write_loadable_outputs(files, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    out = tmp_path / "run"
    extra = ["--max-steps", "60", "--projection-dim", "64", "--projection-hidden-size", "128"]
    extra += ["--crop-scale", "0.35,1", "--seed", "1", "--checkpoint-every", "100"]
    assert run(tiny_args(files, out, *extra, data="data8")) == 0

    records = metrics(out)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 61))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert records[-1]["images_seen"] == 240 and records[-1]["skipped_samples"] == 0
    assert {"lr", "images_per_s", "skipped_by_reason", "nonfinite_skips"} <= records[-1].keys()
    assert records[2]["lr"] == pytest.approx(0.2 * 4 / 256)  # the warm-up (3 steps) ends at the scaled lr

    summary = results(out)
    assert summary["status"] == "completed" and summary["steps"] == 60 and summary["images_seen"] == 240
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["total_batch_size"] == 4 and summary["encoder_dir"] == "final"
    saved = parse_config(PretrainConfig, ["--config", str(out / "config.yaml")])
    assert saved.crop_scale == (0.35, 1.0)
    assert saved.gpu_augment is False  # "none" resolved to what ran: the CPU path, without an accelerator

    encoder = AutoModel.from_pretrained(out / "final")
    assert isinstance(encoder, DenseCLViTModel)
    full = DenseCLViTForPreTraining.from_pretrained(out / "final_pretraining")
    segmenter = DenseCLViTForSemanticSegmentation.from_pretrained(out / "final", num_labels=3)
    for name, tensor in full.densecl_vit.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name
        assert torch.equal(segmenter.densecl_vit.state_dict()[name], tensor), name
    processor = AutoImageProcessor.from_pretrained(out / "final")
    assert processor.size == {"height": 32, "width": 32} and processor.size_divisor == 8

    # --model accepts the folder to continue pre-training from its weights.
    again = parse_config(
        PretrainConfig, ["--dataset", "x", "--max-steps", "1", "--model", str(out / "final_pretraining")]
    )
    again.image_size = 32
    again.validate()
    for name, tensor in build_model(again).state_dict().items():
        assert torch.equal(full.state_dict()[name], tensor), name
    again.projection_dim = 16
    with pytest.raises(ValueError, match="--projection-dim 16 differs from the 64 of the weights"):
        again.validate()


@pytest.mark.parametrize("gpu_augment", ["--gpu-augment", "--no-gpu-augment"])
def test_dense_loss_trains_through_both_augmentation_paths(files, tmp_path, gpu_augment):
    out = tmp_path / "run"
    loss = "0.25*local-global+local-local"
    assert run(tiny_args(files, out, "--max-steps", "2", gpu_augment, "--loss", loss)) == 0
    assert all(np.isfinite(r["loss"]) for r in metrics(out))
    saved = parse_config(PretrainConfig, ["--config", str(out / "config.yaml")])
    assert saved.gpu_augment is (gpu_augment == "--gpu-augment") and saved.loss == loss
    assert json.loads((out / "final" / "config.json").read_text())["pretraining_loss"] == loss


def test_bad_loss_composition_is_one_clear_error(files, tmp_path):
    with pytest.raises(ValueError, match="--loss: pretraining_loss 'local-gobal'"):
        PretrainConfig(
            dataset=str(files["data16"]), max_steps=2, model="vit-tiny", loss="local-gobal"
        ).validate()


# --- exact resumption -------------------------------------------------------------------------------------


def test_kill_9_then_resume_equals_an_uninterrupted_run(files, reference, tmp_path, caplog):
    """kill -9 at a random step after the first checkpoint, then --resume-from latest: bit for bit."""
    caplog.set_level("INFO", logger="densecl_vit.training.engine.loop")
    out = tmp_path / "run"
    kill_after = random.randint(EVERY + 1, STEPS - 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "scripts/pretrain.py", *resume_args(files, out)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            logged = (
                (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            )
            if len(logged) >= kill_after and (out / "checkpoints" / f"step-{EVERY:08d}").exists():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"not killed (target step {kill_after}): {(tmp_path / 'log.txt').read_text()}"
    )
    assert not (out / "final").exists()

    assert run(resume_args(files, out, "--resume-from", "latest")) == 0  # here: one process start less
    assert "resumed from" in caplog.text
    assert_same_weights(out, reference)
    # the steps the killed run logged past its checkpoint are logged once, by the resumed run
    assert comparable_metrics(out) == comparable_metrics(reference)


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(files, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def sigterm_at_step_6(call, loss):
        if call == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: that step finishes, then the run stops
        return loss

    patch_loss(monkeypatch, sigterm_at_step_6)
    assert run(resume_args(files, out)) == 0
    monkeypatch.undo()
    assert results(out)["status"] == "preempted" and results(out)["steps"] == 6
    assert validate_checkpoint(out / "checkpoints" / "step-00000006") is None
    assert not (out / "final").exists()

    assert run(resume_args(files, out, "--resume-from", "latest")) == 0
    assert results(out)["status"] == "completed"
    assert_same_weights(out, reference)


def test_sigterm_to_the_process_group_with_dataloader_workers_saves_and_resumes_exactly(
    files, reference, tmp_path
):
    """What `timeout`, SLURM and `kill -- -PGID` do: SIGTERM to the script and its DataLoader workers at once."""
    out = tmp_path / "run"
    argv = resume_args(files, out, "--num-workers", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        command = [sys.executable, "scripts/pretrain.py", *argv]
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2:
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.005)
        status = proc.wait(timeout=120)
    assert status == 0, (tmp_path / "log.txt").read_text()[-3000:]
    stopped = results(out)
    assert stopped["status"] == "preempted" and stopped["steps"] < STEPS
    assert validate_checkpoint(out / "checkpoints" / f"step-{stopped['steps']:08d}") is None

    assert run([*argv, "--resume-from", "latest"]) == 0
    assert_same_weights(out, reference)  # workers or not, the batches are the same
    assert comparable_metrics(out) == comparable_metrics(reference)


def test_a_stop_and_resume_log_what_an_uninterrupted_run_logs(files, tmp_path, monkeypatch):
    """The loss window since the last log is saved: the first log after the resume averages steps 6-10."""
    argv = resume_args(files, tmp_path / "reference", "--log-every", "5")
    assert run(argv) == 0
    out = tmp_path / "run"

    def sigterm_at_step_6(call, loss):
        if call == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    patch_loss(monkeypatch, sigterm_at_step_6)
    assert run(resume_args(files, out, "--log-every", "5")) == 0
    monkeypatch.undo()
    assert results(out)["steps"] == 6 and [r["step"] for r in metrics(out)] == [5]
    assert run(resume_args(files, out, "--log-every", "5", "--resume-from", "latest")) == 0
    assert [r["step"] for r in metrics(out)] == [5, 10, 12]
    assert comparable_metrics(out) == comparable_metrics(tmp_path / "reference")


def test_a_stop_between_logging_steps_keeps_the_skips_since_the_last_log(files, tmp_path, monkeypatch):
    """The device-side skip counts are read when a signal stops the run, not only at logging steps."""
    out = tmp_path / "run"

    def nan_then_sigterm(call, loss):
        if call == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the run stops after step 4, between logs at 10 and 12
        return loss * float("nan") if call == 1 else loss

    patch_loss(monkeypatch, nan_then_sigterm)
    argv = tiny_args(files, out, "--max-steps", "12", "--log-every", "10", "--checkpoint-every", "100")
    assert run(argv) == 0
    assert results(out)["status"] == "preempted" and results(out)["steps"] == 4
    assert results(out)["nonfinite_skips"] == 1
    saved = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert saved["trainer"]["nonfinite_skips"] == 1


def test_truncated_checkpoint_is_skipped_with_a_message(files, reference, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    assert run(resume_args(files, out, "--resume-from", "latest")) == 0
    assert f"step-{STEPS:08d}" in caplog.text and "truncated" in caplog.text
    assert [r["step"] for r in metrics(out)] == list(range(STEPS - EVERY + 1, STEPS + 1))
    assert_same_weights(out, reference)


def test_a_same_size_corruption_of_a_random_state_is_refused_by_name(files, reference, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    rng = out / "checkpoints" / f"step-{STEPS:08d}" / "random_states_0.pkl"
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng.write_bytes(bytes(data))
    assert run(resume_args(files, out, "--resume-from", "latest")) == 0
    assert f"step-{STEPS:08d}: random_states_0.pkl does not match the SHA-256" in caplog.text
    assert_same_weights(out, reference)  # resumed from step 8 instead


def test_a_malicious_pickle_given_as_weights_is_refused_in_one_line(files, tmp_path, capsys):
    """Loaded by transformers' from_pretrained, which raises torch's error without the file's name."""

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    folder = tmp_path / "model"
    config = DenseCLViTConfig(**TINY, projection_dim=16, projection_hidden_size=32)  # as tiny_args says
    DenseCLViTModel(config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"payload": RunsCode()}, folder / "pytorch_model.bin")
    capsys.readouterr()  # save_pretrained's progress bar
    assert run([*tiny_args(files, tmp_path / "run", "--max-steps", "2"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: refused to load") and "pytorch_model.bin" in err
    assert "posix.system" in err and "safetensors" in err and "weights_only" not in err
    assert not (tmp_path / "ran").exists()


def test_resume_refuses_changed_settings_and_allows_more_steps(files, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    assert run(resume_args(files, out, "--resume-from", "latest", "--lr", "0.3", "--seed", "5")) == 2
    error = capsys.readouterr().err
    assert "lr (checkpoint 0.2, now 0.3)" in error and "seed (checkpoint 0, now 5)" in error
    assert run(resume_args(files, out)) == 2
    assert "already holds checkpoints; pass --resume-from latest" in capsys.readouterr().err
    assert run(resume_args(files, out, "--resume-from", "latest", "--max-steps", str(STEPS + 2))) == 0
    assert results(out)["steps"] == STEPS + 2


# --- non-finite steps and bad data ------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_then_stop_the_run(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "once"
    patch_loss(monkeypatch, lambda call, loss: loss * float("nan") if call == 2 else loss)
    assert run(tiny_args(files, out, "--max-steps", "5")) == 0
    assert results(out)["nonfinite_skips"] == 1
    records = metrics(out)
    assert (
        records[2]["loss"] is None
        and records[2]["nonfinite_skips"] == 1
        and records[1]["nonfinite_skips"] == 0
    )

    out = tmp_path / "diverged"
    patch_loss(monkeypatch, lambda call, loss: loss * float("nan") if call >= 2 else loss)
    argv = tiny_args(files, out, "--max-steps", "10", "--checkpoint-every", "2", "--max-nonfinite-steps", "3")
    assert run(argv) == 1
    error = capsys.readouterr().err
    assert "error: training diverged at step 4: 3 consecutive non-finite steps" in error
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert validate_checkpoint(out / "checkpoints" / "step-00000002") is None


def test_training_steps_read_nothing_back_from_the_device(files, tmp_path, monkeypatch):
    """Between logging steps a step neither reads a tensor's value on the host (which on an accelerator waits
    for the device) nor asks the guard for its counts; a non-finite step among them is still skipped."""
    from densecl_vit.training.engine import loop

    inside, reads, syncs = [False], [], []
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if inside[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    step = loop.train_step

    def watched(*args, **kwargs):
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop, "train_step", watched)
    sync = loop.NonFiniteGuard.sync
    monkeypatch.setattr(loop.NonFiniteGuard, "sync", lambda self: syncs.append(1) or sync(self))
    patch_loss(monkeypatch, lambda call, loss: loss * float("nan") if call == 4 else loss)
    out = tmp_path / "run"
    assert run(tiny_args(files, out, "--max-steps", "6", "--log-every", "3", "--checkpoint-every", "99")) == 0
    assert reads == [] and len(syncs) == 2  # steps 3 and 6
    assert [r["nonfinite_skips"] for r in metrics(out)] == [0, 1] and results(out)["nonfinite_skips"] == 1


def test_corrupt_images_are_skipped_and_reported(files, tmp_path, capsys):
    data = write_parquet(tmp_path / "some_bad.parquet", 24, corrupt={3, 10, 17})
    out = tmp_path / "run"
    assert run(tiny_args(files, out, "--max-steps", "6", "--dataset", str(data))) == 0
    summary = results(out)
    assert summary["skipped_by_reason"] == {"undecodable_image": summary["skipped_samples"]}
    assert summary["skipped_samples"] >= 1 and summary["examples_seen"] == 24 + summary["skipped_samples"]
    assert metrics(out)[-1]["skipped_samples"] == summary["skipped_samples"]
    assert "skipped examples" in capsys.readouterr().out


def test_mostly_corrupt_data_stops_with_exit_1(files, tmp_path, capsys):
    data = write_parquet(tmp_path / "bad.parquet", 64, corrupt=set(range(0, 64, 4)) | set(range(1, 64, 4)))
    out = tmp_path / "run"
    assert (
        run(tiny_args(files, out, "--max-steps", "30", "--dataset", str(data), "--max-bad-fraction", "0.3"))
        == 1
    )
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "were unusable (undecodable_image" in error


# --- the shared engine with another model -----------------------------------------------------------------


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        return type("Output", (), {"loss": torch.nn.functional.mse_loss(self.linear(x), y)})


class _ListLoader:
    """A resumable loader of fixed batches (what the engine needs from a loader)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_engine_trains_any_model_and_evaluates(tmp_path):
    from densecl_vit.training.engine.optim import build_adamw, cosine_with_warmup

    torch.manual_seed(0)
    x = torch.randn(8, 3)
    batches = [{"x": x, "y": x @ torch.tensor([[1.0], [-2.0], [0.5]])} for _ in range(4)]
    args = TrainingArgs(dataset="-", output_dir=str(tmp_path), per_device_batch_size=8, max_steps=7, lr=0.05)
    args.log_every, args.checkpoint_every, args.plot_curves = 2, 100, False
    accelerator = Accelerator(cpu=True)
    try:
        model = _Regression()
        optimizer = build_adamw([{"params": list(model.parameters())}], lr=args.lr)
        scheduler = cosine_with_warmup(optimizer, total_steps=7, warmup_steps=0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        evaluated = []
        outcome = train_loop(
            accelerator, model, optimizer, scheduler, _ListLoader(batches), args, TrainerState(), 7, {},
            evaluate=lambda state: evaluated.append(state.step) or {"mse": float(state.step)}, eval_every=3,
        )  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert outcome.status == "completed" and outcome.state.step == 7 and outcome.state.images_seen == 56
    assert evaluated == [3, 6, 7] and outcome.eval_metrics == {"eval_mse": 7.0}
    records = metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 7]
    assert [r["eval_mse"] for r in records if "eval_mse" in r] == [3.0, 6.0, 7.0]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "checkpoints" / "step-00000007").is_dir()

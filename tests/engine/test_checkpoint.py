import hashlib
import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from torch import nn

from densecl_vit.training.engine.checkpoint import _write_marker as write_marker
from densecl_vit.training.engine.checkpoint import (
    check_resume_compatible,
    complete_checkpoints,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    validate_checkpoint,
)
from densecl_vit.training.engine.optim import build_adamw, cosine_with_warmup, param_groups_weight_decay


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def make_training(accelerator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = build_adamw(param_groups_weight_decay(model, 0.05), lr=1e-2)
    scheduler = cosine_with_warmup(optimizer, total_steps=20, warmup_steps=2)
    return accelerator.prepare(model, optimizer, scheduler)


def train_steps(accelerator, model, optimizer, scheduler, n):
    for _ in range(n):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def snapshot(model, optimizer, scheduler):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in optimizer.state_dict()["state"].items()
    }
    return params, opt_state, scheduler.state_dict()["last_epoch"], [g["lr"] for g in optimizer.param_groups]


def test_save_then_load_restores_exactly(tmp_path, accelerator):
    model, optimizer, scheduler = make_training(accelerator)
    train_steps(accelerator, model, optimizer, scheduler, 3)
    extra = {
        "samples_seen": 9,
        "data_state": {"epoch": 0, "shard": 2},
        "config": {"lr": 0.01, "size": [32, 32]},
    }
    path = save_checkpoint(accelerator, tmp_path, step=3, extra=extra)
    assert path == tmp_path / "checkpoints" / "step-00000003"
    saved = snapshot(model, optimizer, scheduler)
    rng_after_save = torch.rand(4)

    train_steps(accelerator, model, optimizer, scheduler, 2)
    assert not torch.equal(model.state_dict()["0.weight"], saved[0]["0.weight"])

    state = load_checkpoint(accelerator, path)
    assert state["step"] == 3 and state["num_processes"] == 1
    assert {k: state[k] for k in extra} == extra
    params, opt_state, last_epoch, lrs = snapshot(model, optimizer, scheduler)
    for k, v in saved[0].items():
        assert torch.equal(params[k], v), k
    assert opt_state.keys() == saved[1].keys()
    for i in opt_state:
        for k, v in saved[1][i].items():
            assert torch.equal(torch.as_tensor(opt_state[i][k]), torch.as_tensor(v)), (i, k)
    assert last_epoch == saved[2] == 3 and lrs == saved[3]
    assert torch.equal(torch.rand(4), rng_after_save)  # RNG state restored too
    assert {p.name for p in path.iterdir()} >= {"trainer_state.json", "COMPLETE", "random_states_0.pkl"}
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000003").exists()


def test_latest_skips_partial_and_truncated(tmp_path, accelerator):
    model, optimizer, scheduler = make_training(accelerator)
    save_checkpoint(accelerator, tmp_path, step=1)
    good = save_checkpoint(accelerator, tmp_path, step=2)
    root = tmp_path / "checkpoints"
    shutil.copytree(good, root / ".tmp-step-00000003")  # crashed mid-save
    no_marker = shutil.copytree(good, root / "step-00000004")
    (no_marker / "COMPLETE").unlink()  # interrupted before the marker
    truncated = shutil.copytree(good, root / "step-00000005")
    weights = next(p for p in truncated.iterdir() if p.name.startswith("model"))
    weights.write_bytes(weights.read_bytes()[:10])  # a copy cut short

    latest, skipped = find_latest_checkpoint(tmp_path)
    assert latest == good
    reasons = {p.name: r for p, r in skipped}
    assert reasons[".tmp-step-00000003"] == "unfinished save (temporary folder)"
    assert reasons["step-00000004"] == "no COMPLETE marker: the save was interrupted"
    assert reasons["step-00000005"].startswith(f"{weights.name} is 10 bytes, expected")
    assert resolve_resume(tmp_path, "latest") == good
    with pytest.raises(ValueError, match="cannot resume from .*step-00000005: .*truncated copy"):
        resolve_resume(tmp_path, truncated)
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        load_checkpoint(accelerator, no_marker)


def test_validate_checks_state_and_marker_agree(tmp_path, accelerator):
    make_training(accelerator)
    path = save_checkpoint(accelerator, tmp_path, step=7)
    assert validate_checkpoint(path) is None
    state = json.loads((path / "trainer_state.json").read_text())
    state["step"] = 8
    (path / "trainer_state.json").write_text(json.dumps(state))
    reason = validate_checkpoint(path)
    assert reason is not None and ("trainer_state.json" in reason)


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_hashes_refuse_a_same_size_corruption_by_name(tmp_path, accelerator):
    make_training(accelerator)
    older = save_checkpoint(accelerator, tmp_path, step=1)
    newest = save_checkpoint(accelerator, tmp_path, step=2)
    manifest = json.loads((newest / "COMPLETE").read_text())
    rng = newest / "random_states_0.pkl"
    assert manifest["sha256"]["random_states_0.pkl"] == hashlib.sha256(rng.read_bytes()).hexdigest()
    flip_middle_byte(rng)

    assert validate_checkpoint(newest) is None  # the size is unchanged
    reason = validate_checkpoint(newest, verify_hashes=True)
    assert (
        reason == "random_states_0.pkl does not match the SHA-256 in COMPLETE (corrupted since it was saved)"
    )
    assert resolve_resume(tmp_path, "latest") == older  # the newest is refused, the older one is intact
    with pytest.raises(ValueError, match=r"step-00000002: random_states_0\.pkl does not match the SHA-256"):
        resolve_resume(tmp_path, newest)


def test_an_unrestorable_random_state_is_an_error_naming_the_file(tmp_path, accelerator):
    """accelerate only logs a random state it cannot restore; the resumed run would silently differ."""
    make_training(accelerator)
    path = save_checkpoint(accelerator, tmp_path, step=1)
    rng = path / "random_states_0.pkl"
    rng.write_bytes(b"x" * rng.stat().st_size)
    write_marker(path, 1)  # hashes of the damaged file: as if it was written that way
    with pytest.raises(ValueError, match=r"cannot restore the random state from .*random_states_0\.pkl"):
        load_checkpoint(accelerator, path)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_in_one_line(tmp_path, accelerator, name):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    make_training(accelerator)
    path = save_checkpoint(accelerator, tmp_path, step=1)
    torch.save({"state": {}, "payload": RunsCode()}, path / name)
    write_marker(path, 1)  # a consistent manifest: hashes prove integrity, not trust
    with pytest.raises(ValueError) as error:
        load_checkpoint(accelerator, resolve_resume(tmp_path, "latest"))
    message = str(error.value)
    assert "\n" not in message and name in message and "posix.system" in message
    assert "safetensors" in message and "weights_only" not in message
    assert not (tmp_path / "ran").exists()


def test_keep_last_prunes_oldest_complete(tmp_path, accelerator):
    make_training(accelerator)
    root = tmp_path / "checkpoints"
    partial = root / "step-00000000"
    partial.mkdir(parents=True)
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, tmp_path, step=step, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert partial.exists()  # incomplete folders are reported, never silently deleted
    assert sorted(p.name for p in root.iterdir()) == ["step-00000000", "step-00000003", "step-00000004"]


def test_resave_same_step_replaces(tmp_path, accelerator):
    make_training(accelerator)
    save_checkpoint(accelerator, tmp_path, step=5, extra={"samples_seen": 1})
    path = save_checkpoint(accelerator, tmp_path, step=5, extra={"samples_seen": 2})
    assert load_checkpoint(accelerator, path)["samples_seen"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005"]


def test_resolve_resume_forms(tmp_path, accelerator):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "none") is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing saved yet: start fresh
    with pytest.raises(ValueError, match="does not exist"):
        resolve_resume(tmp_path, tmp_path / "nope")
    make_training(accelerator)
    path = save_checkpoint(accelerator, tmp_path, step=1)
    assert resolve_resume(tmp_path, str(path)) == path


def test_save_argument_checks(tmp_path, accelerator):
    make_training(accelerator)
    with pytest.raises(ValueError, match="extra must not set step"):
        save_checkpoint(accelerator, tmp_path, step=1, extra={"step": 3})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(accelerator, tmp_path, step=1, extra={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(accelerator, tmp_path, step=1, keep_last=0)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_compatibility_names_fields():
    saved = {"lr": 1e-4, "image_size": [224, 224], "model": "vit-small", "seed": 0}
    check_resume_compatible(
        saved, {**saved, "image_size": (224, 224), "seed": 1}, ["lr", "image_size", "model"]
    )
    with pytest.raises(ValueError) as err:
        check_resume_compatible(
            saved, {**saved, "lr": 2e-4, "model": "vit-base"}, ["lr", "image_size", "model"]
        )
    message = str(err.value)
    assert "\n" not in message
    assert "lr (checkpoint 0.0001, now 0.0002)" in message
    assert "model (checkpoint 'vit-small', now 'vit-base')" in message
    assert "image_size" not in message


def _two_process_save(tmp_dir):
    AcceleratorState._reset_state(
        reset_partial_state=True
    )  # forked: drop any state inherited from the parent
    acc = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    torch.manual_seed(acc.process_index)
    model = nn.Linear(4, 2)
    optimizer = build_adamw(param_groups_weight_decay(model, 0.0), lr=0.1)
    scheduler = cosine_with_warmup(optimizer, total_steps=10, warmup_steps=2)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    train_steps(acc, model, optimizer, scheduler, 1)
    assert scheduler.scheduler.last_epoch == 1, "one schedule step per optimiser step"
    save_checkpoint(acc, tmp_dir, step=1, extra={"rank_count": acc.num_processes}, keep_last=1)
    path = save_checkpoint(acc, tmp_dir, step=2, extra={"rank_count": acc.num_processes}, keep_last=1)
    expected, weights = torch.rand(2), model.module.weight.detach().clone()
    train_steps(acc, model, optimizer, scheduler, 1)
    state = load_checkpoint(acc, path)
    assert state["rank_count"] == 2 and scheduler.scheduler.last_epoch == 1
    assert torch.equal(model.module.weight, weights)
    assert torch.equal(torch.rand(2), expected), "each rank restores its own RNG state"


@pytest.mark.timeout(180)
def test_two_processes_share_one_checkpoint(tmp_path):
    """Two forked gloo processes (file rendezvous, no fixed port): one folder, both RNG files, pruned."""
    AcceleratorState._reset_state(reset_partial_state=True)
    debug_launcher(_two_process_save, args=(str(tmp_path),), num_processes=2)
    path, skipped = find_latest_checkpoint(tmp_path)
    assert path.name == "step-00000002" and skipped == []
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in path.iterdir()}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]

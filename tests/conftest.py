import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Tiny models run fastest on one thread, and the suite shares two cores with its own subprocesses.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread (bit-reproducible against a one-thread subprocess) and leaves
    the count as it found it, whatever the code under test set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    """The suite's tiny model: image 32, patch 8, hidden 32, 2 layers, 2 heads."""
    from densecl_vit import DenseCLViTConfig

    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    kwargs.update(overrides)
    return DenseCLViTConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny():
    return tiny_config


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts folder is no package), to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(
        f"script_{name}", Path(__file__).parents[1] / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_isolated(code: str, cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run Python code in a fresh process that cannot import `densecl_vit` (what a Hub user has), offline."""
    prelude = "import sys\nsys.modules['densecl_vit'] = None  # any import of the package now fails\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd) + "/hf_modules", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def isolated():
    return run_isolated

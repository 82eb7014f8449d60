import os

# Nothing in the test suite may reach the network. Set before anything imports huggingface_hub or datasets
# (helpers does), which read these once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import run_isolated, tiny_config  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny():
    return tiny_config


@pytest.fixture
def isolated():
    return run_isolated

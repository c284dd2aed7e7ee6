"""Shared fixtures: real CIFAR-10 rows, a key, one protected folder, and a local Hub server.

The Hub client reads ``HF_ENDPOINT`` when it is imported, so the test server's address is
fixed here, before anything imports ``huggingface_hub``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
_HOME = tempfile.mkdtemp(prefix="uge-hf-test-home-")
os.environ.update({
    "HF_ENDPOINT": f"http://127.0.0.1:{HUB_PORT}",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HOME": _HOME,  # a fresh Hub cache and no stored login
    "HF_HUB_DISABLE_TELEMETRY": "1",
})
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_DATASETS_OFFLINE", None)
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)

import datasets  # noqa: E402  (after the environment above)

datasets.disable_progress_bars()  # quiet logs; tests that check the bars turn them back on


def pytest_configure(config):
    # The tests' keys are seeded, for reproducibility (test_safety checks the warning itself).
    # Not in pyproject: pytest would import uge_hf, and with it huggingface_hub, before the
    # environment above points it at the test server.
    config.addinivalue_line("filterwarnings", "ignore::uge_hf.config.GuessableKeyWarning")

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = Path(os.environ.get("UGE_HF_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))
TOKEN = "hf_uge_test_token"  # the one tests/hub_server.py accepts


@pytest.fixture(scope="session")
def cifar():
    from datasets import load_dataset

    if not CIFAR10.exists():
        pytest.fail(f"CIFAR-10 not found at {CIFAR10}; set UGE_HF_CIFAR10 to the folder of the Hub-layout copy")
    return load_dataset(str(CIFAR10))


@pytest.fixture(scope="session")
def small_train(cifar):
    """250 real training images (one batch of the fast preset)."""
    return cifar["train"].select(range(250))


@pytest.fixture(scope="session")
def key():
    from uge_hf import AuthorizedModel

    return AuthorizedModel.create("convnet", num_classes=10, seed=0)


@pytest.fixture(scope="session")
def fast_config():
    from uge_hf import ProtectConfig

    return ProtectConfig.preset("fast", batch_size=125)


@pytest.fixture(scope="session")
def protected_dir(tmp_path_factory, small_train, key, fast_config):
    """One protected folder shared by the read-only tests (card, hub, loading)."""
    from uge_hf import protect

    out = tmp_path_factory.mktemp("protected") / "cifar10-uge"
    protect(small_train, key, fast_config, output_dir=out, shard_size=125, verbose=False)
    return out


@pytest.fixture(scope="session")
def hub_server():
    """tests/hub_server.py on 127.0.0.1, speaking the Hub's HTTP API."""
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "hub_server.py"), str(HUB_PORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == str(HUB_PORT)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", HUB_PORT), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    yield os.environ["HF_ENDPOINT"]
    proc.kill()
    proc.wait()


@pytest.fixture
def hub_token(hub_server, monkeypatch):
    """The token the test Hub accepts, provided the usual way (HF_TOKEN)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN

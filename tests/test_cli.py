"""Each CLI command once, through ``python -m uge_hf`` / ``main()``, on real CIFAR-10."""

import json
import subprocess
import sys

import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard

from uge_hf import AuthorizedModel
from uge_hf.cli import main

from .conftest import CIFAR10


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "key"
    assert main(["keygen", "--arch", "convnet", "--num-classes", "10", "--seed", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def protected_cli(key_dir):
    out = key_dir.parent / "out"
    code = main(["protect", str(CIFAR10), "--split", "train", "--limit", "120", "--key", str(key_dir), "--out", str(out),
                 "--epsilon", "8/255", "--preset", "fast", "--batch-size", "60", "--quiet"])
    assert code == 0
    return out


def test_keygen_writes_a_loadable_key(key_dir):
    assert AuthorizedModel.from_pretrained(key_dir).fingerprint == AuthorizedModel.create("convnet", 10, 0).fingerprint


def test_protect_writes_a_loadable_folder(protected_cli):
    ds = load_dataset(str(protected_cli))
    assert len(ds["train"]) == 120
    meta = json.loads((protected_cli / "uge_hf.json").read_text())
    assert meta["config"]["epsilon"] == 8 / 255 and meta["source"]["rows"] == 120


def test_protect_reports_bad_input_and_exits_2(key_dir, tmp_path, capsys):
    code = main(["protect", str(CIFAR10), "--split", "train", "--limit", "10", "--key", str(key_dir), "--out", str(tmp_path / "x"),
                 "--image-column", "image", "--quiet"])
    assert code == 2
    assert "column 'image' not found; columns are: img, label" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluate_prints_a_table_and_writes_json(protected_cli, key_dir, tmp_path):
    results = tmp_path / "results.json"
    code = main(["evaluate", str(protected_cli), "--clean", str(CIFAR10), "--key", str(key_dir), "--hackers", "vgg-tiny",
                 "--epochs", "1", "--json", str(results), "--update-card", "--quiet"])
    assert code == 0
    data = json.loads(results.read_text())
    assert [r["model"] for r in data["rows"]] == ["key θ0", "key arch, seed 7", "vgg-tiny"]
    assert all(0 <= r["protected_acc"] <= 100 for r in data["rows"])
    card = DatasetCard.load(protected_cli / "README.md")
    assert card.data.to_dict()["uge_hf"]["efficacy"] == data["rows"]
    assert "## Measured efficacy" in card.text and "vgg-tiny" in card.text


def test_push_and_verify(protected_cli, key_dir, hub_token, tmp_path):
    assert main(["push", str(protected_cli), "tester/cli-uge"]) == 0
    assert main(["verify", "tester/cli-uge", "--key", str(key_dir)]) == 0
    AuthorizedModel.create("convnet", 10, seed=3).save_pretrained(tmp_path / "wrong")
    assert main(["verify", "tester/cli-uge", "--key", str(tmp_path / "wrong")]) == 1


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "uge_hf", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("keygen", "protect", "evaluate", "push", "verify"):
        assert command in out

"""Publish and consume through the real client libraries against tests/hub_server.py."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from datasets import Image, load_dataset
from huggingface_hub import DatasetCard, HfApi, hf_hub_download

from uge_hf import AuthorizedModel, load_protected, push_to_hub, verify
from uge_hf.hub import KeyMismatchError, TamperedShardError
from uge_hf.utils import sha256_file


@pytest.fixture
def pushed(protected_dir, hub_token, request):
    repo_id = f"tester/cifar10-uge-{request.node.name[:40]}"
    push_to_hub(protected_dir, repo_id)
    return repo_id


def image_bytes(ds):
    return [item["bytes"] for item in ds.cast_column("img", Image(decode=False))["img"]]


def test_push_is_one_commit_with_card_metadata_and_shards(protected_dir, pushed, hub_token):
    api = HfApi()
    files = sorted(api.list_repo_files(pushed, repo_type="dataset"))
    assert files == ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "uge_hf.json"]
    assert api.dataset_info(pushed).private is True


def test_pushing_reencodes_nothing(protected_dir, pushed, hub_token):
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"):
        served = hf_hub_download(pushed, name, repo_type="dataset")
        assert sha256_file(served) == sha256_file(protected_dir / name)


def test_load_dataset_of_the_repo_id_gives_identical_images(protected_dir, pushed, hub_token):
    remote = load_dataset(pushed)
    local = load_dataset(str(protected_dir))
    assert image_bytes(remote["train"]) == image_bytes(local["train"])


def test_private_repo_is_invisible_without_token(pushed, hub_token, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).dataset_info(pushed)


def test_load_protected_with_the_right_key(pushed, key, tmp_path, hub_token):
    key.save_pretrained(tmp_path / "key")
    ds, model = load_protected(pushed, authorized_model=tmp_path / "key")
    assert len(ds["train"]) == 250
    assert AuthorizedModel.from_module("convnet", model, 10).fingerprint == key.fingerprint


def test_load_protected_refuses_a_key_of_another_seed(pushed, key, hub_token):
    other = key.sibling(7)
    with pytest.raises(KeyMismatchError) as error:
        load_protected(pushed, authorized_model=other)
    assert other.fingerprint in str(error.value) and key.fingerprint in str(error.value)
    with pytest.warns(UserWarning, match="trust_mismatch=True"):
        load_protected(pushed, authorized_model=other, trust_mismatch=True)


def test_key_round_trip_through_the_hub(key, hub_token):
    key.push_to_hub("tester/cifar10-key")
    loaded = AuthorizedModel.from_pretrained("tester/cifar10-key")
    assert loaded.fingerprint == key.fingerprint
    assert loaded.source["repo_id"] == "tester/cifar10-key" and len(loaded.source["revision"]) == 40
    assert HfApi().model_info("tester/cifar10-key").private is True
    lfs = {f.path: f.lfs for f in HfApi().list_repo_tree("tester/cifar10-key")}
    assert lfs["model.safetensors"].sha256 == key.weights_file_sha256


def test_push_to_a_branch(protected_dir, hub_token):
    push_to_hub(protected_dir, "tester/branched", revision="v1")
    api = HfApi()
    assert "uge_hf.json" in api.list_repo_files("tester/branched", repo_type="dataset", revision="v1")
    assert "uge_hf.json" not in api.list_repo_files("tester/branched", repo_type="dataset")


def test_tampered_shard_is_named(protected_dir, key, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(protected_dir, copy)
    shard = copy / "data" / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(TamperedShardError, match="train-00001-of-00002.parquet was modified"):
        verify(copy, key)


def test_token_never_lands_in_card_or_metadata(protected_dir, pushed, hub_token):
    for name in ("README.md", "uge_hf.json"):
        assert hub_token not in open(hf_hub_download(pushed, name, repo_type="dataset")).read()


def test_card_fields_parse_back(pushed, protected_dir, key, fast_config, hub_token):
    card = DatasetCard.load(hf_hub_download(pushed, "README.md", repo_type="dataset"))
    data = card.data.to_dict()
    block = data["uge_hf"]
    meta = json.loads((protected_dir / "uge_hf.json").read_text())
    assert "license" not in data and "No license was recorded" in card.text  # none given: none claimed
    assert data["task_categories"] == ["image-classification"] and data["size_categories"] == ["n<1K"]
    assert {"uge", "unlearnable-examples"} <= set(data["tags"])
    assert data["configs"][0]["data_files"] == [{"split": "train", "path": sorted(meta["shards"])}]  # exactly these files
    assert data["dataset_info"]["splits"][0]["num_examples"] == 250
    assert "key_architecture" not in block and "convnet" not in card.text  # nothing that narrows a search for the key
    assert block["key_fingerprints"] == [key.fingerprint]
    assert block["key_weights_sha256"] == [key.weights_file_sha256] and key.weights_file_sha256 == hashlib.sha256(key._weights_bytes()).hexdigest()
    assert block["epsilon"] == fast_config.epsilon and block["mode"] == "per-sample"
    assert block["loss_weights"] == {"gm": 1.0, "am": 0.0, "fd": 1.0, "kc": 0.0, "ud": 0.0, "bind": 0.0}
    assert block["matching_interval"] == fast_config.gm_every and "match_every_key" not in block  # withheld (a hint at the keys)
    assert block["state_fingerprint"] == meta["state_fingerprint"]
    assert block["shards"] == meta["shards"]
    from uge_hf import __version__

    assert block["version"] == __version__
    for section in ("For the authorized user", "For everyone else", "Limits of the protection", "Citation"):
        assert section in card.text
    assert pushed in card.text  # the loading snippet names this repo


@pytest.mark.skipif(not os.environ.get("UGE_HF_LIVE_HUB_TOKEN"), reason="set UGE_HF_LIVE_HUB_TOKEN to test against the real Hub")
def test_live_hub_round_trip(protected_dir, key, tmp_path):  # pragma: no cover - needs the network
    """The same journey against huggingface.co, in a process that does not see the test server."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_HOME")}
    env["HF_TOKEN"] = os.environ["UGE_HF_LIVE_HUB_TOKEN"]
    key.save_pretrained(tmp_path / "key")
    script = f"""
import uuid
from huggingface_hub import HfApi
from uge_hf import load_protected, push_to_hub
api = HfApi()
repo = api.whoami()["name"] + "/uge-hf-live-" + uuid.uuid4().hex[:8]
try:
    push_to_hub({str(protected_dir)!r}, repo)
    ds, _ = load_protected(repo, authorized_model={str(tmp_path / "key")!r})
    assert len(ds["train"]) == 250
finally:
    api.delete_repo(repo, repo_type="dataset", missing_ok=True)
"""
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)


def test_card_renders_for_a_folder_written_before_a_config_field_existed(protected_dir):
    """A folder from an older uge-hf lacks newer config fields; its card renders them as their defaults (off)."""
    from uge_hf.card import render_card
    from uge_hf.folder import folder_features, read_metadata

    meta = read_metadata(protected_dir)
    del meta["config"]["lambda_kc"], meta["config"]["lambda_am"]
    card = render_card(meta, folder_features(protected_dir))
    assert card.data.to_dict()["uge_hf"]["loss_weights"]["kc"] == 0.0
    assert card.data.to_dict()["uge_hf"]["loss_weights"]["am"] == 0.0
    assert "loss weights (gm, am, fd, kc, ud, bind) | 1.0, 0.0, 1.0, 0.0, 0.0, 0.0" in card.text
    assert "| gradient matching | one search step in 2 |" in card.text
    # How often it matched, and which keys, tells the preset large (3 on every step) from lambda_gm=3 on every 2nd step;
    # a folder from before match_every_key (and before public records withheld it) took turns.
    meta["keys"] = meta["keys"] * 2
    assert "| gradient matching | one search step in 2, which keys each time not recorded |" in render_card(meta, folder_features(protected_dir)).text
    assert meta.pop("withheld") == ["match_every_key"] and "match_every_key" not in meta["config"]
    assert "| gradient matching | one search step in 2, the keys in turn |" in render_card(meta, folder_features(protected_dir)).text
    meta["config"].update(gm_every=1, match_every_key=True)
    assert "| gradient matching | every search step, every key each time |" in render_card(meta, folder_features(protected_dir)).text
    # What ran, not what was asked: with no other term every step matched; with no matching term none did.
    meta["config"].update(gm_every=2, lambda_fd=0.0)
    assert "| gradient matching | every search step, every key each time |" in render_card(meta, folder_features(protected_dir)).text
    meta["config"].update(lambda_gm=0.0, lambda_fd=1.0)
    assert "| gradient matching | off |" in render_card(meta, folder_features(protected_dir)).text


def test_the_card_calls_a_perturbation_hard_to_see_only_within_the_usual_budget(protected_dir):
    from uge_hf.card import render_card
    from uge_hf.folder import folder_features, read_metadata

    meta = read_metadata(protected_dir)
    assert "a small, hard-to-see\nperturbation (‖δ‖∞ ≤ 8.0/255" in render_card(meta, folder_features(protected_dir)).text
    meta["config"]["epsilon"] = 1.0
    text = render_card(meta, folder_features(protected_dir)).text
    assert "hard-to-see" not in text and "a bounded\nperturbation (larger than the field's usual 8/255: it may be visible) (‖δ‖∞ ≤ 255.0/255" in text


def test_a_card_template_is_kept_by_push_and_by_evaluate(tmp_path, small_train, key, fast_config, hub_token):
    """The template protect was given is recorded, so the card rendered later (push, evaluate --update-card) keeps it."""
    from uge_hf import protect
    from uge_hf.card import default_template, record_efficacy

    template = tmp_path / "mine.md"
    template.write_text(default_template().read_text() + "\nOUR LAB'S NOTE for {{ repo_id }}\n")
    out = tmp_path / "out"
    protect(small_train, key, fast_config, output_dir=out, card_template=template, verbose=False)
    assert "OUR LAB'S NOTE for <your-namespace>/<this-dataset>" in (out / "README.md").read_text()
    record_efficacy(out, {"rows": [], "summary": {}, "epochs": 1})
    assert "OUR LAB'S NOTE" in (out / "README.md").read_text()
    push_to_hub(out, "tester/templated")
    assert "OUR LAB'S NOTE for tester/templated" in open(hf_hub_download("tester/templated", "README.md", repo_type="dataset")).read()

import hashlib
import json

import pytest
import torch

from uge_hf import AuthorizedModel


def test_same_seed_same_fingerprint_other_seed_other(key):
    assert AuthorizedModel.create("convnet", 10, seed=0).fingerprint == key.fingerprint
    assert key.sibling(1).fingerprint != key.fingerprint


def test_a_drawn_key_has_more_than_the_32_bits_torch_keeps_of_a_seed():
    """torch.manual_seed(s) and torch.manual_seed(s + 2**32) give the same numbers: a key drawn
    from a 63-bit seed would be one of 2**32 per architecture, which a search covers."""
    from uge_hf.key import SEED_SPACE
    from uge_hf.models import create_model

    big = SEED_SPACE + 5
    torch.manual_seed(5)
    low = AuthorizedModel.from_module("convnet", create_model("convnet", 10), 10)
    assert AuthorizedModel.create("convnet", 10, seed=5).fingerprint == low.fingerprint  # small seeds: torch.manual_seed
    drawn = AuthorizedModel.create("convnet", 10, seed=big)
    assert drawn.fingerprint != low.fingerprint and drawn.fingerprint == AuthorizedModel.create("convnet", 10, seed=big).fingerprint
    assert drawn.fingerprint != AuthorizedModel.create("convnet", 10, seed=big + SEED_SPACE).fingerprint
    # Each tensor is drawn as the model's own initialization draws it (same shapes, same scale).
    reference = create_model("convnet", 10).state_dict()
    for name, tensor in drawn.state_dict.items():
        assert tensor.shape == reference[name].shape
        if tensor.is_floating_point() and tensor.numel() > 100:
            assert 0.8 < float(tensor.std() / reference[name].std()) < 1.25


def test_fingerprint_survives_save_and_load(tmp_path, key):
    key.save_pretrained(tmp_path)
    loaded = AuthorizedModel.from_pretrained(tmp_path)
    assert loaded.fingerprint == key.fingerprint
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "convnet"
    assert key.weights_file_sha256 == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()


def test_fingerprint_is_independent_of_tensor_order(key):
    reordered = AuthorizedModel("convnet", dict(reversed(list(key.state_dict.items()))), 10)
    assert reordered.fingerprint == key.fingerprint


def test_any_weight_change_changes_fingerprint(key):
    for name in list(key.state_dict)[:3]:
        weights = {k: v.clone() for k, v in key.state_dict.items()}
        weights[name].view(-1)[0] += 1e-6
        assert AuthorizedModel("convnet", weights, 10).fingerprint != key.fingerprint


def test_build_gives_fresh_theta0(key):
    model = key.build()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert key.build().state_dict()["features.1.weight"].equal(key.state_dict["features.1.weight"])


def test_tampered_weights_are_refused(tmp_path, key):
    key.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["fingerprint"] = "0" * 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights were changed"):
        AuthorizedModel.from_pretrained(tmp_path)


def test_missing_weights_say_how_to_make_a_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="uge-hf keygen"):
        AuthorizedModel.from_pretrained(tmp_path)


def test_public_key_push_needs_explicit_consent(key):
    with pytest.raises(ValueError, match="allow_public=True"):
        key.push_to_hub("someone/key", private=False)


@pytest.mark.parametrize("change", [{"architecture": "resnet-small"}, {"num_classes": 12}])
def test_weights_of_another_model_are_refused_in_one_line_that_says_how_they_differ(tmp_path, key, change, capsys):
    from uge_hf.cli import main

    key.save_pretrained(tmp_path / "key")
    config = json.loads((tmp_path / "key" / "config.json").read_text())
    (tmp_path / "key" / "config.json").write_text(json.dumps({**config, **change, "fingerprint": None}))
    with pytest.raises(ValueError, match="not those of a .*first: .*must name the architecture, classes and channels"):
        AuthorizedModel.from_pretrained(tmp_path / "key")
    assert main(["protect", str(tmp_path), "--key", str(tmp_path / "key"), "--out", str(tmp_path / "out")]) == 2  # the key loads first
    err = capsys.readouterr().err
    assert "first: classifier.weight (" in err and err.count("\n") == 1  # the whole reason, on the CLI's one line


def test_weights_of_another_dtype_are_refused_not_cast(key):
    """Cast on loading, a float16 key would have another file hash than the card records."""
    with pytest.raises(ValueError, match="of another dtype \\(first: .* torch.float16, not torch.float32\\); convert them .*module.float"):
        AuthorizedModel("convnet", {k: v.half() if v.is_floating_point() else v for k, v in key.state_dict.items()}, 10)

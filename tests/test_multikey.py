"""Several authorized keys for one protected release (issue 12), on real CIFAR-10 rows."""

import json
import warnings
from dataclasses import replace

import pytest
import torch
from huggingface_hub import DatasetCard

from uge_hf import AuthorizedModel, GuessableKeyWarning, MixedKeysWarning, ProtectConfig, UGETransform, load_protected, protect, verify
from uge_hf.cli import main
from uge_hf.hub import KeyMismatchError, TamperedShardError
from uge_hf.utils import sha256_file

from .conftest import CIFAR10


@pytest.fixture(scope="module")
def keys():
    return [AuthorizedModel.create("convnet", 10, seed=1), AuthorizedModel.create("resnet-small", 10, seed=2)]


@pytest.fixture(scope="module")
def config():
    return ProtectConfig.preset("fast", batch_size=60, trajectory_epochs=1, surrogate_epochs=1)


@pytest.fixture(scope="module")
def two_key_run(tmp_path_factory, cifar, keys, config):
    out = tmp_path_factory.mktemp("multikey") / "out"
    with pytest.warns(MixedKeysWarning, match="take turns") as caught:  # a convnet and a resnet-small key in turns
        protect(cifar["train"].select(range(120)), keys, config, output_dir=out, verbose=False)
    advice = [w for w in caught if issubclass(w.category, MixedKeysWarning)]
    assert len(advice) == 1 and advice[0].filename == __file__  # once per run, pointing at the caller
    return out


def test_every_key_verifies_and_is_named(two_key_run, keys):
    for i, key in enumerate(keys):
        report = verify(two_key_run, key)
        assert report["key_index"] == i and report["num_keys"] == 2
        ds, model = load_protected(two_key_run, key)
        assert len(ds["train"]) == 120 and AuthorizedModel.from_module(key.architecture, model, 10).fingerprint == key.fingerprint


def test_a_third_key_is_refused(two_key_run, keys):
    with pytest.raises(KeyMismatchError, match=" or "):
        verify(two_key_run, AuthorizedModel.create("convnet", 10, seed=3))


def test_card_lists_both_hashes_and_nothing_else_about_the_keys(two_key_run, keys):
    block = DatasetCard.load(two_key_run / "README.md").data.to_dict()["uge_hf"]
    assert block["key_fingerprints"] == [k.fingerprint for k in keys]
    assert block["key_weights_sha256"] == [k.weights_file_sha256 for k in keys]
    public = (two_key_run / "README.md").read_text() + (two_key_run / "uge_hf.json").read_text()
    assert "resnet-small" not in public and "convnet" not in public


def test_the_card_speaks_of_every_key(two_key_run):
    text = DatasetCard.load(two_key_run / "README.md").text
    assert "**2 authorized models**" in text and "authorized 2 models only" in text and "one authorized model" not in text


@pytest.mark.parametrize("edited", ["README.md", "uge_hf.json"])
def test_a_key_swapped_into_one_file_authorizes_nobody(tmp_path, two_key_run, keys, edited):
    """Swapping a third key's hashes into the card alone (or the metadata alone) must not let it in."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(two_key_run, copy)
    intruder = AuthorizedModel.create("convnet", 10, seed=3)
    path = copy / edited
    text = path.read_text().replace(keys[0].fingerprint, intruder.fingerprint)
    path.write_text(text.replace(keys[0].weights_file_sha256, intruder.weights_file_sha256))
    for key in (intruder, keys[1]):
        with pytest.raises(TamperedShardError, match="key hashes .* differ"):
            verify(copy, key)


def test_state_holds_one_trajectory_per_key(two_key_run, keys, config):
    state = UGETransform.from_pretrained(two_key_run.with_name("out.uge-state") / "state").state
    assert state.key_fingerprints == [k.fingerprint for k in keys]
    assert [len(t) for t in state.trajectories] == [config.trajectory_epochs + 1] * 2


def test_same_bytes_on_rerun(tmp_path, cifar, keys, config, two_key_run):
    again = tmp_path / "again"
    with pytest.warns(MixedKeysWarning):
        protect(cifar["train"].select(range(120)), keys, config, output_dir=again, verbose=False)
    for name in json.loads((two_key_run / "uge_hf.json").read_text())["shards"]:
        assert sha256_file(again / name) == sha256_file(two_key_run / name)


def test_keys_must_fit_the_same_data_and_be_distinct(cifar, keys, config, tmp_path):
    rows = cifar["train"].select(range(60))
    with pytest.raises(ValueError, match="given twice"):
        protect(rows, [keys[0], keys[0]], config, output_dir=tmp_path / "a", verbose=False)
    with pytest.raises(ValueError, match="disagree on"):
        protect(rows, [keys[0], AuthorizedModel.create("convnet", 12, seed=1)], config, output_dir=tmp_path / "b", verbose=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_keys_of_different_architectures_in_turns_are_warned_before_any_work(cifar, keys, config, tmp_path):
    rows = cifar["train"].select(range(60))
    # A state inside the output is refused right after the advice, before anything is written.
    overlapping = dict(output_dir=tmp_path / "o", state_dir=tmp_path / "o" / "state", verbose=False)
    with pytest.warns(MixedKeysWarning, match=r"^2 keys of 2 different architectures take turns in gradient matching, .* "
                      r"match_every_key=True \(uge-hf protect --match-every-key\) matches every key on each matching step"), \
            pytest.raises(ValueError, match="overlap"):
        protect(rows, keys, config, **overlapping)
    with pytest.warns(MixedKeysWarning, match="take turns"), pytest.raises(ValueError, match="column 'pixels' not found"):
        UGETransform.fit(rows, keys, config, image_column="pixels", verbose=False)  # the lower-level path, before decoding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys of one architecture, or every key matched on each step: no advice
        warnings.simplefilter("ignore", GuessableKeyWarning)  # the tests' keys are seeded
        for pair, setting in (([keys[0], AuthorizedModel.create("convnet", 10, seed=3)], config),
                              (keys, replace(config, match_every_key=True)), (keys[1], config),
                              (keys, replace(config, lambda_gm=0.0))):  # one key; nothing matched
            with pytest.raises(ValueError, match="overlap"):
                protect(rows, pair, setting, **overlapping)
    assert not (tmp_path / "o").exists()


def test_cli_takes_repeated_keys_and_verify_says_which_matched(tmp_path, keys, capsys):
    for i, key in enumerate(keys):
        key.save_pretrained(tmp_path / f"key{i}")
    out = tmp_path / "out"
    assert main(["protect", str(CIFAR10), "--split", "train", "--limit", "60", "--key", str(tmp_path / "key0"),
                 "--key", str(tmp_path / "key1"), "--out", str(out), "--preset", "fast", "--batch-size", "60", "--match-every-key",
                 "--quiet"]) == 0
    capsys.readouterr()
    # Public: not which keys were matched (it would hint that they differ in architecture); private: all of it, for a rerun.
    public = json.loads((out / "uge_hf.json").read_text())
    assert "match_every_key" not in public["config"] and public["withheld"] == ["match_every_key"]
    assert "match_every_key" not in DatasetCard.load(out / "README.md").data.to_dict()["uge_hf"]
    assert "| gradient matching | one search step in 2, which keys each time not recorded |" in (out / "README.md").read_text()
    assert UGETransform.from_pretrained(out.with_name("out.uge-state") / "state").state.config.match_every_key is True
    assert main(["verify", str(out), "--key", str(tmp_path / "key1")]) == 0
    assert "(key 2 of 2)" in capsys.readouterr().out


def test_evaluate_reports_each_key_and_can_be_made_small(two_key_run, keys, tmp_path, capsys):
    for i, key in enumerate(keys):
        key.save_pretrained(tmp_path / f"key{i}")
    results = tmp_path / "results.json"
    code = main(["evaluate", str(two_key_run), "--clean", str(CIFAR10), "--key", str(tmp_path / "key0"), "--key", str(tmp_path / "key1"),
                 "--hackers", "vgg-tiny", "--epochs", "1", "--limit", "60", "--test-size", "200", "--json", str(results), "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(results.read_text())
    assert data["train_rows"] == 60 and data["test_rows"] == 200
    assert set(data["summary"]["key_ratios"]) == {"key θ0", "key θ0 #2"}
    assert [r["model"] for r in data["rows"]] == ["key θ0", "key θ0 #2", "key arch, seed 7", "vgg-tiny"]


def test_evaluate_refuses_what_it_cannot_compare(two_key_run, keys, tmp_path, cifar, capsys):
    keys[0].save_pretrained(tmp_path / "key")
    code = main(["evaluate", str(two_key_run), "--clean", str(CIFAR10), "--key", str(tmp_path / "key"), "--test-split", "validation"])
    assert code == 2 and "no split 'validation'; its splits are: train, test; pass --test-split" in capsys.readouterr().err
    shuffled = tmp_path / "shuffled"
    cifar["train"].select(range(120)).shuffle(seed=0).to_parquet(str(shuffled / "data" / "train-00000-of-00001.parquet"))
    cifar["test"].select(range(10)).to_parquet(str(shuffled / "data" / "test-00000-of-00001.parquet"))
    code = main(["evaluate", str(two_key_run), "--clean", str(shuffled), "--key", str(tmp_path / "key")])
    assert code == 2 and "clean rows do not match the protected ones" in capsys.readouterr().err


def test_keys_take_turns_from_a_start_drawn_per_batch(two_key_run, cifar):
    from dataclasses import replace

    from uge_hf.data import load_tensors
    from uge_hf.objective import Objective, signed_gradient_search
    from uge_hf.utils import seeded_generator

    class Recorded(Objective):  # the real objective, noting which key each matching step matched
        def __call__(self, x, x_u, y, gen, match=True, key=None):
            if match:
                self.matched.append(key)
            return super().__call__(x, x_u, y, gen, match=match, key=key)

    state = UGETransform.from_pretrained(two_key_run.with_name("out.uge-state") / "state").state
    objective = Recorded(state)
    images, labels = load_tensors(cifar["train"], "img", "label", 3, rows=range(8), verbose=False)
    starts = set()
    for batch in range(8):
        objective.matched = []
        signed_gradient_search(objective, images.float() / 255, labels, seeded_generator(0, "turns", batch), steps=6)
        start = objective.matched[0]
        assert objective.matched == [start, 1 - start, start]  # steps 0, 2, 4 match (gm_every=2), alternating keys
        starts.add(start)
    assert starts == {0, 1}  # each key leads (and has the last match) on some batches
    # With no other term weighted, a step without matching would have nothing to descend: every step matches.
    objective = Recorded(replace(state, config=replace(state.config, lambda_fd=0.0)))
    objective.matched = []
    signed_gradient_search(objective, images.float() / 255, labels, seeded_generator(0, "turns", 0), steps=6)
    assert len(objective.matched) == 6


def test_match_every_key_matches_both_keys_on_each_matching_step(two_key_run, cifar):
    from dataclasses import replace

    import numpy as np

    from uge_hf.data import load_tensors
    from uge_hf.objective import Objective, signed_gradient_search
    from uge_hf.utils import seeded_generator

    state = UGETransform.from_pretrained(two_key_run.with_name("out.uge-state") / "state").state
    images, labels = load_tensors(cifar["train"], "img", "label", 3, rows=range(8), verbose=False)
    x = images.float() / 255
    search = lambda s: signed_gradient_search(Objective(s), x, labels, seeded_generator(0, "every"), steps=6)
    every = replace(state, config=replace(state.config, match_every_key=True))
    objective = Objective(every)
    calls = []  # forward passes of the key networks, which only gradient matching runs: on x, then on x_u
    for i, net in enumerate(objective.key_nets):
        net.register_forward_hook(lambda *_, i=i: calls.append(i))
    signed_gradient_search(objective, x, labels, seeded_generator(0, "every"), steps=6)
    assert calls == [0, 0, 1, 1] * 3  # steps 0, 2, 4 match (gm_every=2), each both keys
    # With one key the option changes nothing: the same bytes.
    one = replace(state, architectures=state.architectures[:1], key_fingerprints=state.key_fingerprints[:1],
                  trajectories=state.trajectories[:1])
    assert torch.equal(search(one), search(replace(one, config=replace(one.config, match_every_key=True))))
    # Matched together, the keys' terms are summed over √k (summed at the full weight they
    # over-served the keys and freed the hackers; averaged, a resnet-small key lost its own).
    # Every per-key term on; one checkpoint per trajectory, so that every call matches at the same weights.
    single = replace(every, config=replace(every.config, lambda_fd=0.0, lambda_am=0.5, lambda_kc=0.5, lambda_ud=0.5),
                     trajectories=[t[:1] + t[-1:] for t in every.trajectories])
    objective, x_u = Objective(single), (x + 4 / 255).clamp(0, 1)
    loss = lambda **key: objective(x, x_u, labels, seeded_generator(0, "loss"), **key)
    assert torch.allclose(loss(), (loss(key=0) + loss(key=1)) / 2 ** 0.5, rtol=1e-5)
    assert ProtectConfig(match_every_key=np.bool_(True)).match_every_key is True
    with pytest.raises(ValueError, match="match_every_key must be True or False"):
        ProtectConfig(match_every_key="yes")


def test_a_key_whose_file_hash_is_not_the_recorded_one_is_refused(tmp_path, two_key_run, keys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(two_key_run, copy)
    intruder = AuthorizedModel.create("convnet", 10, seed=3)
    for name in ("README.md", "uge_hf.json"):  # both files, the weight hash only: the file hash beside it stays the old key's
        (copy / name).write_text((copy / name).read_text().replace(keys[0].fingerprint, intruder.fingerprint))
    with pytest.raises(TamperedShardError, match="file hash .* is not the one recorded beside it"):
        verify(copy, intruder)

"""uge-hf is a security tool: each kind of fault of issue 8 (data loss, key leaks, publishing
more than meant, silent no-ops, unfaithful decoding, late refusals, dishonest interfaces),
one or more real inputs each, on real CIFAR-10 rows re-encoded as needed."""

import io
import json
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
from datasets import Array3D, Dataset, DatasetDict, Features, Image, Value, load_dataset
from huggingface_hub import HfApi

from uge_hf import AuthorizedModel, GuessableKeyWarning, ProtectConfig, UGETransform, load_protected, protect, push_to_hub, verify
from uge_hf.cli import main
from uge_hf.hub import TamperedShardError
from uge_hf.utils import sha256_file

from .conftest import CIFAR10


@pytest.fixture(scope="module")
def rows(cifar):
    """40 real training rows (a batch of 20 is two shards of the fast preset below)."""
    return cifar["train"].select(range(40))


@pytest.fixture(scope="module")
def fast():
    return ProtectConfig.preset("fast", batch_size=20, trajectory_epochs=1, surrogate_epochs=1)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def with_images(base: Dataset, images: list, **columns) -> Dataset:
    return Dataset.from_dict({"img": images, "label": base["label"][:len(images)], **columns},
                             features=Features({"img": Image(), "label": base.features["label"],
                                                **{c: Value("string") for c in columns}}))


def encoded(image: PIL.Image.Image, fmt: str, **save) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return {"bytes": buffer.getvalue(), "path": None}


def assert_refused(tmp_path, dataset, key, config, match, **kwargs):
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=match):
        protect(dataset, key, config, output_dir=out, verbose=False, **kwargs)
    assert not out.exists() and not out.with_name("refused.uge-state").exists()


# -- 1. never delete what uge-hf did not write ---------------------------------------------

def test_overwrite_never_deletes_a_folder_uge_hf_did_not_write(tmp_path, rows, key, fast):
    project = tmp_path / "proj"
    rows.to_parquet(str(project / "data" / "train-00000-of-00001.parquet"))
    (project / "notes.txt").write_text("mine")
    before = files_of(project)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds files uge-hf did not write.*notes.txt"):
            protect(rows, key, fast, output_dir=project, overwrite=overwrite, verbose=False)
    assert files_of(project) == before
    assert not (tmp_path / "proj.uge-state").exists()


def test_state_dir_holding_the_users_files_is_refused_not_emptied(tmp_path, rows, key, fast):
    private = tmp_path / "private"
    key.save_pretrained(private / "key")
    (private / "notes.txt").write_text("passwords")
    before = files_of(private)
    with pytest.raises(FileExistsError, match="state_dir .* holds files uge-hf did not write.*key"):
        protect(rows, key, fast, output_dir=tmp_path / "out", state_dir=private, verbose=False)
    assert files_of(private) == before and not (tmp_path / "out").exists()


def test_overwrite_replaces_only_the_files_of_the_earlier_run(tmp_path, rows, key, fast):
    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, shard_size=20, verbose=False)
    assert len(list((out / "data").iterdir())) == 2
    with pytest.raises(FileExistsError, match="holds another uge-hf run"):
        protect(rows, key, ProtectConfig.preset("fast", batch_size=40, trajectory_epochs=1, surrogate_epochs=1), output_dir=out,
                verbose=False)
    again = protect(rows, key, ProtectConfig.preset("fast", batch_size=40, trajectory_epochs=1, surrogate_epochs=1), output_dir=out,
                    overwrite=True, verbose=False)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]  # the old shards went with it
    assert len(again["train"]) == 40
    (out / "data" / "mine.txt").write_text("a user's file beside ours")
    with pytest.raises(FileExistsError, match="did not write.*mine.txt"):
        protect(rows, key, fast, output_dir=out, overwrite=True, verbose=False)
    assert (out / "data" / "mine.txt").exists()


def test_keygen_never_overwrites_a_key(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "key")]) == 0
    before = files_of(tmp_path / "key")
    assert main(["keygen", "--out", str(tmp_path / "key")]) == 2
    assert "already holds a key" in capsys.readouterr().err
    assert files_of(tmp_path / "key") == before


def test_a_rerun_removes_temporary_files_of_a_killed_writer(tmp_path, rows, key, fast):
    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, shard_size=20, verbose=False)
    shard = out / "data" / "train-00001-of-00002.parquet"
    expected = sha256_file(shard)
    stale = out / "data" / ".train-00001-of-00002.parquet.tmp-99999"
    stale.write_bytes(b"half a shard")
    shard.unlink()
    protect(rows, key, fast, output_dir=out, shard_size=20, verbose=False)
    assert not stale.exists() and sha256_file(shard) == expected


def test_a_killed_writers_temporary_card_or_manifest_is_not_taken_for_tampering(tmp_path, rows, key, fast):
    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    leftovers = [out / "..uge_hf_manifest.json.tmp-4242", out / ".README.md.tmp-4242"]  # as utils.temporary_name names them
    for path in leftovers:
        path.write_text("half written")
    assert verify(out, key)["shards_checked"] > 0
    (out / "data" / "extra.parquet").write_bytes(b"data slipped in")  # data beside the shards still is
    with pytest.raises(TamperedShardError, match="does not list: data/extra.parquet"):
        verify(out, key)
    (out / "data" / "extra.parquet").unlink()
    protect(rows, key, fast, output_dir=out, verbose=False)  # the same run again: it removes what its killed writers left
    assert not any(path.exists() for path in leftovers)


def test_two_runs_on_one_folder_the_second_is_refused_with_the_holders_pid(tmp_path, key):
    key.save_pretrained(tmp_path / "key")
    out = tmp_path / "out"
    common = [sys.executable, "-m", "uge_hf", "protect", str(CIFAR10), "--split", "train", "--limit", "400", "--key", str(tmp_path / "key"),
              "--out", str(out), "--quiet"]
    first = subprocess.Popen(common + ["--epsilon", "8/255"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out.with_name("out.uge-state") / "run.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(common + ["--epsilon", "2/255"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 4, second.stderr
        assert f"another uge-hf run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


# -- 2. the key stays secret -------------------------------------------------------------

def test_keys_come_from_the_os_random_source(tmp_path):
    a, b = AuthorizedModel.create("convnet", 10), AuthorizedModel.create("convnet", 10)
    assert a.fingerprint != b.fingerprint and max(a.seed, b.seed) >= 2**32  # both below: chance 2^-62


def test_explicit_seed_is_flagged_insecure(tmp_path, capsys):
    assert main(["keygen", "--seed", "0", "--out", str(tmp_path / "key")]) == 0
    assert "INSECURE" in capsys.readouterr().err.upper()


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_owner_only(tmp_path, rows, key, fast):
    key.save_pretrained(tmp_path / "key")
    assert mode(tmp_path / "key") == 0o700 and all(mode(p) == 0o600 for p in (tmp_path / "key").iterdir())
    protect(rows, key, fast, output_dir=tmp_path / "out", verbose=False)
    state = tmp_path / "out.uge-state"
    folders = [state] + [p for p in state.rglob("*") if p.is_dir()]
    assert folders and all(mode(p) == 0o700 for p in folders)
    secret_files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in secret_files) and all(mode(p) == 0o600 for p in secret_files)


def test_no_state_outlives_a_run_without_output_dir(tmp_path, rows, key, fast, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = protect(rows, key, fast, verbose=False)
    assert len(out["train"]) == 40
    leftovers = [p for p in tmp_path.rglob("*.safetensors")]
    assert leftovers == [], "θ0's trajectory must not stay behind in a temporary folder"


def test_a_key_from_a_small_seed_is_warned_of_without_naming_it(tmp_path, rows, fast):
    seeded = AuthorizedModel.create("resnet-small", 10, seed=3)  # what keygen --seed makes
    with pytest.warns(GuessableKeyWarning, match="^key 1 of 1 was created from a small explicit seed") as caught, \
            pytest.raises(ValueError, match="overlap"):  # refused right after the advice: nothing is written
        protect(rows, seeded, fast, output_dir=tmp_path / "o", state_dir=tmp_path / "o" / "s", verbose=False)
    assert caught[0].filename == __file__ and "resnet-small" not in str(caught[0].message) and " 3" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuessableKeyWarning)  # a key from the OS's random source: no advice
        with pytest.raises(ValueError, match="overlap"):
            protect(rows, AuthorizedModel.create("resnet-small", 10), fast, output_dir=tmp_path / "o", state_dir=tmp_path / "o" / "s",
                    verbose=False)
    assert not (tmp_path / "o").exists()


def test_card_and_metadata_say_nothing_that_narrows_the_search_for_the_key(tmp_path, rows, fast):
    key = AuthorizedModel.create("resnet-small", 10)
    key.source = {"repo_id": "acme/secret-key", "revision": "0" * 40}  # as if loaded from the Hub
    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    public = (out / "README.md").read_text() + (out / "uge_hf.json").read_text()
    for secret in ("resnet-small", "acme/secret-key", "0" * 40, str(key.seed)):
        assert secret not in public
    assert key.fingerprint in public
    # match_every_key is advised for keys of different architectures, so its value would hint at them.
    assert "match_every_key" not in json.loads((out / "uge_hf.json").read_text())["config"]
    assert "match_every_key:" not in (out / "README.md").read_text()
    disclosed = protect(rows, key, fast, output_dir=tmp_path / "disclosed", disclose_key_architecture=True, verbose=False)
    assert disclosed and "resnet-small" in (tmp_path / "disclosed" / "README.md").read_text()
    meta = json.loads((tmp_path / "disclosed" / "uge_hf.json").read_text())
    assert meta["config"]["match_every_key"] is False and meta["withheld"] == []


def test_the_run_id_a_manifest_records_is_keyed_with_theta0(rows, key, fast):
    """The hidden manifest records the run id, and `hf upload` would publish it: computed from
    what a reader knows of the key (its two hashes), it must not come out the same, or trying
    each value of a withheld config field would tell which one the run used."""
    from uge_hf.protection import run_id

    class Impostor(AuthorizedModel):  # the key's public hashes, other weights
        fingerprint = property(lambda self: key.fingerprint)
        weights_file_sha256 = property(lambda self: key.weights_file_sha256)

    impostor = Impostor("convnet", AuthorizedModel.create("convnet", 10, seed=1).state_dict, 10)
    run = lambda k: run_id([k], fast, {"train": rows}, ("img", "label"), "train", {"shard_size": 20}, None)
    assert run(key) == run(AuthorizedModel.from_module("convnet", key.build(), 10))  # the same θ0: the same run, to resume
    assert run(impostor) != run(key)


# -- 3. publishing publishes only what was meant -------------------------------------------

@pytest.mark.parametrize("entry", [{"files": ["../victim.txt"]}, {"files": ["/ABS/victim.txt"]}, {"dirs": ["../victims"]},
                                   {"stale": ["notes.txt"]}, {"stale_dirs": ["."]}])
def test_overwrite_deletes_nothing_a_crafted_manifest_names(tmp_path, rows, key, fast, entry):
    """The manifest says what --overwrite may delete; one that came with a download (or was
    edited) and names anything uge-hf never writes is refused, and nothing is deleted."""
    out, victims = tmp_path / "out", tmp_path / "victims"
    protect(rows, key, fast, output_dir=out, verbose=False)
    (tmp_path / "victim.txt").write_text("mine")
    (victims / "x").parent.mkdir()
    (victims / "x").write_text("mine")
    manifest = json.loads((out / ".uge_hf_manifest.json").read_text())
    entry = {k: [str(tmp_path / "victim.txt") if n == "/ABS/victim.txt" else n for n in v] for k, v in entry.items()}
    (out / ".uge_hf_manifest.json").write_text(json.dumps({**manifest, **{k: manifest.get(k, []) + v for k, v in entry.items()}}))
    before = files_of(tmp_path / "out")
    with pytest.raises(TamperedShardError, match="lists what uge-hf never writes.*nothing it names is deleted"):
        protect(rows, key, ProtectConfig.preset("fast", batch_size=40, trajectory_epochs=1, surrogate_epochs=1), output_dir=out,
                overwrite=True, verbose=False)
    assert (tmp_path / "victim.txt").read_text() == "mine" and (victims / "x").read_text() == "mine"
    assert files_of(tmp_path / "out") == before


def test_a_state_dir_inside_the_output_folder_is_refused_before_any_work(tmp_path, rows, key, fast):
    """The output folder is what gets published; θ0 must never be in it (nor the output in the state)."""
    for out, state in ((tmp_path / "out", tmp_path / "out" / "state"), (tmp_path / "b" / "out", tmp_path / "b")):
        with pytest.raises(ValueError, match="overlap: the state holds θ0.*choose a state_dir outside the output folder"):
            protect(rows, key, fast, output_dir=out, state_dir=state, verbose=False)
        assert not out.exists() and not state.exists()


def test_nothing_is_written_inside_a_key_folder_nor_a_key_inside_a_protected_one(tmp_path, rows, fast):
    """A key folder goes to a partner, a protected folder to the public: neither may carry the other."""
    key = AuthorizedModel.create("convnet", 10, seed=0)
    key.save_pretrained(tmp_path / "key")
    for where in ({"output_dir": tmp_path / "key" / "out"}, {"output_dir": tmp_path / "o", "state_dir": tmp_path / "key" / "s"}):
        with pytest.raises(ValueError, match="inside the key folder .*choose an output_dir \\(--out\\) and state_dir outside it"):
            protect(rows, AuthorizedModel.from_pretrained(tmp_path / "key"), fast, verbose=False, **where)
    assert sorted(p.name for p in (tmp_path / "key").iterdir()) == ["config.json", "model.safetensors"] and not (tmp_path / "o").exists()
    protect(rows, key, fast, output_dir=tmp_path / "o", verbose=False)
    with pytest.raises(FileExistsError, match="lies inside .*/o, a folder uge-hf protected"):
        key.save_pretrained(tmp_path / "o" / "keys" / "k")
    assert not (tmp_path / "o" / "keys").exists()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "uge_hf.json").write_text("{}")  # a stray file of that name does not make a protected folder
    assert key.save_pretrained(tmp_path / "home" / "keys" / "k").is_dir()


def test_a_state_dir_that_is_a_file_is_refused_naming_the_fix(tmp_path, rows, key, fast):
    (tmp_path / "out.uge-state").write_text("mine")
    with pytest.raises(FileExistsError, match="out.uge-state is a file, not a folder; pass a new or empty folder"):
        protect(rows, key, fast, output_dir=tmp_path / "out", verbose=False)
    assert (tmp_path / "out.uge-state").read_text() == "mine" and not (tmp_path / "out").exists()


def test_a_users_efficacy_figure_is_neither_deleted_nor_published(tmp_path, rows, key, fast):
    """protect does not write efficacy.png (evaluate --update-card does, and records it), so a
    user's file of that name is theirs: refused on overwrite, never pushed."""
    from uge_hf.hub import published_files

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    (out / "efficacy.png").write_bytes(b"mine")
    assert "efficacy.png" not in [name for name in published_files(out)]
    with pytest.raises(FileExistsError, match="did not write.*efficacy.png"):
        protect(rows, key, ProtectConfig.preset("fast", batch_size=40, trajectory_epochs=1, surrogate_epochs=1), output_dir=out,
                overwrite=True, verbose=False)
    assert (out / "efficacy.png").read_bytes() == b"mine"
    key.save_pretrained(tmp_path / "key")
    code = main(["evaluate", str(out), "--clean", str(CIFAR10), "--key", str(tmp_path / "key"), "--update-card", "--quiet"])
    assert code == 2 and (out / "efficacy.png").read_bytes() == b"mine"  # refused before training


def test_arrow_layout_files_are_never_trusted_as_paths(tmp_path, rows, key, fast, cifar):
    """load_from_disk opens whatever arrow/<split>/state.json names: only the listed, hashed
    files may be named there."""
    import shutil

    from uge_hf.folder import load_output

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, output_format="arrow", verbose=False)
    outside = next(f["filename"] for f in cifar["test"].cache_files)  # a real Arrow file outside the folder
    for field, value in (("_data_files", [{"filename": outside}]), ("_data_files", [{"filename": "../../x.arrow"}])):
        copy = tmp_path / f"copy-{abs(hash(str(value)))}"
        shutil.copytree(out, copy)
        state = copy / "arrow" / "train" / "state.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), field: value}))
        with pytest.raises(TamperedShardError, match="names a data file .* which uge_hf.json does not list"):
            load_output(copy)
    copy = tmp_path / "copy-split"
    shutil.copytree(out, copy)
    (copy / "arrow" / "dataset_dict.json").write_text(json.dumps({"splits": ["../../elsewhere"]}))
    with pytest.raises(TamperedShardError, match="names a split '../../elsewhere'"):
        load_output(copy)
    assert len(load_output(out)["train"]) == len(rows)


def test_a_cache_dir_holding_the_users_files_is_refused_not_taken(tmp_path, rows, key, fast):
    from uge_hf import UGETransform

    cache = tmp_path / "mine"
    cache.mkdir(mode=0o755)
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="cache_dir .* holds files uge-hf did not write \\(notes.txt\\)"):
        UGETransform.fit(rows, key, fast, cache_dir=cache, verbose=False)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755 and sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


def test_a_printed_state_shows_no_weights_nor_architecture(rows, key, fast):
    from uge_hf import UGETransform

    state = UGETransform.fit(rows, key, fast, verbose=False).state
    assert repr(state) == f"SharedState(keys=1, retraining_rounds=0, fingerprint={state.fingerprint[:12]}…)"


@pytest.fixture(scope="module")
def two_shard_run(tmp_path_factory, rows, key, fast):
    out = tmp_path_factory.mktemp("pub") / "run"
    protect(rows, key, fast, output_dir=out, shard_size=20, verbose=False)
    return out


def test_push_refuses_an_existing_public_repo_unless_publishing_is_meant(two_shard_run, key, hub_token):
    api = HfApi()
    api.create_repo("tester/public-data", repo_type="dataset", private=False)
    with pytest.raises(PermissionError, match="exists and is public.*private=False"):
        push_to_hub(two_shard_run, "tester/public-data")
    assert "uge_hf.json" not in api.list_repo_files("tester/public-data", repo_type="dataset")
    push_to_hub(two_shard_run, "tester/public-data", private=False)  # on purpose
    api.create_repo("tester/public-key", private=False)
    with pytest.raises(PermissionError, match="exists and is public"):
        key.push_to_hub("tester/public-key")
    assert "model.safetensors" not in api.list_repo_files("tester/public-key")


def test_a_second_push_replaces_the_first_runs_data_files(tmp_path, two_shard_run, rows, key, hub_token):
    push_to_hub(two_shard_run, "tester/replaced")
    one = tmp_path / "one"
    protect(rows.select(range(20)), key, ProtectConfig.preset("fast", batch_size=20, trajectory_epochs=1, surrogate_epochs=1),
            output_dir=one, verbose=False)
    push_to_hub(one, "tester/replaced")
    files = HfApi().list_repo_files("tester/replaced", repo_type="dataset")
    assert [f for f in files if f.startswith("data/")] == ["data/train-00000-of-00001.parquet"]
    assert len(load_dataset("tester/replaced", download_mode="force_redownload")["train"]) == 20
    verify("tester/replaced", key)


def test_manifest_names_are_never_trusted_as_paths(tmp_path, two_shard_run, key):
    import shutil

    for name in ("/etc/hostname", "/dev/zero", "../../etc/hostname", "data/../../x"):
        copy = tmp_path / f"copy{abs(hash(name))}"
        shutil.copytree(two_shard_run, copy)
        meta = json.loads((copy / "uge_hf.json").read_text())
        meta["shards"][name] = "0" * 64
        (copy / "uge_hf.json").write_text(json.dumps(meta))
        with pytest.raises(TamperedShardError, match="outside data/ or arrow/"):  # an integrity failure: exit 3
            verify(copy, key)


@pytest.mark.parametrize("where", ["../evil.parquet", "ABSOLUTE", ".cache/evil.parquet"])
def test_a_card_that_points_load_dataset_elsewhere_fails_verification(tmp_path, two_shard_run, rows, key, where):
    """The card's configs are what load_dataset reads: they must name exactly the verified shards,
    and load_protected reads those shards, whatever the card says."""
    import shutil

    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(two_shard_run, copy)
    evil = (tmp_path / "evil.parquet") if where == "ABSOLUTE" else (copy / where)
    evil.parent.mkdir(parents=True, exist_ok=True)
    rows.select(range(7)).map(lambda r: {"label": 0}).to_parquet(str(evil))
    text = (copy / "README.md").read_text()
    head, body = text.split("---\n", 2)[1:]
    card = yaml.safe_load(head)
    card["configs"][0]["data_files"][0]["path"] = [str(evil) if where == "ABSOLUTE" else where]
    del card["dataset_info"]["splits"]  # or datasets itself would notice 7 rows where 40 are recorded
    (copy / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n" + body)
    assert len(load_dataset(str(copy), download_mode="force_redownload")["train"]) == 7  # what an unchecked load reads
    with pytest.raises(TamperedShardError, match="card's configs point load_dataset at"):
        verify(copy, key)
    with pytest.raises(TamperedShardError):
        load_protected(copy, key)
    key.save_pretrained(tmp_path / "key")
    assert main(["verify", str(copy), "--key", str(tmp_path / "key")]) == 3


def test_verify_names_a_folder_that_is_no_protected_dataset(tmp_path, key, capsys):
    key.save_pretrained(tmp_path / "key")
    assert main(["verify", str(tmp_path / "key"), "--key", str(tmp_path / "key")]) == 2
    assert "has no uge_hf.json: not a folder written by uge_hf.protect" in capsys.readouterr().err


def test_an_unlisted_data_file_fails_verification(tmp_path, two_shard_run, rows, key, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(two_shard_run, copy)
    rows.select(range(10)).map(lambda r: {"label": 0}).to_parquet(str(copy / "data" / "train-extra.parquet"))
    with pytest.raises(TamperedShardError, match="does not list: data/train-extra.parquet"):
        verify(copy, key)
    key.save_pretrained(tmp_path / "key")
    assert main(["verify", str(copy), "--key", str(tmp_path / "key")]) == 3
    assert len(load_dataset(str(copy), download_mode="force_redownload")["train"]) == 40  # the card lists exact files


def test_copied_splits_carry_no_original_metadata(tmp_path, rows, key, fast):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe, jane@example.com")
    exif = PIL.Image.Exif()
    exif[0x013B] = "Jane Doe"  # Artist
    test = rows.select(range(4))
    images = [encoded(im, "PNG", pnginfo=info) if i % 2 else encoded(im, "JPEG", exif=exif, quality=95)
              for i, im in enumerate(test["img"])]
    ds = DatasetDict({"train": rows, "test": with_images(test, images)})
    out = protect(ds, key, fast, output_dir=tmp_path / "out", splits=["train"], verbose=False)
    for item, original in zip(out["test"].cast_column("img", Image(decode=False))["img"], ds["test"]["img"]):
        assert b"Jane Doe" not in item["bytes"] and item["path"] is None
        copied = PIL.Image.open(io.BytesIO(item["bytes"]))
        assert copied.format == "PNG" and not copied.info.get("Author") and not copied.getexif()
        assert np.array_equal(np.asarray(copied), np.asarray(original))  # the same pixels
    assert "pixel values changed" in (tmp_path / "out" / "README.md").read_text()


# -- 4. protection never silently does nothing ----------------------------------------------

@pytest.mark.parametrize("value", [1e-9, 0.5 / 255, True, "abc", None])
def test_config_refuses_what_cannot_protect(value):
    with pytest.raises(ValueError, match="epsilon"):
        ProtectConfig(epsilon=value)


def test_config_normalizes_numbers_at_construction():
    assert ProtectConfig(epsilon="8/255").epsilon == 8 / 255
    config = ProtectConfig(epsilon=np.float32(8 / 255), steps=np.int64(3), resize=[32, 32])
    assert type(config.epsilon) is float and type(config.steps) is int and config.resize == (32, 32)
    json.dumps(config.to_dict())  # plain JSON, as the card needs
    for bad in (dict(steps=0), dict(batch_size=True), dict(lambda_gm=0, lambda_fd=0), dict(resize=(4, 4))):
        with pytest.raises(ValueError):
            ProtectConfig(**bad)


@pytest.mark.parametrize("classes", ["1", "0", "-3"])
def test_keygen_refuses_fewer_than_two_classes(tmp_path, classes, capsys):
    assert main(["keygen", "--num-classes", classes, "--out", str(tmp_path / "k")]) == 2
    assert "num_classes must be an integer >= 2" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_epsilon_below_one_level_is_refused_by_the_cli(tmp_path, capsys):
    AuthorizedModel.create("convnet", 10).save_pretrained(tmp_path / "key")
    code = main(["protect", str(CIFAR10), "--split", "train", "--limit", "20", "--key", str(tmp_path / "key"),
                 "--out", str(tmp_path / "o"), "--epsilon", "1e-9", "--quiet"])
    assert code == 2 and "below one 8-bit level" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_class_data_is_refused(tmp_path, rows, key, fast):
    assert_refused(tmp_path, rows.filter(lambda r: r["label"] == 6), key, fast, "every row has label 6")


def test_perturbed_fraction_is_recorded_and_an_unchanged_output_is_never_published(tmp_path, rows, key, fast, monkeypatch):
    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    assert json.loads((out / "uge_hf.json").read_text())["perturbed_fraction"]["train"] > 0.5
    from uge_hf.transform import UGETransform

    monkeypatch.setattr(UGETransform, "perturb", lambda self, images, labels, device=None: list(images))
    with pytest.raises(RuntimeError, match="left every pixel unchanged"):
        protect(rows, key, fast, output_dir=tmp_path / "noop", verbose=False)
    assert not (tmp_path / "noop" / "uge_hf.json").exists() and not (tmp_path / "noop" / "README.md").exists()
    assert not list((tmp_path / "noop").rglob("*.parquet"))  # no clean copy left for load_dataset to find


def test_a_step_size_that_cannot_move_a_pixel_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"step_size 1e-06 over 4 step\(s\) moves a pixel at most .* leave step_size unset"):
        ProtectConfig.preset("fast", step_size=1e-6)
    assert ProtectConfig.preset("fast", step_size=0.5 / 255 / 4).step_size  # half a level in all: some pixels can move


# -- 5. what the user sees is what gets protected --------------------------------------------

def test_exif_orientation_is_applied_as_datasets_shows_it(tmp_path, rows, key, fast):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    images = [encoded(im.resize((40, 24)), "JPEG", exif=exif, quality=95) for im in rows["img"][:20]]
    ds = with_images(rows, images)
    shown = ds[0]["img"].size
    assert shown == (24, 40)
    out = protect(ds, key, fast, output_dir=tmp_path / "out", verbose=False)
    assert {im.size for im in out["train"]["img"]} == {shown}


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, rows, key):
    gray = [np.asarray(im.convert("L"), dtype=np.uint16) * 257 for im in rows["img"][:20]]
    images = [encoded(PIL.Image.fromarray(a), "PNG") for a in gray]
    ds = with_images(rows, images)
    assert ds[0]["img"].mode == "I;16"
    gray_key = AuthorizedModel.create("convnet", 10, in_channels=1)
    out = protect(ds, gray_key, ProtectConfig.preset("fast", batch_size=20, trajectory_epochs=1, surrogate_epochs=1),
                  output_dir=tmp_path / "out", verbose=False)
    got = np.stack([np.asarray(im, dtype=int) for im in out["train"]["img"]])
    want = np.stack([a.astype(int) // 257 for a in gray])
    assert np.abs(got - want).max() <= 8 and abs(got.mean() - want.mean()) < 2


def test_float_images_are_refused_naming_the_row(tmp_path, rows, key, fast):
    images = [np.asarray(im.convert("L"), dtype=np.float32) / 255 for im in rows["img"][:20]]
    assert_refused(tmp_path, with_images(rows, images), key, fast, "row 0 of column 'img'.*32-bit float image")


# -- 6. refuse up front what cannot work, naming the row -------------------------------------

def test_a_tiny_image_among_normal_ones_is_refused_naming_its_row(tmp_path, rows, key, fast):
    images = list(rows["img"][:20])
    images[13] = images[13].resize((4, 4))
    assert_refused(tmp_path, with_images(rows, images), key, fast, "row 13 .* is 4x4: the key needs at least 8x8.*resize")


def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path, rows, key, fast):
    huge = PIL.Image.new("RGB", (9000, 9000))
    images = [encoded(im, "PNG") for im in rows["img"][:3]] + [encoded(huge, "PNG", compress_level=9)]
    assert len(images[-1]["bytes"]) < 1_000_000
    start = time.perf_counter()
    assert_refused(tmp_path, with_images(rows, images), key, fast, "row 3 .* 9000x9000 .*resize=")
    assert time.perf_counter() - start < 5  # the header said enough


def test_a_batch_that_cannot_fit_in_memory_is_refused(tmp_path, rows, key):
    config = ProtectConfig.preset("fast", resize=(4096, 4096))
    assert_refused(tmp_path, rows, key, config, "search would need about .* GiB .*batch_size")


def test_missing_labels_are_refused_naming_the_row(tmp_path, rows, key, fast):
    labels = list(rows["label"][:20])
    labels[5] = None
    ds = Dataset.from_dict({"img": rows["img"][:20], "label": labels}, features=rows.features)
    assert_refused(tmp_path, ds, key, fast, "row 5 has no label")


def test_a_second_image_column_is_refused(tmp_path, rows, key, fast):
    ds = Dataset.from_dict({"img": rows["img"][:20], "thumb": rows["img"][:20], "label": rows["label"][:20]},
                           features=Features({"img": Image(), "thumb": Image(), "label": rows.features["label"]}))
    assert_refused(tmp_path, ds, key, fast, "'thumb'.* would be published unprotected", image_column="img")


def test_an_array_column_is_not_an_image_column(tmp_path, rows, key, fast):
    arrays = [np.asarray(im, dtype=np.uint8) for im in rows["img"][:20]]
    ds = Dataset.from_dict({"pixels": arrays, "label": rows["label"][:20]},
                           features=Features({"pixels": Array3D((32, 32, 3), "uint8"), "label": rows.features["label"]}))
    assert_refused(tmp_path, ds, key, fast, "column 'pixels' holds Array3D, not images", image_column="pixels")


def test_grayscale_data_with_a_color_key_points_to_a_grayscale_key(tmp_path, rows, key, fast):
    ds = with_images(rows, [im.convert("L") for im in rows["img"][:20]])
    assert_refused(tmp_path, ds, key, fast, "grayscale .* in_channels=1")


def test_color_data_with_a_grayscale_key_is_refused_not_published_gray(tmp_path, rows, fast):
    gray_key = AuthorizedModel.create("convnet", 10, in_channels=1)
    assert_refused(tmp_path, rows.select(range(20)), gray_key, fast, "holds color images \\(modes RGB\\) but the key takes 1 channel")
    as_gray = rows.select(range(20)).cast_column("img", Image(mode="L"))  # what the error offers: grayscale on purpose
    assert protect(as_gray, gray_key, fast, output_dir=tmp_path / "gray", verbose=False)["train"][0]["img"].mode == "L"


def test_unsigned_labels_are_accepted(tmp_path, rows, key, fast):
    ds = rows.cast_column("label", Value("uint8"))
    out = protect(ds, key, fast, output_dir=tmp_path / "out", label_column="label", verbose=False)
    assert out["train"]["label"][:] == rows["label"][:]


# -- 7. honest interfaces ------------------------------------------------------------------

def test_verify_exit_codes_mean_one_thing_each(tmp_path, two_shard_run, key, capsys):
    import shutil

    key.save_pretrained(tmp_path / "key")
    AuthorizedModel.create("convnet", 10).save_pretrained(tmp_path / "other")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "corrupt" / "config.json").write_text("{}")
    tampered = tmp_path / "tampered"
    shutil.copytree(two_shard_run, tampered)
    shard = tampered / "data" / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-4] + b"0000")
    cases = [(str(two_shard_run), "key", 0), (str(two_shard_run), "other", 1), (str(tampered), "key", 3),
             (str(two_shard_run), "corrupt", 2), (str(tmp_path / "missing"), "key", 2)]
    for dataset, key_dir, expected in cases:
        assert main(["verify", dataset, "--key", str(tmp_path / key_dir)]) == expected, (dataset, key_dir)
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1


def test_a_rerun_with_another_layout_is_refused(tmp_path, rows, key, fast):
    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, shard_size=20, verbose=False)
    with pytest.raises(FileExistsError, match="holds another uge-hf run"):
        protect(rows, key, fast, output_dir=out, shard_size=40, verbose=False)


def test_evaluate_refuses_a_key_that_verify_refuses(tmp_path, two_shard_run, capsys):
    AuthorizedModel.create("convnet", 10).save_pretrained(tmp_path / "other")
    code = main(["evaluate", str(two_shard_run), "--clean", str(CIFAR10), "--key", str(tmp_path / "other"), "--update-card",
                 "--epochs", "1", "--quiet"])
    assert code == 1 and "does not match" in capsys.readouterr().err
    assert "Measured efficacy" not in (two_shard_run / "README.md").read_text()


def test_limit_records_the_rows_really_protected(tmp_path, rows, key):
    small = tmp_path / "small"
    rows.to_parquet(str(small / "data" / "train-00000-of-00001.parquet"))
    key.save_pretrained(tmp_path / "key")
    assert main(["protect", str(small), "--split", "train", "--limit", "1000", "--key", str(tmp_path / "key"),
                 "--out", str(tmp_path / "out"), "--preset", "fast", "--batch-size", "20", "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "uge_hf.json").read_text())["source"]["rows"] == 40


def test_hub_failures_are_one_line_errors(two_shard_run, key, tmp_path, hub_server, capsys):
    key.save_pretrained(tmp_path / "key")
    assert main(["verify", "tester/no-such-dataset", "--key", str(tmp_path / "key")]) == 2
    assert main(["verify", str(tmp_path / "no" / "folder"), "--key", str(tmp_path / "key")]) == 2
    assert main(["push", str(two_shard_run), "tester/no-token"]) == 2  # no HF_TOKEN: the server answers 401
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in "".join(errors)
    assert "no Hub dataset repo 'tester/no-such-dataset'" in errors[0] and "no folder" in errors[1] and "HF_TOKEN" in errors[2]


def test_an_edited_card_is_never_overwritten(tmp_path, rows, key, fast):
    """A Hub user edits README.md: a rerun, an overwrite and evaluate --update-card refuse to replace it, before any work."""
    from uge_hf.card import record_efficacy
    from uge_hf.cli import main

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    record_efficacy(out, {"rows": [], "summary": {}, "epochs": 1})  # uge-hf's own rewrite is recorded as its own
    protect(rows, key, fast, output_dir=out, verbose=False)  # and a rerun may replace it
    card = out / "README.md"
    card.write_text(card.read_text() + "\nMY OWN NOTES\n")
    shards = {p: p.read_bytes() for p in (out / "data").iterdir()}
    for attempt in (lambda: protect(rows, key, fast, output_dir=out, verbose=False),
                    lambda: protect(rows, key, replace(fast, steps=3), output_dir=out, overwrite=True, verbose=False),
                    lambda: record_efficacy(out, {"rows": [], "summary": {}, "epochs": 1})):
        with pytest.raises(FileExistsError, match="README.md was edited since uge-hf wrote it.*card_template"):
            attempt()
    key.save_pretrained(tmp_path / "key")
    code = main(["evaluate", str(out), "--clean", str(CIFAR10), "--key", str(tmp_path / "key"), "--update-card", "--quiet"])
    assert code == 2 and card.read_text().endswith("MY OWN NOTES\n")
    with pytest.raises(FileExistsError, match="was edited since uge-hf wrote it"):  # push renders the card afresh
        push_to_hub(out, "tester/edited")
    assert shards == {p: p.read_bytes() for p in (out / "data").iterdir()} and not (out / ".uge_hf_partial").exists()
    card.unlink()  # moved away: the run may write its card again
    protect(rows, key, fast, output_dir=out, verbose=False)
    assert "MY OWN NOTES" not in card.read_text()


def test_a_card_edited_while_a_run_goes_on_is_not_overwritten(tmp_path, rows, key, fast, monkeypatch):
    import uge_hf.protection

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    card, write_card = out / "README.md", uge_hf.protection.write_card

    def write_then_edit(*args, **kwargs):  # the user edits the published card while the new run finishes
        written = write_card(*args, **kwargs)
        card.write_text(card.read_text() + "MY EDIT\n")
        return written

    monkeypatch.setattr(uge_hf.protection, "write_card", write_then_edit)
    with pytest.raises(FileExistsError, match="was edited since uge-hf wrote it"):
        protect(rows, key, replace(fast, steps=3), output_dir=out, overwrite=True, verbose=False)
    monkeypatch.undo()
    assert card.read_text().endswith("MY EDIT\n") and verify(out, key)["shards_checked"] > 0  # the old run, whole
    card.unlink()
    assert len(protect(rows, key, replace(fast, steps=3), output_dir=out, overwrite=True, verbose=False)["train"]) == 40


def test_a_run_killed_while_put_in_place_is_named_and_its_rerun_overwrites_no_edit(tmp_path, rows, key, fast, monkeypatch):
    """Killed while moving a new run into place (the data moves first, the card last), the
    folder is named as unfinished, not as tampered with; the rerun refuses to replace a card
    edited meanwhile, and does not carry the replaced run's efficacy table over."""
    import os

    from uge_hf.card import record_efficacy

    from uge_hf.folder import has_figure, record_figure

    out, move = tmp_path / "out", os.replace
    protect(rows, key, fast, output_dir=out, verbose=False)
    record_figure(out).write_bytes(b"\x89PNG drawn by evaluate")
    record_efficacy(out, {"rows": [], "summary": {}, "epochs": 99, "figure": "efficacy.png"})

    def killed_at_the_first_shard(src, dst):
        if ".uge_hf_partial" in str(src) and ".uge_hf_partial" not in str(dst) and str(dst).endswith(".parquet"):
            raise KeyboardInterrupt
        move(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_first_shard)
    with pytest.raises(KeyboardInterrupt):
        protect(rows, key, replace(fast, steps=3), output_dir=out, overwrite=True, verbose=False)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="interrupted while its files were put in place.*rerun the same protect command"):
        verify(out, key)
    card = out / "README.md"
    card.write_text(card.read_text() + "MY EDIT\n")
    with pytest.raises(FileExistsError, match="was edited since uge-hf wrote it"):
        protect(rows, key, replace(fast, steps=3), output_dir=out, overwrite=True, verbose=False)
    assert card.read_text().endswith("MY EDIT\n")
    card.unlink()  # moved away: the rerun finishes the move
    protect(rows, key, replace(fast, steps=3), output_dir=out, overwrite=True, verbose=False)
    assert verify(out, key)["shards_checked"] > 0 and "MY EDIT" not in card.read_text()
    # The replaced run's measurement is not this one's: neither its table nor its figure stays recorded.
    assert json.loads((out / "uge_hf.json").read_text())["efficacy"] is None
    assert "efficacy.png" not in json.loads((out / ".uge_hf_manifest.json").read_text())["files"] and not has_figure(out)


def test_a_rerun_keeps_the_figure_evaluate_drew(tmp_path, rows, key, fast):
    from uge_hf.card import record_efficacy
    from uge_hf.folder import has_figure, record_figure

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    record_figure(out).write_bytes(b"\x89PNG drawn by evaluate")
    row = {"model": "vgg-tiny", "attack": "none", "protected_acc": 20.0, "clean_acc": 50.0, "ratio": 0.4, "seconds": 3.0}
    record_efficacy(out, {"rows": [row], "summary": {}, "epochs": 1, "figure": "efficacy.png"})
    card = (out / "README.md").read_bytes()
    protect(rows, key, fast, output_dir=out, verbose=False)  # same run: the card still shows the figure, so it stays
    assert has_figure(out) and "(efficacy.png)" in (out / "README.md").read_text()
    assert (out / "README.md").read_bytes() == card  # the same card, byte for byte
    assert record_figure(out) == out / "efficacy.png"  # still uge-hf's after the rerun: evaluate may redraw it


def test_a_figure_put_where_an_interrupted_drawing_was_is_not_taken_for_uge_hfs(tmp_path, rows, key, fast):
    """evaluate --update-card claims efficacy.png before drawing it; interrupted there, a file the
    user puts in its place later is neither replaced nor published."""
    from uge_hf.folder import has_figure, record_figure
    from uge_hf.hub import published_files

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, verbose=False)
    record_figure(out)  # ... and the drawing never happened
    (out / "efficacy.png").write_bytes(b"mine")
    assert not has_figure(out) and "efficacy.png" not in published_files(out)
    with pytest.raises(FileExistsError, match="was not written by uge-hf"):
        record_figure(out)
    assert (out / "efficacy.png").read_bytes() == b"mine"


def test_a_card_template_that_is_no_file_or_no_valid_jinja_is_refused_before_any_work(tmp_path, rows, key, fast):
    assert_refused_error = pytest.raises(FileNotFoundError, match="card_template .* is not a file")
    with assert_refused_error:
        protect(rows, key, fast, output_dir=tmp_path / "refused", card_template=tmp_path / "nope.md", verbose=False)
    broken = tmp_path / "broken.md"
    broken.write_text("# {{ pretty_name }}\n\n{% if efficacy %}no end\n")
    with pytest.raises(ValueError, match="broken.md, line 3: .*fix the template"):
        protect(rows, key, fast, output_dir=tmp_path / "refused", card_template=broken, verbose=False)
    assert not (tmp_path / "refused").exists()


def test_a_rerun_keeps_the_measured_efficacy(tmp_path, rows, key, fast):
    from uge_hf.card import record_efficacy

    out = tmp_path / "out"
    protect(rows, key, fast, output_dir=out, disclose_key_architecture=True, verbose=False)
    rows_ = [{"model": "key θ0", "attack": "none", "clean_acc": 50.0, "protected_acc": 49.0, "ratio": 0.98}]
    record_efficacy(out, {"rows": rows_, "summary": {}, "epochs": 15})
    assert json.loads((out / "uge_hf.json").read_text())["efficacy"]["rows"] == rows_  # disclosed: all of it
    protect(rows, key, fast, output_dir=out, verbose=False)  # same run, no longer disclosed: resumes, rewrites the card
    kept = json.loads((out / "uge_hf.json").read_text())["efficacy"]["rows"]
    assert kept[0]["ratio"] == 0.98 and kept[0]["clean_acc"] is None and "50.00" not in (out / "README.md").read_text()
    assert "## Measured efficacy" in (out / "README.md").read_text()


def test_saving_a_state_never_overwrites_or_repermissions_a_users_folder(tmp_path, rows, key, fast):
    from uge_hf.transform import UGETransform

    transform = UGETransform.fit(rows, key, fast, verbose=False)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    (mine / "state.json").write_text('{"my": "notes"}')
    (mine / "notes.txt").write_text("keep me")
    before = files_of(mine)
    with pytest.raises(FileExistsError, match=r"holds files uge-hf did not write \(notes.txt\)"):
        transform.save_pretrained(mine)
    (mine / "notes.txt").unlink()
    with pytest.raises(FileExistsError, match=r"holds files uge-hf did not write \(state.json\)"):  # not a state uge-hf saved
        transform.save_pretrained(mine)
    assert files_of(mine) == {"state.json": before["state.json"]} and stat.S_IMODE(mine.stat().st_mode) == 0o755
    transform.save_pretrained(tmp_path / "saved")
    transform.save_pretrained(tmp_path / "saved")  # its own earlier save may be replaced
    assert UGETransform.from_pretrained(tmp_path / "saved").fingerprint == transform.fingerprint


def test_a_run_without_the_misalignment_is_flagged_as_unprotected(tmp_path, rows, key, fast):
    from dataclasses import replace

    with pytest.warns(UserWarning, match="lambda_fd=0: .* it is not protected"), pytest.raises(ValueError, match="splits is empty"):
        protect(rows, key, replace(fast, lambda_fd=0.0), splits=[], output_dir=tmp_path / "o", verbose=False)


def test_a_large_dataset_under_weak_matching_is_warned_before_any_work(tmp_path, cifar, key, rows, fast, monkeypatch):

    import uge_hf.config
    from uge_hf.config import LARGE_DATASET_ROWS, LargeDatasetWarning, large_dataset_advice

    large = cifar["train"].select(range(LARGE_DATASET_ROWS))
    # A state inside the output is refused right after the advice, before anything is written.
    overlapping = dict(output_dir=tmp_path / "o", state_dir=tmp_path / "o" / "state", verbose=False)
    with pytest.warns(LargeDatasetWarning, match=r"10,000 rows with a gradient-matching weight of 0.5 per step, below the "
                      r"preset large's 3: .* lost the key's learnability .* Pass ProtectConfig.preset\('large'\)"), \
            pytest.raises(ValueError, match="overlap"):
        protect(large, key, ProtectConfig(), **overlapping)
    # Two keys under the default are advised alike.
    partner = AuthorizedModel.create("convnet", num_classes=10, seed=1)
    with pytest.warns(LargeDatasetWarning, match=r"weight of 0.5 per step"), pytest.raises(ValueError, match="overlap"):
        protect(large, [key, partner], ProtectConfig(), **overlapping)
    # A partner may train on every protected split together, not only the one the state is fitted on.
    halves = DatasetDict({"train": large.select(range(100)), "test": large.select(range(100, LARGE_DATASET_ROWS))})
    with pytest.warns(LargeDatasetWarning, match=r"^10,000 rows"), pytest.raises(ValueError, match="overlap"):
        protect(halves, key, ProtectConfig(), **overlapping)
    assert not (tmp_path / "o").exists()
    # The lower-level path advises too, before it decodes anything.
    with pytest.warns(LargeDatasetWarning, match=r"^10,000 rows"), pytest.raises(ValueError, match="column 'pixels' not found"):
        UGETransform.fit(large, key, ProtectConfig(), image_column="pixels", verbose=False)
    # Without other terms every search step matches, whatever gm_every says: full weight.
    assert large_dataset_advice(LARGE_DATASET_ROWS, ProtectConfig(lambda_gm=3.0, lambda_fd=0.0)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no advice where the matching is strong enough, or the rows few enough
        warnings.simplefilter("ignore", GuessableKeyWarning)  # the tests' keys are seeded
        for data, keys, config in ((large, key, ProtectConfig.preset("large")), (large, key, ProtectConfig.preset("key-first")),
                                   (large, [key, partner], ProtectConfig.preset("large")),  # in turns: each held as one key
                                   (large.select(range(LARGE_DATASET_ROWS - 1)), key, ProtectConfig())):
            with pytest.raises(ValueError, match="overlap"):
                protect(data, keys, config, **overlapping)
    # A whole run, with the threshold lowered to its 40 rows: the advice once, pointing at the caller.
    monkeypatch.setattr(uge_hf.config, "LARGE_DATASET_ROWS", len(rows))
    with pytest.warns(LargeDatasetWarning) as caught:
        protect(rows, key, fast, verbose=False)
    advice = [w for w in caught if issubclass(w.category, LargeDatasetWarning)]
    assert len(advice) == 1 and advice[0].filename == __file__


def test_no_split_to_protect_and_a_file_as_output_are_clear_errors(tmp_path, rows, key, fast):
    with pytest.raises(ValueError, match="splits is empty: nothing to protect; name at least one of: train"):
        protect(DatasetDict({"train": rows}), key, fast, splits=[], output_dir=tmp_path / "o", verbose=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        protect(rows, key, fast, output_dir=tmp_path / "afile", verbose=False)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "afile.uge-state").exists()


def test_arrow_output_is_the_same_bytes_on_rerun(tmp_path, rows, key, fast):
    first, second = tmp_path / "a" / "out", tmp_path / "b" / "out"
    for out in (first, second):
        protect(rows, key, fast, output_dir=out, output_format="arrow", verbose=False)
    assert files_of(first) == files_of(second)
    assert not any(str(tmp_path).encode() in data for data in files_of(first).values())  # no protector's path inside

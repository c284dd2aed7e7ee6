"""The pipeline under stress: several processes, interruption, other inputs, progress."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_dataset, load_from_disk

from uge_hf import protect, push_to_hub
from uge_hf.utils import sha256_file

from .conftest import CIFAR10

PROTECT = ["protect", str(CIFAR10), "--split", "train", "--limit", "200", "--preset", "fast", "--batch-size", "50",
           "--shard-size", "50", "--quiet"]


# A run's setting by name: the two modes, and a retraining round (whose pass over the fit rows the processes share out).
MODES = {"per-sample": ["--mode", "per-sample"], "generator": ["--mode", "generator"],
         "retrain": ["--mode", "per-sample", "--retrain-rounds", "1"]}


def run_env():
    # Bytes are identical across process counts at equal threads per process (weight-gradient
    # reductions depend on the thread split), so every run here computes on one thread.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def folder_digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    from uge_hf import AuthorizedModel

    path = tmp_path_factory.mktemp("pipeline") / "key"
    AuthorizedModel.create("convnet", 10, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(key_dir):
    """Uninterrupted single-process runs, one per mode, made on first use."""
    digests = {}

    def run(mode: str) -> dict:
        if mode not in digests:
            out = key_dir.parent / f"reference-{mode}"
            subprocess.run([sys.executable, "-m", "uge_hf", *PROTECT, *MODES[mode], "--key", str(key_dir), "--out", str(out)],
                           env=run_env(), check=True)
            digests[mode] = folder_digest(out)
        return digests[mode]

    return run


@pytest.mark.parametrize("mode", list(MODES))
def test_two_accelerate_processes_give_the_same_bytes_as_one(key_dir, reference, mode):
    out = key_dir.parent / f"two-processes-{mode}"
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "uge_hf", *PROTECT, *MODES[mode],
                    "--key", str(key_dir), "--out", str(out)], env=run_env(), check=True)
    assert folder_digest(out) == reference(mode)
    state = out.with_name(out.name + ".uge-state")
    assert json.loads((state / "build.json").read_text())["processes"] == 2, "both processes must have built the shared state"
    records = [json.loads(p.read_text()) for p in (state / "progress").iterdir()]
    assert {r["process"] for r in records} == {0, 1}, "both processes must have protected shards"


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("phase", ["trajectory", "generator", "shards"])
def test_killed_run_resumes_to_identical_bytes(key_dir, reference, phase):
    mode = "generator" if phase == "generator" else "per-sample"
    out = key_dir.parent / f"killed-{phase}"
    state = out.with_name(out.name + ".uge-state")
    args = [sys.executable, "-m", "uge_hf", *PROTECT, *MODES[mode], "--key", str(key_dir), "--out", str(out)]
    proc = subprocess.Popen(args, env=run_env())
    if phase == "shards":  # after the first shard, before the last
        kill_when(proc, lambda: (state / "progress").exists() and len(list((state / "progress").iterdir())) >= 1)
        assert len(list((state / "progress").iterdir())) < 4
        # The finished shards wait in the hidden staging folder: nothing is loadable as protected yet.
        assert list((out / ".uge_hf_partial" / "data").glob("*.parquet")) and not (out / "data").exists()
        with pytest.raises(FileNotFoundError):
            load_dataset(str(out))
        with pytest.raises(FileNotFoundError, match="holds an unfinished uge-hf run.*rerun the same protect command"):
            push_to_hub(out, "tester/unfinished")  # refused before any Hub call
    else:  # after the phase's first epoch checkpoint, before the state is complete
        cache = state / "cache"
        kill_when(proc, lambda: (cache / f"{phase}.resume.pt").exists() or (cache / f"{phase}.safetensors").exists())
        assert not (state / "state" / "state.json").exists()
    subprocess.run(args, env=run_env(), check=True)
    assert folder_digest(out) == reference(mode)


def test_a_killed_overwrite_leaves_the_earlier_run_whole(key_dir):
    """--overwrite replaces the earlier run only once the new one is complete: killed halfway,
    the folder still holds the earlier run, verified and loadable as it was."""
    from uge_hf import verify

    out = key_dir.parent / "overwritten"
    first = [sys.executable, "-m", "uge_hf", *PROTECT, "--limit", "100", "--key", str(key_dir), "--out", str(out)]  # two shards
    subprocess.run(first, env=run_env(), check=True)
    published = folder_digest(out)
    images = lambda: [im.tobytes() for im in load_dataset(str(out), split="train", download_mode="force_redownload")["img"]]
    rows = images()
    second = first + ["--epsilon", "4/255", "--overwrite"]
    kill_when(subprocess.Popen(second, env=run_env()), lambda: list(out.glob(".uge_hf_partial/data/*.parquet")))
    assert {rel: d for rel, d in folder_digest(out).items() if not rel.startswith(".uge_hf_partial/")} == published
    assert verify(out, key_dir)["shards_checked"] == 2
    assert images() == rows
    subprocess.run(second, env=run_env(), check=True)  # resumes the new run, then replaces the earlier one
    assert not (out / ".uge_hf_partial").exists()
    assert json.loads((out / "uge_hf.json").read_text())["config"]["epsilon"] == 4 / 255
    assert set(folder_digest(out)) == set(published) and verify(out, key_dir)["shards_checked"] == 2
    assert images() != rows


def test_streamed_input_gives_the_same_images(tmp_path, cifar, key, fast_config):
    stream = load_dataset(str(CIFAR10), split="test", streaming=True).take(125)
    out = protect(stream, key, fast_config, output_dir=tmp_path / "stream", verbose=False)
    materialized = protect(cifar["test"].select(range(125)), key, fast_config, output_dir=tmp_path / "direct", verbose=False)
    assert list(out) == ["test"], "a stream keeps its split's name"
    streamed = out["test"]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(streamed["img"], materialized["test"]["img"]))
    again = load_dataset(str(CIFAR10), split="test", streaming=True).take(125)  # the same stream, a new object
    rerun = protect(again, key, fast_config, output_dir=tmp_path / "stream", verbose=False)  # resumes: no "another run"
    assert [im.tobytes() for im in rerun["test"]["img"]] == [im.tobytes() for im in streamed["img"]]


def test_arrow_output_format(tmp_path, small_train, key, fast_config):
    out = tmp_path / "arrow-out"
    protect(small_train.select(range(125)), key, fast_config, output_dir=out, output_format="arrow", verbose=False)
    ds = load_from_disk(str(out / "arrow"))
    assert len(ds["train"]) == 125 and (out / "README.md").exists()
    meta = json.loads((out / "uge_hf.json").read_text())
    assert all(sha256_file(out / name) == sha for name, sha in meta["shards"].items())


def test_progress_bars_show_and_can_be_silenced(tmp_path, small_train, key, fast_config, capfd, monkeypatch):
    from datasets.utils.tqdm import disable_progress_bars, enable_progress_bars

    ds = small_train.select(range(125))
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    enable_progress_bars()  # the suite runs with them off (conftest); datasets reads the variable once
    try:
        protect(ds, key, fast_config, output_dir=tmp_path / "loud", verbose=True)
    finally:
        disable_progress_bars()
    err = capfd.readouterr().err
    assert "trajectory" in err and "protect shards" in err
    enable_progress_bars()
    try:
        protect(ds, key, fast_config, output_dir=tmp_path / "quiet", verbose=False)
    finally:
        disable_progress_bars()
    assert "protect shards" not in capfd.readouterr().err
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    protect(ds, key, fast_config, output_dir=tmp_path / "env-quiet", verbose=True)
    assert "protect shards" not in capfd.readouterr().err

"""Each CLI command once, through ``python -m uge_hf`` / ``main()``, on real CIFAR-10."""

import contextlib
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
                 "--epsilon", "8/255", "--preset", "fast", "--batch-size", "60", "--license", "mit", "--quiet"])
    assert code == 0
    return out


def test_keygen_writes_a_loadable_key(key_dir):
    assert AuthorizedModel.from_pretrained(key_dir).fingerprint == AuthorizedModel.create("convnet", 10, 0).fingerprint


def test_protect_writes_a_loadable_folder(protected_cli):
    ds = load_dataset(str(protected_cli))
    assert len(ds["train"]) == 120
    meta = json.loads((protected_cli / "uge_hf.json").read_text())
    assert meta["config"]["epsilon"] == 8 / 255 and meta["source"]["rows"] == 120
    card = DatasetCard.load(protected_cli / "README.md")
    assert meta["source"]["license"] == card.data.license == "mit" and "No license was recorded" not in card.text


def test_protect_reports_bad_input_and_exits_2(key_dir, tmp_path, capsys):
    code = main(["protect", str(CIFAR10), "--split", "train", "--limit", "10", "--key", str(key_dir), "--out", str(tmp_path / "x"),
                 "--image-column", "image", "--quiet"])
    assert code == 2
    assert "column 'image' not found; columns are: img, label" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("inside", [".", "out", "a/out"])
def test_protect_refuses_an_output_inside_the_key_folder(key_dir, capsys, inside):
    before = sorted(p.name for p in key_dir.iterdir())
    assert main(["protect", str(CIFAR10), "--split", "train", "--limit", "10", "--key", str(key_dir), "--out", str(key_dir / inside),
                 "--quiet"]) == 2
    assert "inside the key folder" in capsys.readouterr().err and sorted(p.name for p in key_dir.iterdir()) == before


def test_evaluate_prints_a_table_and_writes_json(protected_cli, key_dir, tmp_path):
    results = tmp_path / "results.json"
    code = main(["evaluate", str(protected_cli), "--clean", str(CIFAR10), "--key", str(key_dir), "--hackers", "vgg-tiny",
                 "--epochs", "1", "--json", str(results), "--update-card", "--quiet"])
    assert code == 0
    data = json.loads(results.read_text())
    assert [r["model"] for r in data["rows"]] == ["key θ0", "key arch, seed 7", "vgg-tiny"]
    assert all(0 <= r["protected_acc"] <= 100 for r in data["rows"])
    card = DatasetCard.load(protected_cli / "README.md")
    public = card.data.to_dict()["uge_hf"]["efficacy"]
    # Times stay local; the key's and its architecture's accuracies too (training each candidate
    # architecture on the clean rows would match them), their ratios are public.
    assert not any(k.endswith("seconds") for r in public for k in r)
    # The sibling (a public seed) is reproducible exactly: it goes; the key's ratio stays, rounded (unrounded, a ratio of
    # two accuracies over test_rows images gives both back).
    assert [r["model"] for r in public] == ["key θ0", "vgg-tiny"]
    assert (public[0]["clean_acc"], public[0]["protected_acc"], public[0]["clean_best_acc"]) == (None, None, None)
    assert public[0]["ratio"] == round(data["rows"][0]["ratio"], 2) and public[1]["ratio"] == data["rows"][2]["ratio"]
    assert public[1]["clean_acc"] == data["rows"][2]["clean_acc"]  # a hacker's are public
    assert "sibling_ratio" not in json.loads((protected_cli / "uge_hf.json").read_text())["efficacy"]["summary"]
    assert "authorized_gap_pt" in data["summary"] and "authorized_gap_pt" not in json.loads((protected_cli / "uge_hf.json").read_text())["efficacy"]["summary"]
    assert "## Measured efficacy" in card.text and "vgg-tiny" in card.text and "| key θ0 | none | withheld | withheld |" in card.text
    assert "key arch" not in card.text and "give ratios only" in card.text


def test_evaluate_checks_its_output_paths_before_training(protected_cli, key_dir, tmp_path):
    run = cli("evaluate", str(protected_cli), "--clean", str(CIFAR10), "--key", str(key_dir), "--hackers", "vgg-tiny",
              "--epochs", "1", "--figure", str(tmp_path / "nodir" / "fig.png"))
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr
    assert "key θ0" not in run.stdout  # refused before any training: no table


def test_evaluate_overwrites_nothing_and_refuses_bad_numbers_before_training(protected_cli, key_dir, tmp_path, capsys):
    """--figure and --json name new files: an existing one may be the key, a shard, the card, or the user's."""
    weights, shard = key_dir / "model.safetensors", next((protected_cli / "data").iterdir())
    before = {p: p.read_bytes() for p in (weights, shard)}
    base = ["evaluate", str(protected_cli), "--clean", str(CIFAR10), "--key", str(key_dir), "--hackers", "vgg-tiny, ", "--quiet"]
    for extra, message in ((["--figure", str(weights)], "exists, and uge-hf never overwrites"),
                           (["--json", str(shard)], "exists, and uge-hf never overwrites"),
                           (["--json", str(tmp_path)], "exists"),
                           (["--json", str(protected_cli / "data" / "results.json")], "lies inside the protected folder"),
                           (["--json", str(tmp_path / "r"), "--figure", str(tmp_path / "." / "r")], "both name"),
                           (["--epochs", "0"], ">= 1"),
                           (["--eval-every", "0"], ">= 1"), (["--test-size", "0"], ">= 1")):
        with pytest.raises(SystemExit) if ">= 1" in message else contextlib.nullcontext():
            assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in (weights, shard)}


def test_card_tells_the_authorized_user_the_trajectory_length(protected_cli):
    card = (protected_cli / "README.md").read_text()
    assert "epochs=2)" in card  # the fast preset's 2-epoch trajectory, not a fixed 15


def test_push_and_verify(protected_cli, key_dir, hub_token, tmp_path):
    assert main(["push", str(protected_cli), "tester/cli-uge"]) == 0
    assert main(["verify", "tester/cli-uge", "--key", str(key_dir)]) == 0
    AuthorizedModel.create("convnet", 10, seed=3).save_pretrained(tmp_path / "wrong")
    assert main(["verify", "tester/cli-uge", "--key", str(tmp_path / "wrong")]) == 1


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "uge_hf", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("keygen", "protect", "evaluate", "push", "verify"):
        assert command in out



def test_public_names_are_the_functions_whatever_was_imported_first():
    # A submodule named like a lazy export would shadow it once imported (``uge_hf.protect``
    # became the module after ``uge_hf.cli`` ran ``from .protect import protect``): import every
    # submodule first, in a fresh interpreter, then ask for each public name.
    code = ("import importlib, pkgutil, types, uge_hf\n"
            "for m in pkgutil.iter_modules(uge_hf.__path__):\n"
            "    if m.name != '__main__': importlib.import_module(f'uge_hf.{m.name}')\n"
            "bad = [n for n in uge_hf.__all__ if isinstance(getattr(uge_hf, n), types.ModuleType)]\n"
            "assert not bad, bad\n"
            "from uge_hf import protect; assert callable(protect)")
    subprocess.run([sys.executable, "-c", code], check=True)

# -- a newcomer's first hour (issue 10): the CLI as a user drives it -------------------------

def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "uge_hf", *args], capture_output=True, text=True, **kwargs)


def test_version_and_help_answer_at_once():
    import time

    from uge_hf import __version__

    start = time.perf_counter()
    assert cli("--version").stdout.strip() == f"uge-hf {__version__}"
    help_text = cli("protect", "--help").stdout
    assert time.perf_counter() - start < 3  # no torch, no datasets import for these
    assert "(default: 5000)" in help_text and "--resize" in help_text and "Exit codes" in cli("--help").stdout
    assert "(default: None)" not in help_text and "(default: )" not in help_text


def test_the_hacker_panel_in_the_help_is_the_real_one():
    from uge_hf.cli import HACKERS_HELP
    from uge_hf.models import DEFAULT_HACKERS

    assert HACKERS_HELP.split(",") == list(DEFAULT_HACKERS)


def test_the_presets_in_the_help_are_the_real_ones():
    from uge_hf import ProtectConfig
    from uge_hf.cli import build_parser
    from uge_hf.config import LARGE_DATASET_ROWS, PRESETS

    fast, large = ProtectConfig.preset("fast"), ProtectConfig.preset("large")
    preset = next(a for a in build_parser()._subparsers._group_actions[0].choices["protect"]._actions if a.dest == "preset")
    assert preset.choices == list(PRESETS)
    assert (fast.steps, len(fast.surrogates), fast.trajectory_epochs) == (4, 1, 2)
    assert "4 steps, one surrogate, a 2-epoch key trajectory" in preset.help
    default = ProtectConfig()
    assert large.lambda_gm == 3 * default.lambda_gm and large.gm_every == 1
    assert f"large: for {LARGE_DATASET_ROWS:,} rows and more" in preset.help and "3x the matching weight, on every step" in preset.help


def test_bad_resize_and_missing_key_are_one_line_errors(tmp_path):
    bad = cli("protect", str(CIFAR10), "--key", "k", "--out", str(tmp_path / "o"), "--resize", "64,48")
    assert bad.returncode == 2 and "'64,48' is not a size; write WxH" in bad.stderr
    missing = cli("protect", str(CIFAR10), "--key", str(tmp_path / "nokey"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no key folder" in missing.stderr and "uge-hf keygen" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_quiet_silences_every_bar(key_dir, tmp_path):
    run = cli("protect", str(CIFAR10), "--split", "train", "--limit", "40", "--key", str(key_dir), "--out", str(tmp_path / "o"),
              "--preset", "fast", "--batch-size", "20", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "%|" not in run.stderr and "it/s" not in run.stderr  # neither ours nor datasets'


def test_ctrl_c_says_how_to_resume(key_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "uge_hf", "protect", str(CIFAR10), "--split", "train", "--limit", "400",
                             "--key", str(key_dir), "--out", str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    # Interrupt once the build has checkpointed its first epoch: well past start-up, in the work
    # a user would stop.
    checkpoint = tmp_path / "o.uge-state" / "cache" / "trajectory.resume.pt"
    deadline = time.time() + 180
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), f"the build never checkpointed (exit {proc.poll()})"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, f"exit {proc.returncode}; stderr: {err[-2000:]}"
    assert "rerun the same command to resume" in err and "Traceback" not in err, err


def test_cli_inputs_are_judged_not_ignored(key_dir, tmp_path, capsys):
    base = ["protect", str(CIFAR10), "--split", "train", "--key", str(key_dir), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base + ["--limit", "10", "--epsilon", ""]) == 2  # not a silent 8/255
    assert "epsilon '' is not a number" in capsys.readouterr().err
    for limit in ("0", "-5"):
        with pytest.raises(SystemExit):  # argparse: usage error, exit 2
            main(base + ["--limit", limit])
        assert f"'{limit}' is not a whole number >= 1" in capsys.readouterr().err
    assert main(base + ["--limit", "10", "--key", str(CIFAR10)]) == 2  # a folder that holds files, but no key
    err = capsys.readouterr().err
    assert "is not a key folder" in err and "--out NEW_FOLDER" in err
    assert not (tmp_path / "o").exists()


def test_protect_into_the_current_folder(key_dir, tmp_path, monkeypatch):
    """`--out .` protects into the working folder; its state goes beside it, named after it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["protect", str(CIFAR10), "--split", "train", "--limit", "40", "--key", str(key_dir), "--out", ".",
                 "--preset", "fast", "--batch-size", "20", "--quiet"]) == 0
    assert len(load_dataset(str(work))["train"]) == 40
    assert (tmp_path / "work.uge-state" / "state" / "state.json").is_file()


def test_evaluate_refuses_a_misspelt_attack_before_warning_or_training(protected_cli, key_dir, capsys):
    code = main(["evaluate", str(protected_cli), "--clean", str(CIFAR10), "--key", str(key_dir), "--epochs", "1", "--attacks", "jpeg11",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown attack 'jpeg11'" in err and "warning" not in err

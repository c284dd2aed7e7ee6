"""The quickstart notebook: committed with the outputs of a run at its real setting (so the
repository page shows the figures and the table), and executable top to bottom, here at a
tiny setting through the environment variables its first cell reads."""

import re

import nbformat
from nbclient import NotebookClient

from .conftest import CIFAR10, REPO

PATH = REPO / "notebooks" / "quickstart.ipynb"
SIZES = ("ROWS", "EPOCHS", "TEST")


def _outputs(nb) -> str:
    return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells for o in c.get("outputs", []))


def _pngs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _table(text: str, attack: str = "none") -> dict[str, float]:
    """model -> protected / clean (last epoch) under ``attack``, from the printed efficacy table."""
    return {m: float(r) for m, r in re.findall(rf"^\| (.+?) \| {attack} \| [^|]* \| [^|]+ \| ([\d.]+) \|", text, re.M)}


def test_committed_quickstart_shows_a_real_setting_run():
    nb = nbformat.read(PATH, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed top to bottom"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert _pngs(nb) >= 3, "the perturbation picture, the efficacy chart and the defenses' heatmap must be kept in the committed notebook"
    # The outputs come from the defaults the first cell reads, not from a smaller run.
    defaults = dict(re.findall(r'UGE_HF_QUICKSTART_(\w+)", (\d+)\)', code[0].source))
    assert set(defaults) == set(SIZES)
    assert " ".join(f"{k}={defaults[k]}" for k in SIZES) in _outputs(nb)
    assert int(defaults["ROWS"]) >= 2000 and int(defaults["EPOCHS"]) >= 10
    text = _outputs(nb)
    assert "refused: the key does not match" in text
    ratios = _table(text)
    hackers = [m for m in ratios if not m.startswith("key")]
    assert "key θ0" in ratios and len(hackers) >= 1
    # What the notebook's text reads off the committed run: the key keeps more of its clean accuracy than any hacker.
    assert ratios["key θ0"] > max(ratios[m] for m in hackers), ratios
    assert set(_table(text, "jpeg10")) == set(_table(text, "grayscale")) == {"vgg-small"}


def test_quickstart_executes_at_a_tiny_setting(monkeypatch):
    monkeypatch.setenv("UGE_HF_CIFAR10", str(CIFAR10))
    for name, value in zip(SIZES, ("50", "1", "100")):
        monkeypatch.setenv(f"UGE_HF_QUICKSTART_{name}", value)
    nb = nbformat.read(PATH, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(PATH.parent)}}).execute()
    text = _outputs(nb)
    assert "ROWS=50 EPOCHS=1 TEST=100" in text  # the sizes reached the kernel
    assert "protect: 50 rows" in text and "max |delta| on the 0-255 scale: 8" in text
    assert "uge_hf:" in text and "key_fingerprint" in text  # the card excerpt
    assert "authorized: loaded 50 rows" in text and "refused: the key does not match" in text
    assert set(_table(text)) == {"key θ0", "vgg-small", "mobilenet-small"}
    assert set(_table(text, "jpeg10")) == set(_table(text, "grayscale")) == {"vgg-small"}  # attacked_models reached evaluate
    assert _pngs(nb) >= 3

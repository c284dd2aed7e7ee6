"""The quickstart notebook runs top to bottom (outputs are stripped in git)."""


import nbformat
from nbclient import NotebookClient

from .conftest import CIFAR10, REPO


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("UGE_HF_CIFAR10", str(CIFAR10))
    path = REPO / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "refused:" in outputs and "max |delta| on the 0-255 scale: 8" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))

"""The Colab quick start runs top to bottom (offline, a tiny random model, TINY = True)."""

import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

pytestmark = pytest.mark.slow  # runs the whole notebook in a kernel

def test_quickstart_notebook_runs(tmp_path):
    # a folder with nothing of the repository around it, as on Colab after `pip install`: the notebook reads
    # no ../recipes or ../data (it read both, so it ran only inside a clone)
    work = tmp_path / "content"
    work.mkdir()
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert not [c for c in nb.cells if "../" in c.source]
    settings = next(c for c in nb.cells if c.cell_type == "code" and "TINY = False" in c.source)
    settings.source = settings.source.replace("TINY = False", "TINY = True")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    assert (work / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "grid.png").is_file() and (work / "ohwx_dog.safetensors").is_file()
    assert (work / "subject" / "contact_sheet.jpg").is_file()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shutil.rmtree(work / "run")

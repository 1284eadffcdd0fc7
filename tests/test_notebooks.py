"""Every notebook of examples/notebooks runs headless (nbclient) with small parameters, offline, on CPU."""

import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "examples" / "notebooks"

SMALL = {
    "UNIAPL_NB_FAST": "1",
    "UNIAPL_NB_MAX_STEPS": "2",
    "UNIAPL_NB_NUM_EVAL": "4",
    "UNIAPL_NB_BATCH_SIZE": "4",
    "UNIAPL_NB_NUM_GENERATIONS": "2",
    "UNIAPL_NB_MAX_COMPLETION_LENGTH": "16",
}
PARAMETERS = {
    "quickstart.ipynb": {},
    "qlora_single_gpu.ipynb": {"UNIAPL_NB_MODEL": "student", "UNIAPL_NB_4BIT": "1"},
    "analysis.ipynb": {"UNIAPL_NB_TRAINED_MODEL": "does-not-exist"},
}


def test_every_notebook_is_tested():
    assert {path.name for path in NOTEBOOKS.glob("*.ipynb")} == set(PARAMETERS)


def test_notebooks_have_a_parameters_cell():
    for name in PARAMETERS:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, name


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    for key, value in {**SMALL, **PARAMETERS[name]}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UNIAPL_NB_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("TRL_UNIAPL_CACHE", os.environ.get("TRL_UNIAPL_TEST_CACHE", str(tmp_path / "cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]

"""Every notebook of examples/notebooks runs headless (nbclient) with small parameters, offline, on CPU."""

import os
import shutil
import time
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
    "analysis.ipynb": {},
}


def test_every_notebook_is_tested():
    assert {path.name for path in NOTEBOOKS.glob("*.ipynb")} == set(PARAMETERS)


def test_notebooks_have_a_parameters_cell():
    for name in PARAMETERS:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, name


def execute(name, tmp_path, monkeypatch, cwd=None, **parameters):
    """Run notebook `name` headless from `cwd` (default `tmp_path`); returns its code cells' text output."""
    for key, value in {**SMALL, **parameters}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UNIAPL_NB_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("TRL_UNIAPL_CACHE", os.environ.get("TRL_UNIAPL_TEST_CACHE", str(tmp_path / "cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cwd = cwd or tmp_path
    cwd.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    return "".join(output.get("text", "") for output in outputs)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    # Two empty folders deep, as examples/notebooks is in the repository: no demo output can be found above it.
    text = execute(name, tmp_path, monkeypatch, cwd=tmp_path / "repo" / "examples" / "notebooks", **PARAMETERS[name])
    if name == "analysis.ipynb":
        assert "No `trl-uniapl demo` output (uniapl-demo/model) in" in text
        assert f"Analysing the trained model {tmp_path / 'output' / 'model'}" in text


def test_analysis_uses_the_demo_output_from_the_repository_root(tmp_path, monkeypatch):
    """Jupyter runs analysis.ipynb from examples/notebooks/; `trl-uniapl demo` wrote uniapl-demo/ two levels up."""
    monkeypatch.setenv("TRL_UNIAPL_CACHE", os.environ.get("TRL_UNIAPL_TEST_CACHE", str(tmp_path / "cache")))
    from trl_uniapl.demo.student import build_student

    demo_model = tmp_path / "repo" / "uniapl-demo" / "model"
    shutil.copytree(build_student(fast=True, show_progress=False), demo_model)  # stands for the demo's trained model
    (demo_model.parent / "metrics.json").write_text('{"max_steps": 160, "quick": false}')
    text = execute("analysis.ipynb", tmp_path, monkeypatch, cwd=tmp_path / "repo" / "examples" / "notebooks")
    assert f"Analysing the trained model {demo_model} against its base" in text
    assert f"Demo output {demo_model.parent}: 160 UniAPL steps" in text
    assert "training a" not in text and not (tmp_path / "output").exists()


def test_qlora_notebook_fails_fast_offline_with_the_student_hint(tmp_path, monkeypatch):
    start = time.monotonic()
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        execute("qlora_single_gpu.ipynb", tmp_path, monkeypatch, UNIAPL_NB_MODEL="someorg/not-a-cached-model")
    assert "HF_HUB_OFFLINE is set" in str(error.value)
    assert "UNIAPL_NB_MODEL=student" in str(error.value)
    assert time.monotonic() - start < 120  # kernel start and imports on a loaded machine; no Hub retries

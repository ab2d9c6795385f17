"""The notebooks in notebooks/: committed without outputs, each opening with the cell that
installs the package from the repository, each linked to Colab from the README and
docs/notebooks.md, their links to the repository's files resolving; and (marked
`notebooks`, run by .ci/run, also `slow`) each executed end to end with nbclient in a
fresh kernel, every cell without error, every plot drawn."""

import ast
import base64
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
COLAB = "https://colab.research.google.com/github/fedjax-sim/fedjax_sim/blob/main/notebooks/{}"
INSTALL = "git+https://github.com/fedjax-sim/fedjax_sim"
GITHUB_FILE = re.compile(r"https://github\.com/fedjax-sim/fedjax_sim/blob/main/([^)#\s]+)")
# The figures each notebook draws (an image output per plot).
FIGURES = {"01_quick_start.ipynb": 3, "02_non_iid_algorithms.ipynb": 6,
           "03_differential_privacy.ipynb": 2, "04_transfer_learning.ipynb": 1,
           "05_custom_algorithm.ipynb": 1}

nbformat = pytest.importorskip("nbformat")


def _read(name):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def test_the_five_notebooks_exist():
    assert NAMES == sorted(FIGURES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_has_no_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}: a code cell holds outputs; clear them before committing")
            ast.parse(cell.source)  # plain Python, no shell or magic lines
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert INSTALL in first_code.source and "pip" in first_code.source
    # The title cell links the notebook to Colab.
    assert COLAB.format(name) in nb.cells[0].source


@pytest.mark.parametrize("page", ["README.md", "docs/notebooks.md"])
def test_every_notebook_is_linked_to_colab(page):
    with open(os.path.join(REPO, page)) as f:
        text = f.read()
    for name in NAMES:
        assert COLAB.format(name) in text, f"{page} does not link {name} to Colab"


@pytest.mark.parametrize("name", NAMES)
def test_links_to_repository_files_resolve(name):
    text = "\n".join(cell.source for cell in _read(name).cells)
    for path in GITHUB_FILE.findall(text):
        assert os.path.exists(os.path.join(REPO, path)), f"{name} links to a missing {path}"


def _images(nb):
    return [base64.b64decode(out["data"]["image/png"])
            for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_end_to_end(name, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from nbclient import NotebookClient

    nb = _read(name)
    # A kernel of this interpreter (the installed package), in a directory of its own.
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
    images = _images(nb)
    assert len(images) == FIGURES[name], f"{name} drew {len(images)} figures"
    assert all(image.startswith(b"\x89PNG") and len(image) > 10_000 for image in images)
    # Each notebook's own printed results say training worked (accuracy well above chance).
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                   if out.output_type == "stream")
    accuracies = [float(a) for a in re.findall(r"test accuracy (\d\.\d+)", text)]
    assert accuracies and max(accuracies) > 0.8, text[-2000:]

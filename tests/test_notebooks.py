"""The notebooks in notebooks/ run top to bottom in a fresh kernel and are stored stripped.

Each notebook is executed with nbclient in a new ``python3`` kernel of the interpreter that runs
pytest (jupyter_client starts the ``python`` of the native kernel spec as ``sys.executable``),
so it sees the installed clx and the cached assets (``CLX_CACHE_DIR``). A cell that raises fails
the test with the cell's traceback. The stored files must carry no outputs and no execution
counts, so that git keeps them stripped.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_functional_ops.ipynb", "02_inflora_walkthrough.ipynb",
             "03_task_retrieval.ipynb")
CELL_TIMEOUT_S = 600
KERNEL = "python3"


def _kernel_env() -> dict[str, str]:
  """This process's environment without the test-only simulated CPU devices of conftest.py.

  The notebooks should run as a user runs them, on the default device(s).
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  return env


def _execute(nb: nbformat.NotebookNode, cwd: pathlib.Path) -> nbformat.NotebookNode:
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                          resources={"metadata": {"path": str(cwd)}})
  return client.execute(env=_kernel_env())


def test_notebook_list_is_complete():
  assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


def test_kernel_is_this_interpreter(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import sys\nprint(sys.prefix)")])
  out = _execute(nb, tmp_path)
  printed = out.cells[0].outputs[0]["text"].strip()
  assert printed == sys.prefix


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
  dirty = [i for i, cell in enumerate(nb.cells) if "execution" in cell.metadata
           or (cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None))]
  assert not dirty, (f"{name}: cells {dirty} have outputs, execution counts or timestamps; "
                     f"strip them (see notebooks/README.md)")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
  nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
  start = time.perf_counter()
  _execute(nb, NOTEBOOKS_DIR)  # raises CellExecutionError on the first failing cell
  elapsed = time.perf_counter() - start
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == "error"]
  assert not errors, errors
  print(f"{name}: {elapsed:.0f} s")

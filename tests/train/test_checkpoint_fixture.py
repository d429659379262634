"""Checkpoints written by an earlier clx still restore, bit for bit, and a run resumes on them.

``fixtures/checkpoint_format2/`` was written by main at d258705 (``clx/checkpoint.py`` as one
module, meta format 2) with ``fixtures/make_checkpoint_fixture.py``; its ``expected.*`` files
hold every state's leaves by key tuple and raw bytes, independent of the checkpoint's own path
encoding (``/``-joined, ``%2F`` / ``%25`` inside keys, ``%2E`` in the Orbax tree).
"""

import hashlib
import json
import pathlib
import shutil

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy by name)
import numpy as np
import pytest

from clx import checkpoint as ckpt

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "checkpoint_format2"
EXPECTED_FILES = ("expected.json", "expected.npz")


def _expected():
  """``(states before task 0 and after tasks 0..2, user metadata of tasks 0..2)``."""
  index = json.loads((FIXTURE / "expected.json").read_text())
  with np.load(FIXTURE / "expected.npz") as arrays:
    raw = {name: arrays[name].tobytes() for name in arrays.files}
  states = []
  for entries in index["states"]:
    tree: dict = {}
    for entry in entries:
      *parents, last = entry["keys"]
      node = tree
      for key in parents:
        node = node.setdefault(key, {})
      if entry.get("empty_dict"):
        node[last] = {}
      else:
        node[last] = np.frombuffer(raw[entry["array"]], np.dtype(entry["dtype"])).reshape(
            entry["shape"])
    states.append(tree)
  return states, index["metadata"]


def _assert_same_bytes(got, want, where=()):
  assert isinstance(got, dict) and sorted(got) == sorted(want), (where, sorted(got), sorted(want))
  for key, value in want.items():
    if isinstance(value, dict):
      _assert_same_bytes(got[key], value, where + (key,))
    else:
      leaf = np.asarray(got[key])
      assert (leaf.dtype.name, leaf.shape) == (value.dtype.name, value.shape), where + (key,)
      assert leaf.tobytes() == value.tobytes(), where + (key,)


def _copy_steps(tmp_path):
  root = tmp_path / "ckpt"
  shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns(*EXPECTED_FILES))
  return root


def _tree_digest(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_fixture_restores_byte_identically_and_stays_untouched():
  states, metadata = _expected()
  before = _tree_digest(FIXTURE)
  with ckpt.TaskCheckpointer(FIXTURE, read_only=True) as c:
    assert c.complete_tasks() == [0, 1, 2]
    for t in range(3):
      state, meta = c.restore_state(t, states[0], expect={"fingerprint": "fixture-v1"})
      _assert_same_bytes(state, states[t + 1])
      assert meta["format"] == 2
      assert {k: meta[k] for k in metadata[t]} == metadata[t]
  assert _tree_digest(FIXTURE) == before


def test_fixture_resumes_in_format_2_chained_to_the_old_steps(tmp_path):
  states, _ = _expected()
  root = _copy_steps(tmp_path)
  with ckpt.TaskCheckpointer(root) as c:
    state, _ = c.restore_state(2, states[0])
    new = {**state, "heads": {**state["heads"], "2": {"bias": np.full(3, 2.0, np.float32)}}}
    c.save(3, *ckpt.state_delta(state, new), {"fingerprint": "fixture-v1"})
    assert c.read_meta(3)["prev_meta_sha256"] == ckpt.meta_sha256(c.read_meta(2))
    assert c.last_good_task() == 3
    restored, _ = c.restore_state(3, states[0], expect={"fingerprint": "fixture-v1"})
  _assert_same_bytes(restored, new)


@pytest.mark.parametrize("tasks_in_format_1", [(0, 1, 2), (0,)])
def test_fixture_as_format_1_restores_byte_identically(tmp_path, tasks_in_format_1):
  """Format 1 (no meta hashes) for every task, or for task 0 only followed by format 2."""
  states, _ = _expected()
  root = _copy_steps(tmp_path)
  for t in tasks_in_format_1:
    path = root / str(t) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["prev_meta_sha256"], meta["meta_sha256"]
    meta["format"] = 1
    path.write_text(json.dumps(meta))
  if tasks_in_format_1 == (0,):  # task 1 chained to task 0's format 2 meta: refused, as before
    with ckpt.TaskCheckpointer(root) as c, pytest.raises(ckpt.CheckpointCorruptedError,
                                                         match="does not chain to task 0"):
      c.restore_state(2, states[0])
    return
  with ckpt.TaskCheckpointer(root) as c:
    state, meta = c.restore_state(2, states[0], expect={"fingerprint": "fixture-v1"})
  assert meta["format"] == 1
  _assert_same_bytes(state, states[3])

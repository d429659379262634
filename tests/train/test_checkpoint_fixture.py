"""Checkpoints written by an earlier clx still restore, bit for bit, and a run resumes on them.

``fixtures/checkpoint_format2/`` was written by main at d258705 (``clx/checkpoint.py`` as one
module, meta format 2) and ``fixtures/checkpoint_format1/`` by 91610c0 (the last commit that
wrote meta format 1: no meta hashes, no chain), both with ``fixtures/make_checkpoint_fixture.py``;
their ``expected.*`` files hold every state's leaves by key tuple and raw bytes, independent of
the checkpoint's own path encoding (``/``-joined, ``%2F`` / ``%25`` inside keys, ``%2E`` in the
Orbax tree). Those are the only formats clx has written: before f265423 no checkpoint format
existed (the skeleton refused keys with ``/``), and the key escaping has not changed since.
"""

import hashlib
import json
import pathlib
import shutil

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy by name)
import numpy as np
import pytest

from clx import checkpoint as ckpt

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "checkpoint_format2"
FIXTURE_V1 = FIXTURES / "checkpoint_format1"
EXPECTED_FILES = ("expected.json", "expected.npz")


def _expected(fixture=FIXTURE):
  """``(states before task 0 and after tasks 0..2, user metadata of tasks 0..2)``."""
  index = json.loads((fixture / "expected.json").read_text())
  with np.load(fixture / "expected.npz") as arrays:
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


def _copy_steps(tmp_path, fixture=FIXTURE):
  root = tmp_path / "ckpt"
  shutil.copytree(fixture, root, ignore=shutil.ignore_patterns(*EXPECTED_FILES))
  return root


def _tree_digest(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fixture, fmt", [(FIXTURE, 2), (FIXTURE_V1, 1)], ids=["format2", "format1"])
def test_fixture_restores_byte_identically_and_stays_untouched(fixture, fmt):
  states, metadata = _expected(fixture)
  before = _tree_digest(fixture)
  with ckpt.TaskCheckpointer(fixture, read_only=True) as c:
    assert c.complete_tasks() == [0, 1, 2]
    for t in range(3):
      state, meta = c.restore_state(t, states[0], expect={"fingerprint": "fixture-v1"})
      _assert_same_bytes(state, states[t + 1])
      assert meta["format"] == fmt
      assert {k: meta[k] for k in metadata[t]} == metadata[t]
  assert _tree_digest(fixture) == before


def test_both_fixtures_hold_the_same_states():
  """The format 1 and format 2 writers stored the same states (only ``meta`` differs)."""
  (states1, meta1), (states2, meta2) = _expected(FIXTURE_V1), _expected(FIXTURE)
  for got, want in zip(states1, states2):
    _assert_same_bytes(got, want)
  assert meta1 == meta2


@pytest.mark.parametrize("fixture", [FIXTURE, FIXTURE_V1], ids=["format2", "format1"])
def test_fixture_resumes_in_format_2_chained_to_the_old_steps(tmp_path, fixture):
  states, _ = _expected(fixture)
  root = _copy_steps(tmp_path, fixture)
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


def test_meta_format_is_the_one_place_that_tells_the_formats_apart(tmp_path):
  """A format 1 step reads as format 1; a format 2 step whose ``format`` was set to 1 is
  refused (format 1 never had the hash fields), so altering ``format`` cannot skip the checks."""
  from clx.checkpoint import meta as meta_lib

  def damaged(detail, leaf=None, cause=None, *, field=None):
    del leaf, cause
    return ckpt.CheckpointCorruptedError(0, tmp_path, detail, field=field)

  v1 = json.loads((FIXTURE_V1 / "0" / "meta" / "metadata").read_text())
  v2 = json.loads((FIXTURE / "0" / "meta" / "metadata").read_text())
  assert (meta_lib.meta_format(v1, damaged), meta_lib.meta_format(v2, damaged)) == (1, 2)
  with pytest.raises(ckpt.CheckpointCorruptedError, match="format 1 but has format 2"):
    meta_lib.meta_format({**v2, "format": 1}, damaged)
  with pytest.raises(ckpt.CheckpointCorruptedError, match="format 3 is not supported"):
    meta_lib.meta_format({**v2, "format": 3}, damaged)
  root = _copy_steps(tmp_path, FIXTURE)
  path = root / "0" / "meta" / "metadata"
  path.write_text(json.dumps({**v2, "format": 1}))
  with ckpt.TaskCheckpointer(root) as c, pytest.raises(ckpt.CheckpointCorruptedError,
                                                       match="'format' was altered"):
    c.restore_state(0, _expected()[0][0])

"""Issue 16 items 1-2: every metadata byte that can change a reported number is verified,
and every replayed task must belong to this run (fingerprint + chain of meta hashes).

Unit tests drive :class:`clx.checkpoint.TaskCheckpointer` on tiny states; the
end-to-end tests replay the issue's probes through ``clx run``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clx import checkpoint as ckpt
from clx import cli
from tests.reliability.clx_runs import assert_one_error_line, flip_digit, snapshot, \
    tiny_runs  # noqa: F401 (fixture)


def _state(rng, t):
  return {"w": rng.standard_normal((4, 3)).astype(np.float32),
          "heads": {str(i): rng.standard_normal(3).astype(np.float32) for i in range(t + 1)}}


def _write_run(root, seed, *, fingerprint="fp", tasks=3):
  """Saves ``tasks`` tasks of a random run; returns the states (index 0 = initial)."""
  rng = np.random.default_rng(seed)
  states = [{"w": np.zeros((4, 3), np.float32), "heads": {}}]
  with ckpt.TaskCheckpointer(root) as c:
    for t in range(tasks):
      states.append(_state(rng, t))
      delta, removed = ckpt.state_delta(states[-2], states[-1])
      acc = rng.uniform(0, 100, size=(t + 1,)).round(4).tolist()
      c.save(t, delta, removed, {"fingerprint": fingerprint, "acc_row": acc,
                                 "wall_time_s": float(rng.uniform(1, 9)),
                                 "diag": {"rank": int(rng.integers(1, 9))}})
  return states


def _meta_path(root, t):
  return root / str(t) / "meta" / "metadata"


@pytest.mark.parametrize("field, nth", [("acc_row", 0), ("acc_row", 3), ("wall_time_s", 1),
                                        ("diag", 0), ("fingerprint", None), ("removed", None)])
def test_altered_metadata_field_is_named_on_restore(tmp_path, field, nth):
  """A one-bit change anywhere in a field of the last task's meta: refused, task and field named."""
  root = tmp_path / "ckpt"
  states = _write_run(root, seed=1)
  path = _meta_path(root, 2)
  if nth is not None:
    flip_digit(path, f'"{field}": ', nth)
  else:  # a field with no digits: change its JSON value
    meta = json.loads(path.read_text())
    meta[field] = "fq" if field == "fingerprint" else ["w"]
    path.write_text(json.dumps(meta))
  with ckpt.TaskCheckpointer(root) as c:
    with pytest.raises(ckpt.CheckpointCorruptedError) as info:
      c.restore_state(2, states[0])
    assert info.value.task == 2 and info.value.field == field
    assert f"meta field {field!r}" in str(info.value)
    with pytest.raises(ckpt.CheckpointCorruptedError):
      c.read_meta(2)
    assert c.last_good_task() == 1
    state, meta = c.restore_state(1, states[0])  # earlier tasks are intact
    np.testing.assert_array_equal(state["w"], states[2]["w"])


def test_added_or_removed_metadata_field_is_named(tmp_path):
  root = tmp_path / "ckpt"
  states = _write_run(root, seed=2)
  path = _meta_path(root, 1)
  meta = json.loads(path.read_text())
  meta["acc_matrix"] = [[1.0]]  # a field a reader could take for the results
  path.write_text(json.dumps(meta))
  with ckpt.TaskCheckpointer(root) as c, pytest.raises(ckpt.CheckpointCorruptedError,
                                                       match="'acc_matrix' is not covered"):
    c.restore_state(2, states[0])
  del meta["acc_matrix"], meta["diag"]
  path.write_text(json.dumps(meta))
  with ckpt.TaskCheckpointer(root) as c, pytest.raises(ckpt.CheckpointCorruptedError,
                                                       match="'diag' is missing") as info:
    c.restore_state(2, states[0])
  assert info.value.task == 1 and info.value.field == "diag"


def test_fingerprint_is_checked_on_every_task(tmp_path):
  """A task 0 from another configuration is refused even when the last task matches."""
  root = tmp_path / "ckpt"
  rng = np.random.default_rng(3)
  states = [{"w": np.zeros((2,), np.float32)}]
  with ckpt.TaskCheckpointer(root) as c:
    for t, fp in enumerate(["other", "mine", "mine"]):
      states.append({"w": rng.standard_normal(2).astype(np.float32)})
      c.save(t, *ckpt.state_delta(states[-2], states[-1]), {"fingerprint": fp})
  with ckpt.TaskCheckpointer(root) as c:
    with pytest.raises(ckpt.CheckpointMismatchError) as info:
      c.restore_state(2, states[0], expect={"fingerprint": "mine"})
    assert info.value.task == 0 and info.value.field == "fingerprint"
    assert info.value.found == "other" and info.value.expected == "mine"
    state, _ = c.restore_state(2, states[0])  # without expectations it replays
    np.testing.assert_array_equal(state["w"], states[3]["w"])


def test_step_copied_from_another_run_breaks_the_chain(tmp_path):
  """Same fingerprint, other run: task 0 swapped in from run B does not chain to A's task 1."""
  a, b = tmp_path / "a", tmp_path / "b"
  states_a = _write_run(a, seed=4)
  _write_run(b, seed=5)
  shutil.rmtree(a / "0")
  shutil.copytree(b / "0", a / "0")
  with ckpt.TaskCheckpointer(a) as c:
    c.read_meta(0)  # the copied step is intact on its own ...
    with pytest.raises(ckpt.CheckpointCorruptedError, match="does not chain to task 0") as info:
      c.restore_state(2, states_a[0], expect={"fingerprint": "fp"})
    assert info.value.task == 1 and info.value.field == "prev_meta_sha256"
    assert c.last_good_task() == 0  # ... but nothing after it can be replayed


def test_save_chains_to_the_previous_meta_read_from_disk(tmp_path):
  """A fresh checkpointer (resume) links task t to task t-1's meta as stored."""
  root = tmp_path / "ckpt"
  states = _write_run(root, seed=6, tasks=2)
  with ckpt.TaskCheckpointer(root) as c:
    c.save(2, {"w": np.ones((4, 3), np.float32)}, [], {"fingerprint": "fp"})
    meta = c.read_meta(2)
    assert meta["prev_meta_sha256"] == ckpt.meta_sha256(c.read_meta(1))
    assert meta["meta_sha256"]["fingerprint"] == ckpt.meta_field_sha256("fingerprint", "fp")
    c.restore_state(2, states[0], expect={"fingerprint": "fp"})
  flip_digit(_meta_path(root, 1), '"acc_row": ')
  with ckpt.TaskCheckpointer(root) as c:
    c.delete_after(1)  # redo task 2 ...
    with pytest.raises(ckpt.CheckpointCorruptedError, match="task 1 .*'acc_row'"):
      c.save(2, {}, [], {"fingerprint": "fp"})  # ... but never chained onto damaged metadata
  assert not (root / "2").exists()


def test_format_1_checkpoints_still_restore(tmp_path, caplog):
  """Steps written before the meta hashes (format 1) restore, with a warning (compatibility)."""
  root = tmp_path / "ckpt"
  states = _write_run(root, seed=7, tasks=2)
  for t in range(2):
    path = _meta_path(root, t)
    meta = json.loads(path.read_text())
    del meta["prev_meta_sha256"], meta["meta_sha256"]
    meta["format"] = 1
    path.write_text(json.dumps(meta))
  with ckpt.TaskCheckpointer(root) as c:
    state, meta = c.restore_state(1, states[0], expect={"fingerprint": "fp"})
    np.testing.assert_array_equal(state["w"], states[2]["w"])
    assert "format 1" in caplog.text
    # A run resumed from them continues in format 2, chained to the format 1 task.
    c.save(2, {}, [], {"fingerprint": "fp"})
    c.restore_state(2, states[0], expect={"fingerprint": "fp"})
    assert c.read_meta(2)["prev_meta_sha256"] == ckpt.meta_sha256(c.read_meta(1))


# ----------------------------------------------------------------- end to end (clx run)


@pytest.fixture
def base_run(tiny_runs):
  return tiny_runs


def _copy(base_run, tmp_path, seed=0):
  root, experiments = base_run
  workdir = tmp_path / "w"
  shutil.copytree(root / ("ft" if seed == 0 else "seed1"), workdir)
  return workdir, experiments


def test_flipped_digit_in_stored_accuracy_matrix_never_reaches_metrics(base_run, tmp_path,
                                                                       monkeypatch, capsys):
  """Probe 1: `38.39` → `78.39` in the last task's meta used to rewrite metrics.json, exit 0."""
  workdir, experiments = _copy(base_run, tmp_path)
  monkeypatch.setenv("CLX_EXPERIMENTS_DIR", str(experiments))
  flip_digit(workdir / "finetune" / "checkpoints" / "1" / "meta" / "metadata", '"acc_matrix": ', 2)
  before = snapshot(workdir)
  capsys.readouterr()
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet",
                   "--set", "methods=finetune"]) == 2
  assert_one_error_line(capsys.readouterr().err, "task 1", "'acc_matrix'")
  assert snapshot(workdir) == before  # metrics.json untouched


@pytest.mark.parametrize("killed_after_task_0", [False, True])
def test_task0_copied_from_another_seed_is_refused(base_run, tmp_path, monkeypatch, capsys,
                                                   killed_after_task_0):
  """Probe 2: a seed-1 task 0 copied into a seed-0 run was replayed without complaint
  when a later task was the one whose fingerprint got checked."""
  workdir, experiments = _copy(base_run, tmp_path)
  monkeypatch.setenv("CLX_EXPERIMENTS_DIR", str(experiments))
  ckpts = workdir / "finetune" / "checkpoints"
  if killed_after_task_0:
    shutil.rmtree(ckpts / "1")
  (workdir / "metrics.json").unlink()
  shutil.rmtree(ckpts / "0")
  shutil.copytree(base_run[0] / "seed1" / "finetune" / "checkpoints" / "0", ckpts / "0")
  before = snapshot(workdir)
  capsys.readouterr()
  assert cli.main(["run", "tiny", "--workdir", str(workdir), "--quiet",
                   "--set", "methods=finetune"]) == 2
  assert_one_error_line(capsys.readouterr().err, "task 0", "'fingerprint'")
  assert snapshot(workdir) == before

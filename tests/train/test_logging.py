"""Run logs: metrics.jsonl content, resume after a kill, TensorBoard events, W&B, profile."""

import json
import struct
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx.data.types import ArraySplit
from clx.methods.sequential import finetune
from clx.models.mlp import mlp
from clx.train import logging as run_logging
from clx.train.loop import Fitter, TrainConfig, run_method
from clx.train.sharding import make_mesh
from tests.helpers import make_gaussian_stream

CFG = TrainConfig(epochs=2, batch_size=10, learning_rate=1e-2, eval_batch_size=32,
                  steps_per_call=3)
VOLATILE = ("examples_per_s", "time", "wall_time_s")  # wall-clock fields differ run to run


def _run(stream, cfg=CFG, **kw):
  backbone = mlp(stream.input_shape, (24,), seed=0)
  return run_method(finetune(backbone), stream, cfg, mesh=make_mesh(1), quiet=True, **kw)


def _stable(records):
  return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def test_step_scalars_match_float64_gradient_descent(tmp_path):
  # Full-batch SGD on softmax regression: one step per epoch, so the logged loss, gradient
  # norm and (cosine) learning rate of every step have a closed-form float64 reference.
  rng = np.random.default_rng(0)
  n, d, c, epochs, lr0 = 24, 5, 3, 4, 0.5
  x = rng.normal(size=(n, d))
  y = rng.integers(0, c, n)
  w0 = rng.normal(size=(d, c)) * 0.1
  split = ArraySplit({"x": x.astype(np.float32), "y": y.astype(np.int32)})

  def loss(params, state, base, batch, step_rng):
    logits = jnp.dot(batch["x"], params["w"], precision="highest")
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]
    return jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"]), {}

  cfg = TrainConfig(epochs=epochs, batch_size=n, optimizer="sgd", learning_rate=lr0,
                    schedule="cosine", steps_per_call=1)
  logger = run_logging.RunLogger(tmp_path, tensorboard=False, enabled=True).open(0)
  logger.task = 0
  Fitter(make_mesh(1), quiet=True, logger=logger).fit(
      {"w": jnp.asarray(w0, jnp.float32)}, loss, split, cfg, state=None, base=None,
      rng=jax.random.PRNGKey(0), title="softmax")
  logger.close()
  steps = [r for r in run_logging.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
  assert [r["step"] for r in steps] == list(range(epochs))

  w, onehot = w0.copy(), np.eye(c)[y]
  for k, record in enumerate(steps):
    logits = x @ w
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    grad = x.T @ (np.exp(logp) - onehot) / n
    lr = 0.5 * lr0 * (1 + np.cos(np.pi * k / epochs))
    np.testing.assert_allclose(record["loss"], -np.mean(np.sum(onehot * logp, 1)), rtol=1e-5)
    np.testing.assert_allclose(record["grad_norm"], np.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(record["learning_rate"], lr, rtol=1e-6)
    assert record["examples_per_s"] > 0 and record["epoch"] == k and record["phase"] == "softmax"
    w = w - lr * grad


def test_logging_keeps_every_number_and_writes_every_step(tmp_path):
  stream = make_gaussian_stream()
  plain = _run(stream)
  logged = _run(stream, logger=run_logging.RunLogger(tmp_path, tensorboard=False, enabled=True))
  chex.assert_trees_all_equal(jax.device_get(plain.state), jax.device_get(logged.state))
  np.testing.assert_array_equal(plain.acc_matrix, logged.acc_matrix)
  records = run_logging.read_jsonl(tmp_path / "metrics.jsonl")
  per_task = CFG.epochs * -(-len(stream.tasks[0].train) // CFG.batch_size)
  steps = [r for r in records if r["kind"] == "step"]
  assert [r["step"] for r in steps] == list(range(len(stream) * per_task))
  assert [r["task"] for r in steps] == [t for t in range(len(stream)) for _ in range(per_task)]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["learning_rate"] == pytest.approx(
      CFG.learning_rate) for r in steps)
  tasks = [r for r in records if r["kind"] == "task"]
  assert [r["task"] for r in tasks] == list(range(len(stream)))
  for r in tasks:
    np.testing.assert_allclose(r["acc_row"], plain.acc_matrix[r["task"], :r["task"] + 1])
    assert r["fit"]["epochs"] == CFG.epochs


class _Killed(Exception):
  pass


def test_resume_after_kill_keeps_completed_tasks_once_and_drops_the_partial_task(tmp_path):
  stream = make_gaussian_stream()
  whole = tmp_path / "whole"
  _run(stream, checkpoint_dir=str(whole / "ckpt"),
       logger=run_logging.RunLogger(whole, enabled=True))

  cut = tmp_path / "cut"

  def kill_at_task_1(t, acc):  # after task 1's lines are written, before its checkpoint
    if t == 1:
      raise _Killed

  with pytest.raises(_Killed):
    _run(stream, checkpoint_dir=str(cut / "ckpt"), on_task_end=kill_at_task_1,
         logger=run_logging.RunLogger(cut, enabled=True))
  with open(cut / "metrics.jsonl", "ab") as f:
    f.write(b'{"kind": "step", "task": 1, "lo')  # a write torn by the kill
  assert max(r["task"] for r in run_logging.read_jsonl(cut / "metrics.jsonl")) == 1
  resumed = _run(stream, checkpoint_dir=str(cut / "ckpt"),
                 logger=run_logging.RunLogger(cut, enabled=True))
  assert resumed.resumed_from == 0
  assert _stable(run_logging.read_jsonl(cut / "metrics.jsonl")) == \
      _stable(run_logging.read_jsonl(whole / "metrics.jsonl"))
  assert all(line.endswith(b"\n") and json.loads(line)
             for line in (cut / "metrics.jsonl").read_bytes().splitlines(keepends=True))


def _event_scalars(folder):
  """{tag: [(step, value)]} of every tfevents file under ``folder`` (TFRecord framing parsed
  here; Event protos decoded with tensorboardX's own proto classes)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(folder.rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_tensorboard_event_file_holds_the_jsonl_scalars(tmp_path):
  stream = make_gaussian_stream(num_tasks=2)
  _run(stream, logger=run_logging.RunLogger(tmp_path, enabled=True))
  scalars = _event_scalars(tmp_path / run_logging.TENSORBOARD_DIR)
  steps = [r for r in run_logging.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
  assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in steps]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in steps],
                             rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["train/grad_norm"]],
                             [r["grad_norm"] for r in steps], rtol=1e-6)
  assert [s for s, _ in scalars["task/acc"]] == [0, 1]


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
  with pytest.raises(run_logging.LoggerUnavailableError, match="pip install wandb"):
    run_logging.RunLogger(tmp_path, tensorboard=False, wandb_project="proj", enabled=True)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
  calls = {"init": [], "log": [], "finish": 0}

  class Run:
    def log(self, data, step):
      calls["log"].append((step, data))

    def finish(self):
      calls["finish"] += 1

  def init(**kw):
    calls["init"].append(kw)
    return Run()

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  stream = make_gaussian_stream(num_tasks=2)
  _run(stream, logger=run_logging.RunLogger(tmp_path, tensorboard=False, wandb_project="proj",
                                            enabled=True))
  assert calls["init"][0]["project"] == "proj" and calls["finish"] == 1
  steps = [r for r in run_logging.read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
  logged = [(s, d["train/loss"]) for s, d in calls["log"] if "train/loss" in d]
  assert [s for s, _ in logged] == [r["step"] for r in steps]
  np.testing.assert_allclose([v for _, v in logged], [r["loss"] for r in steps], rtol=1e-6)


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  logger = run_logging.RunLogger(tmp_path / "m")
  assert not logger.enabled
  _run(make_gaussian_stream(num_tasks=1), logger=logger)
  assert not (tmp_path / "m").exists()


def test_profile_traces_steps_after_warm_up(tmp_path):
  profiler = run_logging.StepProfiler(tmp_path / "profile", steps=2)
  _run(make_gaussian_stream(num_tasks=1), profiler=profiler)
  assert profiler.state == "done" and profiler.traced >= 2
  assert list(run_logging.trace_files(tmp_path / "profile"))

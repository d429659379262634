"""experiments/text_comparators.py: the report's parameter count and retrieval matrix, and the
``--summarize`` table over seed workdirs (on tiny fake workdirs: no training, no MiniLM)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clx import workdir as wd

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "text_comparators.py"


@pytest.fixture(scope="module")
def tc():
  spec = importlib.util.spec_from_file_location("text_comparators_under_test", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fake_workdir(path: Path, seed: int, accs: dict[str, np.ndarray], config: dict) -> Path:
  """A workdir with config.json and a verified metrics.json holding ``accs`` (T, T) in %."""
  path.mkdir(parents=True)
  config = {**config, "seed": seed}
  (path / wd.CONFIG_FILE).write_text(json.dumps(config))
  runs = {}
  for name, a in accs.items():
    T = a.shape[0]
    final, diag = a[-1], np.diagonal(a)
    curve = [np.mean(a[t, :t + 1]) for t in range(T)]
    runs[name] = {"acc_matrix": [[float(v) for v in a[t, :t + 1]] for t in range(T)],
                  "acc": float(np.mean(final)), "acc_samples": float(np.mean(final) + 1.0),
                  "aia": float(np.mean(curve)), "bwt": float(np.mean(final[:-1] - diag[:-1])),
                  "forgetting": 0.0, "wall_time_s": 100.0 + seed,
                  "config_sha256": wd.method_config_sha256(config, name)}
  wd.write_metrics(path / wd.METRICS_FILE, {"experiment": "text_comparators", "runs": runs})
  return path


def test_summarize_averages_seeds_pairs_differences_and_retrieval(tc, tmp_path):
  config = {"name": "text_comparators", "methods": ["lora", "l2p", "proteus"],
            "stream": {"num_tasks": 2}}
  rng = np.random.default_rng(0)
  accs = [{m: np.tril(rng.uniform(10, 90, (2, 2))) for m in config["methods"]} for _ in range(2)]
  dirs = [_fake_workdir(tmp_path / f"seed{s}", s, accs[s], config) for s in range(2)]
  mats = [rng.uniform(0, 100, (2, 2)) for _ in range(2)]
  reports = [{"lora": {"trainable_params": 1000, "checkpoint_bytes": {"0": 2000, "1": 4000}},
              "l2p": {"trainable_params": 50, "checkpoint_bytes": {"0": 100, "1": 100},
                      "retrieval_matrix": mats[s].tolist()},
              "proteus": {"trainable_params": 70, "checkpoint_bytes": {"0": 10, "1": 30}}}
             for s in range(2)]
  table = tc.summarize(dirs, reports)

  acc = {m: np.array([np.mean(a[m][-1]) for a in accs]) for m in config["methods"]}
  row = next(line for line in table.splitlines() if line.startswith("| l2p | 2 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[2] == f"{acc['l2p'].mean():.2f} ± {acc['l2p'].std(ddof=1):.2f}"
  assert cells[3] == f"{acc['l2p'].mean() + 1:.2f} ± {acc['l2p'].std(ddof=1):.2f}"
  assert cells[6] == "50" and cells[7] == "100 B" and cells[8] == "100 ± 1"
  lora_row = next(line for line in table.splitlines() if line.startswith("| lora | 2 |"))
  assert "1,000" in lora_row and "3 kB" in lora_row
  # paired differences: per seed, then mean ± std (not the difference of the means' stds)
  diff = acc["l2p"] - acc["lora"]
  paired = [line for line in table.splitlines() if line.startswith("| l2p |")][-1]
  assert f"{diff.mean():.2f} ± {diff.std(ddof=1):.2f}" in paired
  # retrieval: the mean over seeds, lower triangle only
  mean = np.mean(mats, 0)
  assert f"| T2 | {mean[1, 0]:.1f} | {mean[1, 1]:.1f} |" in table
  assert f"| T1 | {mean[0, 0]:.1f} |  |" in table


def test_summarize_refuses_workdirs_of_different_configs(tc, tmp_path):
  config = {"name": "text_comparators", "methods": ["lora"], "stream": {"num_tasks": 2}}
  a = {"lora": np.tril(np.full((2, 2), 50.0))}
  one = _fake_workdir(tmp_path / "a", 0, a, config)
  other = _fake_workdir(tmp_path / "b", 1, a, {**config, "stream": {"num_tasks": 3}})
  report = {"lora": {"trainable_params": 1, "checkpoint_bytes": {"0": 1}}}
  with pytest.raises(ValueError, match="differ in more than the seed"):
    tc.summarize([one, other], [report, report])
  with pytest.raises(ValueError, match="2 workdirs but 1 reports"):
    tc.summarize([one, other], [report])


def test_retrieval_matrix_counts_each_test_task_against_its_own_index(tc):
  """Row t, column j: % of task j's rows retrieved as j, with a fake retriever that answers
  ``(x + t) mod (t + 1)`` per row, batched with padding (rows beyond n never counted)."""
  calls = []

  def fn(state, base, x, task):
    calls.append((task, x.shape))
    return (x[:, 0] + state) % (task + 1)

  rng = np.random.default_rng(1)
  test_x = [rng.integers(0, 5, (n, 3)) for n in (7, 5, 9)]
  states = [0, 1, 2]
  got = tc.retrieval_matrix(fn, states, None, test_x, batch_size=4)
  want = np.full((3, 3), np.nan)
  for t in range(3):
    for j in range(t + 1):
      want[t, j] = 100.0 * np.mean((test_x[j][:, 0] + t) % (t + 1) == j)
  np.testing.assert_allclose(got, want)
  assert {shape for _, shape in calls} == {(4, 3)}  # one padded input shape


def test_trainable_params_counts_sd_lora_task_lora_from_the_final_state(tc):
  """The count from a state after ``combine`` includes the task's LoRA (the old report gave
  head + magnitudes only: 1,542 on MiniLM)."""
  from clx.methods import build
  from clx.methods.base import StreamSpec, TaskInfo
  from tests.methods.comparator_fixtures import tiny_bert, token_stream

  stream = token_stream(num_tasks=2)
  spec = StreamSpec.from_stream(stream)
  method = build("sd_lora", tiny_bert(), lora_rank=2)
  state = method.init(jax.random.PRNGKey(0), spec)
  ctx = type("Ctx", (), {"rng": jax.random.PRNGKey(1), "task_index": 0})()
  state = method.begin_task(state, ctx)
  info = TaskInfo(0, spec)
  trained = method.trainable(state, info)
  before = sum(np.size(v) for v in jax.tree.leaves(trained))
  state = method.combine(state, jax.tree.map(jnp.asarray, trained), info)
  # 2 layers x (q, v) x (A (32, 2) + B (2, 32)) + head (32 x 4 + 4) + 2 magnitudes
  assert tc.trainable_params(method, state, info) == before == 2 * 2 * 128 + 132 + 2

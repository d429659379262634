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
  row = next(line for line in table.splitlines() if line.startswith("| l2p | – | 2 |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[3] == f"{acc['l2p'].mean():.2f} ± {acc['l2p'].std(ddof=1):.2f}"
  assert cells[4] == f"{acc['l2p'].mean() + 1:.2f} ± {acc['l2p'].std(ddof=1):.2f}"
  assert cells[7] == "50" and cells[8] == "100 B" and cells[9] == "100 ± 1"
  lora_row = next(line for line in table.splitlines() if line.startswith("| lora | – | 2 |"))
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


def _validation_record(path: Path, rows: dict) -> Path:
  path.write_text(json.dumps({"seed": 0, "rows": rows}))
  return path


def test_get_config_official_and_validated_rates(tc, tmp_path):
  """``rates="official"`` keeps every official rate; ``"validated"`` takes the record's choice
  for the rows it holds only (L2P and DualPrompt share one override dict in the config: tuning
  one must not move the other)."""
  official = tc.get_config("official")
  assert tc.learning_rate(official, "coda_prompt") == 1e-3
  assert tc.learning_rate(official, "sd_lora") == 8e-3
  assert tc.learning_rate(official, "l2p") == tc.learning_rate(official, "dualprompt") == 0.03
  assert official["method_args"]["sd_lora"]["head_init"] == "simple_linear"
  record = _validation_record(tmp_path / "v.json", {"coda_prompt": {"chosen": 0.09},
                                                    "l2p": {"chosen": 0.001875}})
  validated = tc.get_config("validated", record)
  assert tc.learning_rate(validated, "coda_prompt") == 0.09
  # the rest stays: CODA's cosine is the official per-epoch one, not clx's per-step "cosine"
  assert validated["lr_schedules"]["coda_prompt"] == "clx.methods.coda_prompt:official_lr_schedule"
  assert "schedule" not in validated["train_overrides"]["coda_prompt"]
  assert tc.learning_rate(validated, "l2p") == 0.001875
  assert tc.learning_rate(validated, "dualprompt") == 0.03
  assert validated["train_overrides"]["dualprompt"]["grad_clip"] == 1.0
  assert tc.learning_rate(validated, "sd_lora") == 8e-3  # not in the record: official
  assert tc.get_config("validated", tmp_path / "absent.json") == official
  # a row validated at its official rate: the config is the official one, unchanged
  same = _validation_record(tmp_path / "same.json", {"proteus": {"chosen": 1e-3}})
  assert tc.get_config("validated", same) == official
  with pytest.raises(ValueError, match="rates must be one of"):
    tc.get_config("best")


def test_validation_grid_and_edge_extension(tc):
  assert tc.validation_grid("coda_prompt", 1e-3) == [1e-3, 3e-3, 1e-2]
  assert tc.validation_grid("l2p", 0.03) == [0.001875, 0.03, 0.09, 0.3]
  assert tc.choose_rate({1e-3: 20.0, 3e-3: 40.0, 1e-2: 30.0}, 0) == (3e-3, None)  # interior
  assert tc.choose_rate({1e-3: 20.0, 3e-3: 40.0, 1e-2: 50.0}, 0) == (1e-2, 0.03)  # top edge
  assert tc.choose_rate({1e-3: 60.0, 3e-3: 40.0}, 1) == (1e-3, float(f"{1e-3 / 3:.6g}"))
  assert tc.choose_rate({1e-3: 20.0, 3e-3: 40.0, 1e-2: 50.0}, tc.MAX_EXTENSIONS) == (1e-2, None)
  assert tc.choose_rate({1e-3: 40.0, 3e-3: 40.0}, tc.MAX_EXTENSIONS)[0] == 1e-3  # tie: smaller
  with pytest.raises(ValueError, match="at least two rates"):
    tc.choose_rate({1e-3: 1.0}, 0)


def test_validate_runs_the_grid_on_the_validation_stream_and_records_the_choice(
    tc, tmp_path, monkeypatch):
  """Each (row, rate) runs once on the validation stream; the best rate at the top edge extends
  the grid (x3) up to MAX_EXTENSIONS times; other rows of the record stay."""
  from clx import experiment
  calls = []

  def fake_run(config, workdir):
    (row,) = config["methods"]
    lr = tc.learning_rate(config, row)
    assert config["train"]["evaluate_after"] == "last_task"  # the score reads the last row only
    calls.append((row, lr, config["stream"]["name"], Path(workdir).name))
    return {"runs": {row: {"acc": 100.0 - abs(np.log(lr / 0.05))}}}  # best near 0.05

  monkeypatch.setattr(experiment, "run_experiment", fake_run)
  record_path = _validation_record(tmp_path / "v.json", {"l2p": {"chosen": 0.03}})
  record = tc.validate(["coda_prompt"], tmp_path / "runs", seed=0, validation_file=record_path)
  assert [c[1] for c in calls] == [1e-3, 3e-3, 1e-2, 0.03, 0.09]
  assert {c[2] for c in calls} == {tc.VALIDATION_STREAM}
  assert calls[0][3] == "coda_prompt_lr0.001"
  entry = record["rows"]["coda_prompt"]
  assert entry["chosen"] == 0.03 and entry["extensions"] == 2 and not entry["at_edge"]
  assert entry["official"] == 1e-3 and set(entry["grid"]) == {"0.001", "0.003", "0.01", "0.03",
                                                               "0.09"}
  saved = json.loads(record_path.read_text())
  assert saved["rows"]["l2p"] == {"chosen": 0.03} and saved["rows"]["coda_prompt"] == entry
  assert tc.learning_rate(tc.get_config("validated", record_path), "coda_prompt") == 0.03
  with pytest.raises(ValueError, match="not tuned rows"):
    tc.validate(["simplecil"], tmp_path / "runs", validation_file=record_path)
  calls.clear()  # a finished run is read, not rerun
  finished = tmp_path / "runs" / "coda_prompt_lr0.001"
  finished.mkdir(parents=True)
  (finished / "metrics.json").write_text(json.dumps({"runs": {"coda_prompt": {"acc": 99.5}}}))
  record = tc.validate(["coda_prompt"], tmp_path / "runs", seed=0, validation_file=record_path)
  assert 1e-3 not in [c[1] for c in calls] and record["rows"]["coda_prompt"]["grid"]["0.001"] == 99.5
  calls.clear()  # the joint bound is tuned alike (its official 5e-5 is the grid's base)
  record = tc.validate(["joint"], tmp_path / "runs", seed=0, validation_file=record_path)
  assert [c[1] for c in calls][:3] == [5e-5, 1.5e-4, 5e-4]
  assert record["rows"]["joint"]["official"] == 5e-5


def test_validation_stream_is_disjoint_from_every_evaluated_text(tc, monkeypatch):
  """Same tasks and labels as the evaluated stream; train and validation-test glosses come
  from train-split rows that no evaluated seed (0, 1, 2) trains on (tests are another split)."""
  from clx.data.text import streams as ts
  nouns = [i for i, n in enumerate(ts.SUPERSENSES) if n.startswith("noun.")][:4]
  rng = np.random.default_rng(0)
  data = {}
  for split, per in (("train", 120), ("test", 40)):
    labels = np.repeat(nouns, per)[rng.permutation(4 * per)]
    data[split] = {"label": labels, "text": np.array([f"{split}{i}" for i in range(len(labels))],
                                                     dtype=object)}
  monkeypatch.setattr(ts, "load_text_dataset", lambda *a, **k: data)
  monkeypatch.setattr(ts, "tokenize_text_stream", lambda raw, **k: raw)
  sizes = dict(num_tasks=2, classes_per_task=2, per_class_train=20, per_class_test=30)
  val = tc.validation_text_stream(seed=5, **sizes)
  evaluated = [ts.text_stream("wordnet_supersense", seed=s, **sizes) for s in (0, 1, 2)]
  used = {int(i) for e in evaluated for t in e.tasks for i in t.train.index}
  assert val.class_names == evaluated[0].class_names
  seen = set()
  for task, ref in zip(val.tasks, evaluated[0].tasks):
    assert task.classes == ref.classes and task.train.source == task.test.source == "train"
    train, test = set(task.train.index.tolist()), set(task.test.index.tolist())
    assert len(train) == 2 * 20 and len(test) == 2 * 30
    assert not (train | test) & used and not train & test and not (train | test) & seen
    seen |= train | test
    for split in (task.train, task.test):  # labels follow the supersense of each row
      names = [val.class_names[y] for y in split.y]
      assert names == [ts.SUPERSENSES[c] for c in data["train"]["label"][split.index]]
  with pytest.raises(ValueError, match="unused train glosses"):
    tc.validation_text_stream(seed=5, **{**sizes, "per_class_train": 35})


def test_summarize_reports_each_row_rate_and_the_validation_grid(tc, tmp_path):
  config = {"name": "text_comparators", "methods": ["lora", "coda_prompt", "simplecil"],
            "stream": {"num_tasks": 2}, "train": {"learning_rate": 1e-3},
            "train_overrides": {"coda_prompt": {"learning_rate": 0.09}}}
  a = {m: np.tril(np.full((2, 2), 50.0)) for m in config["methods"]}
  one = _fake_workdir(tmp_path / "a", 0, a, config)
  report = {m: {"trainable_params": 1, "checkpoint_bytes": {"0": 1}} for m in config["methods"]}
  validation = {"seed": 0, "rows": {"coda_prompt": {
      "official": 1e-3, "grid": {"0.001": 20.0, "0.03": 48.0, "0.09": 50.5}, "chosen": 0.09,
      "extensions": 2, "at_edge": True}}}
  table = tc.summarize([one], [report], validation)
  assert "| coda_prompt | 0.09 (validated) | 1 |" in table
  assert "| lora | 0.001 | 1 |" in table and "| simplecil | – | 1 |" in table
  assert "| coda_prompt | 0.001 | 0.001: 20.0, 0.03: 48.0, 0.09: 50.5* | 0.09 (at the grid's edge) |" in table
  assert "validation" not in tc.summarize([one], [report])  # no record: no grid


def test_a_run_of_some_rows_keeps_the_other_rows_report(tc, tmp_path, monkeypatch):
  """Rows added to a seed workdir with ``--methods`` (e.g. after a new validation) join its
  comparators.json; the rows reported earlier stay (the old code overwrote them)."""
  from clx import experiment
  workdir = tmp_path / "seed0"
  workdir.mkdir()
  (workdir / "comparators.json").write_text(json.dumps({"proteus": {"trainable_params": 1}}))
  monkeypatch.setattr(experiment, "run_experiment", lambda config, w: None)
  monkeypatch.setattr(tc, "report", lambda config, w: {m: {"trainable_params": 2}
                                                       for m in config["methods"]})
  assert tc.main(["--workdir", str(workdir), "--methods", "l2p", "--set", "seed=0"]) == 0
  assert json.loads((workdir / "comparators.json").read_text()) == {
      "proteus": {"trainable_params": 1}, "l2p": {"trainable_params": 2}}

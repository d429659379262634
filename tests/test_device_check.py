"""experiments/device_check.py: its --quick smoke run on CPU writes a complete, sane JSON."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "device_check.py"


def _load():
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_step_rows(report: dict, dtypes) -> None:
  batch = report["config"]["batch"]
  for dtype in dtypes:
    peak = report["matmul_peak"][dtype]
    assert peak["flops_per_s"] == pytest.approx(2 * peak["n"] ** 3 / peak["seconds"])
    row = report["clx"][dtype]
    assert "error" not in row, row
    assert row["s_per_step"] > 0 and row["images_per_s"] == pytest.approx(batch / row["s_per_step"])
    assert 0 < row["mfu"] <= 1, row["mfu"]
    assert row["mfu"] == pytest.approx(row["flops_per_step"] / row["s_per_step"]
                                       / peak["flops_per_s"])
    assert row["flops_source"] in ("xla_cost_analysis", "analytic",
                                   "analytic (xla_cost_analysis implausible)")
    # XLA's count and the analytic one describe the same step: they must roughly agree.
    if row["xla_flops_per_step"] is not None:
      assert 0.7 < row["xla_flops_per_step"] / row["analytic_flops_per_step"] < 1.5
    assert row["compiled_memory"]["peak_bytes"] > 0
    assert math.isfinite(row["final_loss"])
    assert row["weights"].startswith("random")
  if "bfloat16" in dtypes:
    assert report["clx"]["bfloat16"]["bf16_mode"] in ("compute_dtype", "dtype", "local_cast")


def test_quick_bf16_step_writes_every_field(tmp_path):
  """The fast CI form: one dtype, no PMNIST run (the full --quick run is the slow test)."""
  dc = _load()
  out = tmp_path / "sub" / "dc.json"
  report = dc.main(["--quick", "--skip-torch", "--skip-pmnist", "--dtypes", "bfloat16",
                    "--out", str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk["quick"] is True and on_disk["out"] == str(out)
  assert not list(out.parent.glob("*.tmp"))
  assert on_disk["device"]["device_kind"] and on_disk["device"]["platform"] == "cpu"
  assert set(on_disk["clx"]) == {"bfloat16"}
  _check_step_rows(on_disk, ("bfloat16",))
  assert on_disk["torch"]["bfloat16"] == {"skipped": "--skip-torch"}
  assert on_disk["ratio_clx_over_torch"] == {}
  assert on_disk["pmnist_gpm"] == {"skipped": "--skip-pmnist"}
  assert report["total_s"] > 0


@pytest.mark.slow
def test_full_quick_run(tmp_path):
  dc = _load()
  out = tmp_path / "dc.json"
  dc.main(["--quick", "--skip-torch", "--out", str(out)])
  report = json.loads(out.read_text())
  _check_step_rows(report, ("float32", "bfloat16"))
  pm = report["pmnist_gpm"]
  if "error" in pm:  # only acceptable when MNIST is not in this machine's clx cache
    assert pm["error"].startswith("AssetUnavailableError"), pm["error"]
  else:
    assert pm["wall_s"] > 0 and pm["tasks"] == 2 and pm["train_per_task"] == 300
    assert pm["test_per_task"] == 500 and 0 <= pm["acc"] <= 100


def test_out_defaults_to_dollar_out(tmp_path, monkeypatch):
  dc = _load()
  monkeypatch.setenv("OUT", str(tmp_path))
  assert dc.parse_args(["--quick"]).out == os.path.join(str(tmp_path), "device_check.json")
  monkeypatch.delenv("OUT")
  assert dc.parse_args([]).out == "device_check.json"


@pytest.mark.parametrize("argv", [["--image-size", "30"], ["--dtypes", "float16"],
                                  ["--batch", "0"], ["--pmnist-tasks", "11"]])
def test_bad_options_are_refused(argv, capsys):
  dc = _load()
  with pytest.raises(SystemExit):
    dc.parse_args(argv)
  assert "--" in capsys.readouterr().err


def test_analytic_flops_match_a_hand_count():
  """ViT-B/16 at 224², batch 1: forward 17.6 GMACs (fvcore's "17.6 GFLOPs") = 35 GFLOPs; step ≈ 2×."""
  dc = _load()
  from clx.models.vit import vit_config
  flops = dc.analytic_vit_step_flops(vit_config("B/16", (224, 224, 3)), 1, 20, 10)
  d, m, t, layers = 768, 3072, 197, 12
  body = layers * (t * 2 * (4 * d * d + 2 * d * m) + 4 * t * t * d)
  assert 2 * body < flops < 2 * body * 1.02
  assert 2 * 34.5e9 < flops < 2 * 36e9


@pytest.mark.slow
def test_torch_reference_runs_at_quick_shapes():
  dc = _load()
  python = os.environ.get("CLX_TORCH_PYTHON") or dc.default_torch_python()
  if python is None:
    pytest.skip("no Python with torch (set CLX_TORCH_PYTHON)")
  row = dc.torch_inflora_step(python, "test", 32, 4, 2, "float32", "cpu", "highest")
  assert row["s_per_step"] > 0
  assert abs(row["loss"] - math.log(20)) < 1.5  # a 20-way head near chance after 4 steps

"""The comparator methods (L2P, DualPrompt, CODA-Prompt, RanPAC, SimpleCIL, SD-LoRA) in the one
method shape (issue 14): a frozen config validated on construction, a typed state whose keys are
the state's, a short factory, documented and typed public functions, and host passes that
compile once per run instead of once per task."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import sys
import types
import typing

import jax
import jax.numpy as jnp
import pytest

from clx.methods import coda_prompt as coda_lib
from clx.methods import dualprompt as dual_lib
from clx.methods import l2p as l2p_lib
from clx.methods import prompting
from clx.methods import ranpac as ranpac_lib
from clx.methods import sd_lora as sd_lib
from clx.methods import simplecil as simplecil_lib
from clx.methods.base import StreamSpec
from clx.models import bert
from tests.methods.comparator_fixtures import L, VOCAB, tiny_bert, token_stream

# (module, config class name, state class name, factory name, small kwargs)
SHAPES = [
    (l2p_lib, "L2PConfig", "L2PState", "l2p", {"pool_size": 4, "length": 2, "top_k": 2}),
    (dual_lib, "DualPromptConfig", "DualPromptState", "dualprompt",
     {"g_layers": (0,), "e_layers": (1,), "g_length": 2, "e_length": 2, "pool_size": 4}),
    (coda_lib, "CodaPromptConfig", "CODAPromptState", "coda_prompt",
     {"pool_size": 6, "length": 2, "layers": (0, 1)}),
    (ranpac_lib, "RanPACConfig", "RanPACState", "ranpac", {"rp_dim": 16}),
    (ranpac_lib, "RanPACConfig", "RanPACState", "ranpac", {"rp_dim": 0, "adapt_rank": 2}),
    (simplecil_lib, "SimpleCILConfig", "SimpleCILState", "simplecil", {}),
    (simplecil_lib, "SimpleCILConfig", "SimpleCILState", "simplecil", {"adapt_rank": 2}),
    (sd_lib, "SDLoRAConfig", "SDLoRAState", "sd_lora", {"lora_rank": 2}),
]
MODULES = [l2p_lib, dual_lib, coda_lib, ranpac_lib, simplecil_lib, sd_lib, prompting]
IDS = [f"{s[3]}-{i}" for i, s in enumerate(SHAPES)]


@pytest.mark.parametrize("module,config,state_cls,factory,kwargs", SHAPES, ids=IDS)
def test_config_is_frozen_and_the_state_matches_its_typed_dict(module, config, state_cls,
                                                               factory, kwargs):
  cfg = getattr(module, config)(**kwargs)
  assert dataclasses.is_dataclass(cfg)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.head_init = "zeros"  # any field: the config is frozen
  hash(cfg)  # hashable: jit caches may key on it
  typed = getattr(module, state_cls)
  assert typing.is_typeddict(typed)
  method = getattr(module, factory)(tiny_bert(), **kwargs)
  spec = StreamSpec.from_stream(token_stream(num_tasks=2))
  state = method.init(jax.random.PRNGKey(0), spec)
  assert set(state) <= set(typed.__annotations__), set(state) - set(typed.__annotations__)
  assert typed.__required_keys__ <= set(state)


BAD = [
    (l2p_lib.L2PConfig, {"pool_size": 0}, "l2p: pool_size must be a positive integer"),
    (l2p_lib.L2PConfig, {"pool_size": 3, "top_k": 4}, "top_k 4 exceeds pool_size 3"),
    (l2p_lib.L2PConfig, {"pull_coeff": -1.0}, "pull_coeff must be finite and >= 0"),
    (l2p_lib.L2PConfig, {"head_init": "ones"}, "l2p: head_init must be one of"),
    (dual_lib.DualPromptConfig, {"g_length": True}, "dualprompt: g_length must be a positive"),
    (dual_lib.DualPromptConfig, {"e_layers": ()}, "e_layers must name at least one layer"),
    (dual_lib.DualPromptConfig, {"head_init": "ones"}, "dualprompt: head_init must be"),
    (coda_lib.CodaPromptConfig, {"length": 1}, "length must be >= 2"),
    (coda_lib.CodaPromptConfig, {"ortho_mu": float("nan")}, "ortho_mu must be finite"),
    (coda_lib.CodaPromptConfig, {"head_init": "ones"}, "coda_prompt: head_init must be"),
    (ranpac_lib.RanPACConfig, {"rp_dim": -1}, "rp_dim must be an int >= 0"),
    (ranpac_lib.RanPACConfig, {"ridge_fit_fraction": 1.0}, "ridge_fit_fraction must be in"),
    (ranpac_lib.RanPACConfig, {"ridge_grid": (0.0, 1.0)}, "ridge_grid must be positive"),
    (ranpac_lib.RanPACConfig, {"aux_batch_size": 0}, "ranpac: aux_batch_size must be a positive"),
    (ranpac_lib.RanPACConfig, {"adapt_rank": 2, "adapt_sites": ()}, "needs adapt_sites"),
    (simplecil_lib.SimpleCILConfig, {"aux_batch_size": "8"}, "simplecil: aux_batch_size"),
    (simplecil_lib.SimpleCILConfig, {"adapt_rank": 1.5}, "adapt_rank must be an int >= 0"),
    (sd_lib.SDLoRAConfig, {"lora_rank": 0}, "lora_rank must be a positive int"),
    (sd_lib.SDLoRAConfig, {"init_magnitude": float("inf")}, "init_magnitude must be finite"),
    (sd_lib.SDLoRAConfig, {"rank_schedule": ((1, 4),)}, "rank_schedule must start at task 0"),
]


@pytest.mark.parametrize("config,kwargs,message", BAD,
                         ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD])
def test_config_rejects_bad_values_with_a_clear_error(config, kwargs, message):
  with pytest.raises(ValueError, match=message):
    config(**kwargs)


@pytest.mark.parametrize("fn", [l2p_lib.l2p, dual_lib.dualprompt, coda_lib.coda_prompt,
                                ranpac_lib.ranpac, simplecil_lib.simplecil, sd_lib.sd_lora,
                                prompting.prompt_method, simplecil_lib.head_only_method],
                         ids=lambda fn: fn.__name__)
def test_factories_are_short(fn):
  assert len(inspect.getsource(fn).splitlines()) <= 40


def test_public_functions_are_documented_with_sections_and_typed():
  root = pathlib.Path(__file__).resolve().parents[2]
  sys.path.insert(0, str(root / "experiments"))
  try:
    import shape_metrics  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(root / "experiments"))
  names = {m.__name__ for m in MODULES}
  fns = [f for path in sorted((root / "clx" / "methods").glob("*.py"))
         for f in shape_metrics.functions(path, f"clx.methods.{path.stem}")
         if f"clx.methods.{path.stem}" in names and f.public]
  assert len({f.module for f in fns}) == len(MODULES)
  assert [f"{f.module}.{f.qualname}" for f in fns
          if not (f.documented and f.typed and f.sections)] == []


def test_dead_helpers_are_gone():
  assert not hasattr(prompting, "retrieval_accuracy")
  assert not hasattr(simplecil_lib, "nothing_trained")


# -- host passes compile once per run -------------------------------------------------------


def _ctx(stream, spec, backbone, task_index, batch_size=16):
  split = stream.tasks[task_index].train

  def batches(name="train", *, batch_size=batch_size, **_):
    assert name == "train"
    for i in range(0, len(split.y), batch_size):
      yield {"x": jnp.asarray(split.x[i:i + batch_size]), "y": jnp.asarray(split.y[i:i + batch_size]),
             "mask": jnp.ones(batch_size)}

  return types.SimpleNamespace(task_index=task_index, spec=spec, rng=jax.random.PRNGKey(task_index),
                               base=backbone.params, batches=batches)


def _fresh_backbone():
  """A backbone object no earlier test has compiled anything for."""
  return bert.bert((L,), config=bert.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32), seed=0)


def _counting(monkeypatch, module, name):
  calls = []
  original = getattr(module, name)

  def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, counted)
  return calls


@pytest.mark.parametrize("factory,kwargs,traced", [
    (l2p_lib.l2p, {"pool_size": 4, "length": 2, "top_k": 2, "aux_batch_size": 16},
     (prompting, "query")),
    (ranpac_lib.ranpac, {"rp_dim": 16, "aux_batch_size": 16}, (simplecil_lib, "features")),
    (ranpac_lib.ranpac, {"rp_dim": 16, "aux_batch_size": 16, "adapt_rank": 2},
     (simplecil_lib, "features")),
    (simplecil_lib.simplecil, {"aux_batch_size": 16}, (simplecil_lib, "features")),
], ids=["l2p", "ranpac", "ranpac-phase1", "simplecil"])
def test_end_task_feature_pass_is_traced_once_over_two_tasks(monkeypatch, factory, kwargs, traced):
  stream = token_stream(num_tasks=2)
  spec = StreamSpec.from_stream(stream)
  backbone = _fresh_backbone()
  calls = _counting(monkeypatch, *traced)  # runs only while a pass is traced
  method = factory(backbone, **kwargs)
  state = method.init(jax.random.PRNGKey(0), spec)
  for t in range(2):
    state = method.end_task(state, _ctx(stream, spec, backbone, t))
  # 4 batches per task, same shapes: one trace for the whole run (it was one per task)
  assert len(calls) == 1

"""One name for "which memory rule": ``memory`` in GPM/SGP, BECAME and InfLoRA (issue 14).

The old names (``gpm(variant=)``, ``became(base=)``, ``inflora(variant=)``) still build the
same method for one release, with a DeprecationWarning; giving both names is an error.
"""

import jax
import pytest

from clx.methods import became as became_lib
from clx.methods import gpm as gpm_lib
from clx.methods import inflora as inflora_lib
from clx.methods.base import StreamSpec
from clx.models.mlp import mlp

SPEC = StreamSpec(2, 2, "task", ((0, 1), (2, 3)), (8,))


def _cfg(method):
  """The GPMConfig / InfLoRAConfig a built method closes over."""
  return method.begin_task.args[0].cfg


@pytest.mark.parametrize("memory", ["gpm", "sgp"])
def test_gpm_memory_rule_is_named_memory_and_the_old_name_still_builds_it(memory):
  backbone = mlp((8,), (6,), seed=0)
  new = gpm_lib.gpm(backbone, memory=memory, num_samples=4)
  assert _cfg(new).memory == memory and new.name == memory
  with pytest.warns(DeprecationWarning, match="'variant' is renamed 'memory'"):
    old = gpm_lib.gpm(backbone, variant=memory, num_samples=4)
  assert _cfg(old) == _cfg(new) and old.name == new.name
  for given in ("gpm", "sgp"):  # memory="gpm" (the default's value) given explicitly too
    with pytest.raises(TypeError, match="both 'variant'"):
      gpm_lib.gpm(backbone, memory=given, variant="sgp")
  with pytest.raises(ValueError, match="memory must be"):
    gpm_lib.gpm(backbone, memory="dual")


def test_became_memory_rule_is_named_memory_and_the_old_name_still_builds_it():
  backbone = mlp((8,), (6,), seed=0)
  new = became_lib.became(backbone, memory="sgp", num_samples=4)
  with pytest.warns(DeprecationWarning, match="'base' is renamed 'memory'"):
    old = became_lib.became(backbone, base="sgp", num_samples=4)
  assert old.name == new.name == "became_sgp"
  assert jax.tree.structure(old.init(jax.random.PRNGKey(0), SPEC)) == jax.tree.structure(
      new.init(jax.random.PRNGKey(0), SPEC))
  with pytest.raises(ValueError, match="became memory must be"):
    became_lib.became(backbone, memory="dual")
  with pytest.raises(TypeError, match="both 'base'"):
    became_lib.became(backbone, memory="gpm", base="sgp")


def test_inflora_memory_rule_is_named_memory_and_the_old_name_still_builds_it():
  backbone = mlp((8,), (6,), seed=0)
  new = inflora_lib.inflora(backbone, sites="mlp", lora_rank=3, memory="gpm")
  assert _cfg(new).memory == "gpm"
  with pytest.warns(DeprecationWarning):
    old = inflora_lib.inflora(backbone, sites="mlp", lora_rank=3, variant="gpm")
  assert _cfg(old) == _cfg(new)

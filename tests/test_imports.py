"""The rooms of DESIGN.md and what each may import, checked on the import graph.

Two views of the graph:

* static: every ``import`` statement of every ``clx`` module (function-level and
  ``TYPE_CHECKING`` imports included), parsed with :mod:`ast`, must point into a room
  the importing module's room may use (table below);
* at run time: importing a room in a fresh interpreter must not load modules it does
  not need (``import clx.train`` loads no backbone and no method; ``clx.assets`` loads no
  JAX; ``clx.data`` and ``clx.models`` do not load each other).

| room | may import (clx) | external |
|---|---|---|
| ``ops`` | ops | the standard library, jax, numpy, chex |
| ``assets`` | assets, ``_io`` | no JAX stack |
| ``models`` | models, ops, assets | any |
| ``data`` | data, assets, ``_io`` | any |
| ``methods`` | methods, ops, models | any |
| ``train`` | train, methods.base, data.types, checkpoint, ops | any |
| ``checkpoint`` | checkpoint, ops.tree, ``_io`` | any |
| face (``clx``, experiment, cli, report, workdir, rehearse) | anything | any |

``workdir`` (the run record the CLI and ``experiment`` keep) counts as the face. Below the
rooms, ``_io`` (atomic writes) and ``_lazy`` (import-on-first-use) import only the standard
library and may be imported from any room.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import clx

PACKAGE_DIR = pathlib.Path(clx.__file__).parent
FACE = {"clx", "clx.experiment", "clx.cli", "clx.report", "clx.workdir", "clx.rehearse"}

ALLOWED: dict[str, tuple[str, ...]] = {
    "ops": ("clx.ops",),
    "assets": ("clx.assets", "clx._io"),
    "models": ("clx.models", "clx.ops", "clx.assets"),
    "data": ("clx.data", "clx.assets", "clx._io"),
    "methods": ("clx.methods", "clx.ops", "clx.models"),
    "train": ("clx.train", "clx.methods.base", "clx.data.types", "clx.checkpoint", "clx.ops"),
    "checkpoint": ("clx.checkpoint", "clx.ops.tree", "clx._io"),
    # Helpers below the rooms (standard library only), which every room may import.
    "_io": (),
    "_lazy": (),
}
BELOW = ("clx._io", "clx._lazy")

# Arrows that break the table today, each with the reason it is allowed for now. An entry
# that no longer matches an import fails the test, so this list can only shrink.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("clx.methods.became", "clx.train.loop"):
        "BECAME validates its stage-2 TrainConfig overrides against the loop's TrainConfig "
        "(a function-level import); goes away when the stage-2 config moves to the method",
    ("clx.train.batches", "clx.methods.passes"):
        "the loop plans its batches with passes.index_plan, the one padding rule it shares "
        "with the methods' host passes (to move behind methods.base)",
    ("clx.train.evaluate", "clx.methods.passes"):
        "evaluation calls passes.predict_fn, the one predict-with-mask wrapper it shares with "
        "the methods' host passes (to move behind methods.base)",
    ("clx.train.sharding", "clx.models.partitioning"):
        "placing a backbone's parameters uses its partitioning rules (function-level import; "
        "partitioning is pure rules on parameter paths, no backbone is imported)",
}

OPS_EXTERNAL = {"jax", "jaxlib", "numpy", "chex"}
JAX_STACK = {"jax", "jaxlib", "flax", "optax", "orbax", "chex", "tensorflow", "grain"}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = _modules()


def _target(name: str) -> str:
  """The module an imported dotted name refers to (``clx.ops.lora.apply`` → ``clx.ops.lora``)."""
  while name not in MODULES and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def _imports(module: str, top_level_only: bool = False) -> list[tuple[str, int]]:
  """``(imported name, line)`` for every import in ``module``; ``from M import a`` gives ``M.a``.

  All imports (function-level and ``TYPE_CHECKING`` ones included), or only the module's
  top-level statements (what importing it executes).
  """
  path = MODULES[module]
  tree = ast.parse(path.read_text(), str(path))
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = []
  for node in (tree.body if top_level_only else ast.walk(tree)):
    if isinstance(node, ast.Import):
      out += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      if source == "__future__":
        continue
      out += [(f"{source}.{alias.name}", node.lineno) for alias in node.names]
  return out


def _room(module: str) -> str:
  if module in FACE:
    return "face"
  return module.split(".")[1]


def _arrows() -> list[tuple[str, str, int]]:
  """``(importer, imported module or external top-level name, line)`` over all clx modules."""
  arrows = []
  for module in MODULES:
    for name, line in _imports(module):
      target = _target(name) if name.split(".")[0] == "clx" else name.split(".")[0]
      if target != module:
        arrows.append((module, target, line))
  return arrows


ARROWS = _arrows()


def _allowed(importer: str, target: str) -> bool:
  room = _room(importer)
  if room == "face" or not target.startswith("clx") or target in BELOW:
    return True
  return any(target == p or target.startswith(p + ".") for p in ALLOWED[room])


def test_every_module_has_a_room():
  rooms = {_room(m) for m in MODULES}
  assert rooms <= {"face", *ALLOWED}, f"modules outside every room: {rooms - {'face', *ALLOWED}}"


def test_no_forbidden_arrow_between_rooms():
  bad = sorted({(i, t): line for i, t, line in ARROWS
                if not _allowed(i, t) and (i, t) not in EXCEPTIONS}.items())
  assert not bad, "forbidden imports (DESIGN.md, 'Rooms'):\n" + "\n".join(
      f"  {MODULES[i].relative_to(PACKAGE_DIR.parent)}:{line}: {_room(i)} → {t}"
      for (i, t), line in bad)


def test_exceptions_are_still_needed():
  present = {(i, t) for i, t, _ in ARROWS if not _allowed(i, t)}
  stale = sorted(set(EXCEPTIONS) - present)
  assert not stale, f"these allowed arrows no longer exist; remove them from EXCEPTIONS: {stale}"


def test_ops_import_only_jax_numpy_and_the_standard_library():
  bad = sorted({(i, t) for i, t, _ in ARROWS if _room(i) == "ops" and not t.startswith("clx")
                and t not in OPS_EXTERNAL and t not in sys.stdlib_module_names})
  assert not bad, f"ops import outside jax/numpy/chex/stdlib: {bad}"


def test_assets_import_no_jax_stack():
  bad = sorted({(i, t) for i, t, _ in ARROWS if _room(i) in ("assets", "_io", "_lazy")
                and t in JAX_STACK})
  assert not bad, f"clx.assets / clx._io / clx._lazy import the JAX stack: {bad}"


def _loaded_after(statement: str) -> set[str]:
  """The modules loaded by ``statement`` in a fresh interpreter."""
  code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
  # A hang guard, not a speed limit: importing JAX took > 120 s on a 2-core machine at load 11.
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, check=False, cwd=PACKAGE_DIR.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _backbones_and_methods() -> set[str]:
  backbones = {m for m in MODULES if m.startswith("clx.models.")} - {"clx.models.base"}
  methods = {m for m in MODULES if m.startswith("clx.methods.")}
  return backbones | (methods - {"clx.methods.base", "clx.methods.passes"})


def test_importing_the_loop_loads_no_backbone_and_no_method():
  loaded = _loaded_after("import clx.train")
  assert "clx.train.loop" in loaded  # the probe itself works
  unexpected = sorted(_backbones_and_methods() & loaded)
  assert not unexpected, f"import clx.train loads {unexpected}"


def test_assets_load_no_jax_and_neither_data_nor_models():
  assets = sorted(m for m in MODULES if m.startswith("clx.assets"))
  assert "clx.assets.hub" in assets and "clx.assets.tokenize" in assets
  loaded = _loaded_after("\n".join(f"import {m}" for m in assets))
  assert set(assets) <= loaded
  unexpected = sorted(m for m in loaded if m.split(".")[0] in JAX_STACK
                      or m.startswith(("clx.data", "clx.models")))
  assert not unexpected, f"importing clx.assets loads {unexpected[:10]}"


@pytest.mark.parametrize("statement, other", [
    ("import clx.data.text, clx.data.assets", "clx.models"),
    ("import clx.models.bert", "clx.data"),
])
def test_data_and_models_do_not_load_each_other(statement, other):
  loaded = _loaded_after(statement)
  unexpected = sorted(m for m in loaded if m == other or m.startswith(other + "."))
  assert not unexpected, f"{statement!r} loads {unexpected}"


def test_lazy_method_registry_matches_the_modules():
  from clx import methods  # pylint: disable=import-outside-toplevel
  declared = {module: set(names) for module, names in methods._METHOD_MODULES.items()}  # pylint: disable=protected-access
  with_registry = set()
  for module, path in MODULES.items():
    if module.startswith("clx.methods.") and any(
        isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REGISTRY" for t in node.targets)
        for node in ast.parse(path.read_text()).body):
      with_registry.add(module.rsplit(".", 1)[1])
  assert with_registry == set(declared), (
      "clx/methods modules with a REGISTRY must be listed in clx.methods._METHOD_MODULES: "
      f"missing {sorted(with_registry - set(declared))}, extra {sorted(set(declared) - with_registry)}")
  for module, names in declared.items():
    registry = __import__(f"clx.methods.{module}", fromlist=["REGISTRY"]).REGISTRY
    assert set(registry) == names, f"clx.methods.{module}: REGISTRY {sorted(registry)} vs table {sorted(names)}"
  assert sorted(methods.REGISTRY) == sorted(set().union(*declared.values()))


def test_lazy_model_registry_resolves_every_factory():
  from clx import models  # pylint: disable=import-outside-toplevel
  for name in models._FACTORIES:  # pylint: disable=protected-access
    assert callable(models._FACTORIES[name]), name  # pylint: disable=protected-access


def _module_level_closure(module: str) -> set[str]:
  """The clx modules that importing ``module`` executes by its top-level imports, transitively."""
  seen, todo = set(), [module]
  while todo:
    current = todo.pop()
    if current in seen or current not in MODULES:
      continue
    seen.add(current)
    parts = current.split(".")
    todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
    todo += [_target(name) for name, _ in _imports(current, top_level_only=True)
             if name.startswith("clx.")]
  return seen


def test_building_one_method_by_name_imports_only_that_method():
  loaded = _loaded_after("import clx.methods as m\n"
                         "assert 'sparc' in m.REGISTRY and 'gpm' in sorted(m.REGISTRY)\n"
                         "m.REGISTRY['gpm']")
  assert "clx.methods.gpm" in loaded
  needed = _module_level_closure("clx.methods.gpm")
  unexpected = sorted((_backbones_and_methods() - needed) & loaded)
  assert not unexpected, f"looking up 'gpm' loads {unexpected} (gpm itself needs {sorted(needed)})"


def test_lazy_registry_semantics():
  from clx._lazy import LazyRegistry  # pylint: disable=import-outside-toplevel
  registry = LazyRegistry("thing", {"dumps": "json:dumps", "broken": "json"})
  assert "dumps" in registry and "nope" not in registry and len(registry) == 2
  assert registry["dumps"] is json.dumps
  with pytest.raises(KeyError):
    registry["nope"]  # pylint: disable=pointless-statement
  with pytest.raises(LookupError, match="json.REGISTRY has no thing 'broken'"):
    registry["broken"]  # pylint: disable=pointless-statement
  assert registry.setdefault("dumps", len) is json.dumps  # a table entry is kept
  registry["extra"] = len  # a caller's entry wins and is listed after the table
  registry.update({"dumps": repr})
  assert list(registry) == ["dumps", "broken", "extra"] and registry["dumps"] is repr
  del registry["broken"]
  assert sorted(registry) == ["dumps", "extra"] and registry.module_of("extra") is None


@pytest.mark.parametrize("old, new, names", [
    ("clx.data.assets", "clx.assets.wheels",
     ("AssetChecksumError", "AssetUnavailableError", "CacheDirError", "WheelAsset", "ASSETS",
      "cache_dir", "fetch_asset", "fetch_wheel_member", "fetch_wheel_members", "is_offline")),
    ("clx.models.hub", "clx.assets.hub",
     ("PRETRAINED", "ModelFolder", "check_folder", "fetch_pretrained", "known_models", "resolve")),
    ("clx.models.tokenize", "clx.assets.tokenize", ("BUCKETS", "TextTokenizer", "bucket_length")),
    ("clx.data.text", "clx.assets.debs",
     ("DebAsset", "deb_control", "deb_members", "fetch_deb_members", "read_ar")),
    ("clx.data.text", "clx.data.text.streams", ("text_stream", "tokenize_text_stream", "TextStream")),
    ("clx.checkpoint", "clx.checkpoint.checkpointer", ("TaskCheckpointer",)),
    ("clx.checkpoint", "clx.checkpoint.delta", ("state_delta", "apply_delta")),
])
def test_old_import_paths_give_the_moved_objects(old, new, names):
  import importlib  # pylint: disable=import-outside-toplevel
  old_module, new_module = importlib.import_module(old), importlib.import_module(new)
  for name in names:
    assert getattr(old_module, name) is getattr(new_module, name), f"{old}.{name}"

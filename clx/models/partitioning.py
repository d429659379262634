"""Parameter sharding rules: spread a model's weights over a device mesh.

Parameters are nested dicts of arrays with string keys (``Backbone.params``);
a parameter is named by its path, the keys joined with ``"/"``
(``"layers/3/self_attn/q_proj/kernel"``). A *rule set* maps a path and shape to
a :class:`jax.sharding.PartitionSpec`; :func:`shard_params` places every array
with the ``NamedSharding`` its spec gives on a mesh, and :func:`param_shardings`
returns those shardings for ``jax.jit(in_shardings=..., out_shardings=...)``.
Under ``jit`` XLA's SPMD partitioner then inserts the collectives, so model
code never changes.

Two kinds of rule sets:

- a sequence of ``(regex, spec)`` pairs: the first regex that *fully* matches
  the path gives the spec; unmatched parameters are replicated;
- a callable ``rule(path, shape, mesh) -> PartitionSpec | None`` (``None``:
  replicated), for shape-dependent schemes such as :func:`fsdp_rules`.

Ready-made rule sets:

- :func:`llama_rules`: Megatron-style tensor parallelism for the Llama layout
  (:mod:`clx.models.llama`) on a ``"model"`` axis: the vocabulary (embedding
  rows, ``lm_head`` columns), the attention heads (q/k/v output features,
  o input features) and the MLP hidden units (gate/up outputs, down inputs)
  are split; norms are replicated. ``fsdp_axis="data"`` additionally splits
  the other dimension of every matrix over the data axis (2-D sharding,
  ZeRO-3 style), so a mesh ``("data", "model")`` holds one copy of the weights
  in total.
- :func:`vit_rules`, :func:`bert_rules`: the same Megatron split for the
  :mod:`clx.models.vit` and :mod:`clx.models.bert` layouts (q/k/v and the first
  MLP layer column-parallel, the attention output and the second MLP layer
  row-parallel; patch / position embeddings and norms replicated), and
  :func:`transformer_rules`, the union of the three layouts (what the training
  loop uses for ``param_sharding="tensor"``).
- :func:`fsdp_rules`: fully sharded data parallelism on one axis (default
  ``"fsdp"``): each parameter with at least ``min_size`` elements is split
  along its largest dimension divisible by the axis size.
- :func:`default_rules`: picks one of the above from the mesh's axis names.

A dimension whose size is not divisible by the mesh axes it is assigned to is
left unsplit (replicated along those axes) rather than failing, so the same
rules serve every model size; :func:`describe` shows what happened.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RuleFn = Callable[[str, tuple[int, ...], Mesh], Union[P, None]]
Rules = Union[Sequence[tuple[str, P]], RuleFn]


# ---------------------------------------------------------------------------------------------
# Rule sets


def llama_rules(model_axis: str | tuple[str, ...] = "model",
                fsdp_axis: str | tuple[str, ...] | None = None) -> tuple[tuple[str, P], ...]:
  """Tensor-parallel rules for :mod:`clx.models.llama` parameters.

  Flax kernels are ``(in, out)``. Column-parallel layers (q/k/v, gate/up,
  ``lm_head``) split their output features on ``model_axis``; row-parallel
  layers (o, down) split their input features; the embedding table
  ``(vocab, d)`` splits the vocabulary. Biases follow their layer's output
  split; RMSNorm scales are replicated.

  Args:
    model_axis: mesh axis (or axes) for heads, MLP hidden units and vocabulary.
    fsdp_axis: optional mesh axis (or axes) for the *other* dimension of every
      matrix (2-D sharding). ``None``: that dimension is replicated.

  Returns:
    ``(regex, PartitionSpec)`` pairs for :func:`param_specs` / :func:`shard_params`.
  """
  m, f = model_axis, fsdp_axis
  layer = r"layers/\d+/"
  return (
      (r"embed_tokens/embedding", P(m, f)),
      (layer + r"self_attn/(q|k|v)_proj/kernel", P(f, m)),
      (layer + r"self_attn/(q|k|v)_proj/bias", P(m)),
      (layer + r"self_attn/o_proj/kernel", P(m, f)),
      (layer + r"mlp/(gate|up)_proj/kernel", P(f, m)),
      (layer + r"mlp/(gate|up)_proj/bias", P(m)),
      (layer + r"mlp/down_proj/kernel", P(m, f)),
      (r"lm_head/kernel", P(f, m)),
      (r".*", P()),  # norms, o/down biases
  )


def vit_rules(model_axis: str | tuple[str, ...] = "model",
              fsdp_axis: str | tuple[str, ...] | None = None) -> tuple[tuple[str, P], ...]:
  """Tensor-parallel rules for :mod:`clx.models.vit` parameters (see :func:`llama_rules`).

  ``blocks/<i>/attn/{query,key,value}`` and ``blocks/<i>/mlp/fc1`` split their
  output features (heads / hidden units) on ``model_axis``; ``attn/out`` and
  ``mlp/fc2`` split their input features. Everything else (patch embedding,
  CLS token, position embeddings, LayerNorms, out/fc2 biases) is replicated:
  under 1 % of a ViT-B/L's parameters.

  Args:
    model_axis: mesh axis (or axes) for heads and MLP hidden units.
    fsdp_axis: optional mesh axis (or axes) for the other dimension of every
      split matrix (2-D sharding); ``None``: replicated along it.

  Returns:
    ``(regex, PartitionSpec)`` pairs.
  """
  m, f = model_axis, fsdp_axis
  block = r"blocks/\d+/"
  return (
      (block + r"attn/(query|key|value)/kernel", P(f, m)),
      (block + r"attn/(query|key|value)/bias", P(m)),
      (block + r"attn/out/kernel", P(m, f)),
      (block + r"mlp/fc1/kernel", P(f, m)),
      (block + r"mlp/fc1/bias", P(m)),
      (block + r"mlp/fc2/kernel", P(m, f)),
      (r".*", P()),
  )


def bert_rules(model_axis: str | tuple[str, ...] = "model",
               fsdp_axis: str | tuple[str, ...] | None = None) -> tuple[tuple[str, P], ...]:
  """Tensor-parallel rules for :mod:`clx.models.bert` parameters (see :func:`llama_rules`).

  ``attention/{query,key,value}`` and ``ffn/intermediate`` are column-parallel,
  ``attention/output`` and ``ffn/output`` row-parallel, the word embedding
  splits its vocabulary rows; position / token-type embeddings and LayerNorms
  are replicated.

  Args:
    model_axis: mesh axis (or axes) for heads, hidden units and vocabulary.
    fsdp_axis: optional mesh axis (or axes) for the other dimension (2-D sharding).

  Returns:
    ``(regex, PartitionSpec)`` pairs.
  """
  m, f = model_axis, fsdp_axis
  layer = r"encoder/layers/\d+/"
  return (
      (r"embeddings/word_embeddings/embedding", P(m, f)),
      (layer + r"attention/(query|key|value)/kernel", P(f, m)),
      (layer + r"attention/(query|key|value)/bias", P(m)),
      (layer + r"attention/output/kernel", P(m, f)),
      (layer + r"ffn/intermediate/kernel", P(f, m)),
      (layer + r"ffn/intermediate/bias", P(m)),
      (layer + r"ffn/output/kernel", P(m, f)),
      (r".*", P()),
  )


def transformer_rules(model_axis: str | tuple[str, ...] = "model",
                      fsdp_axis: str | tuple[str, ...] | None = None) -> tuple[tuple[str, P], ...]:
  """:func:`llama_rules`, :func:`vit_rules` and :func:`bert_rules` in one rule set.

  The three layouts' paths do not overlap, so one rule set serves every clx
  transformer; parameters of other models (MLPs, conv nets) are replicated.

  Args:
    model_axis, fsdp_axis: as in :func:`llama_rules`.

  Returns:
    ``(regex, PartitionSpec)`` pairs (one final catch-all ``P()``).
  """
  rules = []
  for family in (llama_rules, vit_rules, bert_rules):
    rules.extend(r for r in family(model_axis, fsdp_axis) if r[0] != r".*")
  return (*rules, (r".*", P()))


def fsdp_rules(axis: str | tuple[str, ...] = "fsdp", min_size: int = 1024) -> RuleFn:
  """Fully sharded data parallelism: split each large parameter's largest dimension.

  Args:
    axis: mesh axis (or axes) to shard over.
    min_size: parameters with fewer elements stay replicated (norm scales, biases).

  Returns:
    A rule callable ``(path, shape, mesh) -> PartitionSpec``. Among the
    dimensions divisible by the axis size the largest is split (the first one
    on ties); a parameter with none stays replicated.
  """
  axes = (axis,) if isinstance(axis, str) else tuple(axis)

  def rule(path: str, shape: tuple[int, ...], mesh: Mesh) -> P | None:
    del path
    _check_axes(axes, mesh, "fsdp_rules")
    size = math.prod(mesh.shape[a] for a in axes)
    if math.prod(shape) < min_size or not shape:
      return P()
    candidates = [d for d in range(len(shape)) if shape[d] % size == 0]
    if not candidates:
      return P()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[dim] = axis
    return P(*spec)

  return rule


def default_rules(mesh: Mesh) -> Rules:
  """Rules chosen from the mesh's axis names.

  - a ``"model"`` axis: :func:`llama_rules` on it (with ``fsdp_axis="fsdp"``
    when the mesh also has an ``"fsdp"`` axis);
  - else an ``"fsdp"`` axis: :func:`fsdp_rules` on it;
  - else (e.g. a pure ``("data",)`` mesh): everything replicated.
  """
  names = tuple(mesh.axis_names)
  if "model" in names:
    return llama_rules("model", "fsdp" if "fsdp" in names else None)
  if "fsdp" in names:
    return fsdp_rules("fsdp")
  return ((r".*", P()),)


# ---------------------------------------------------------------------------------------------
# Applying rules


def _check_axes(axes: Sequence[Any], mesh: Mesh, where: str) -> None:
  missing = [a for a in axes if a is not None and a not in mesh.axis_names]
  if missing:
    raise ValueError(f"{where}: mesh axes {missing} are not in the mesh (axes "
                     f"{tuple(mesh.axis_names)}); build the mesh with them or change the rules")


def _flatten(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
  """``spec`` checked against ``mesh`` and ``shape``; indivisible dimensions unsplit."""
  entries = tuple(spec)
  if len(entries) > len(shape):
    raise ValueError(f"parameter {path!r} of shape {shape} got PartitionSpec {spec} with "
                     f"{len(entries)} entries (more than its {len(shape)} dimensions)")
  used: list[str] = []
  out = []
  for dim, entry in enumerate(entries):
    axes = _flatten(entry)
    _check_axes(axes, mesh, f"rule for {path!r}")
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if axes and shape[dim] % size:
      out.append(None)
      continue
    dup = [a for a in axes if a in used]
    if dup:
      raise ValueError(f"parameter {path!r}: PartitionSpec {spec} uses mesh axes {dup} twice")
    used.extend(axes)
    out.append(entry)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def spec_for(path: str, shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
  """The ``PartitionSpec`` of one parameter (see the module docstring)."""
  shape = tuple(int(s) for s in shape)
  if callable(rules):
    spec = rules(path, shape, mesh)
  else:
    spec = None
    for pattern, candidate in rules:
      if re.fullmatch(pattern, path):
        spec = candidate
        break
  if spec is None:
    spec = P()
  if not isinstance(spec, P):
    raise TypeError(f"rule for {path!r} returned {type(spec).__name__}, expected a PartitionSpec")
  return _fit(spec, shape, mesh, path)


def _path_str(path) -> str:
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(str(entry.name))
    else:
      parts.append(str(entry))
  return "/".join(parts)


def param_specs(params: Mapping, mesh: Mesh, rules: Rules | None = None):
  """A tree like ``params`` holding each parameter's ``PartitionSpec``.

  Args:
    params: nested dict of arrays (or ``jax.ShapeDtypeStruct``s) with string keys.
    mesh: the device mesh.
    rules: a rule set (default :func:`default_rules` of ``mesh``).
  """
  rules = default_rules(mesh) if rules is None else rules
  return jax.tree_util.tree_map_with_path(
      lambda path, v: spec_for(_path_str(path), np.shape(v), rules, mesh), params)


def param_shardings(params: Mapping, mesh: Mesh, rules: Rules | None = None):
  """A tree like ``params`` holding each parameter's ``NamedSharding`` on ``mesh``."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Mapping, mesh: Mesh, rules: Rules | None = None):
  """``params`` placed on ``mesh`` with the shardings given by ``rules``.

  Args:
    params: nested dict of arrays (host NumPy or device arrays).
    mesh: e.g. ``Mesh(devices.reshape(2, 2), ("data", "model"))`` or
      ``Mesh(devices, ("fsdp",))``.
    rules: a rule set (default :func:`default_rules` of ``mesh``).

  Returns:
    The same tree of ``jax.Array``s, each sharded as its spec says (each device
    holds only its shards).
  """
  shardings = param_shardings(params, mesh, rules)
  return jax.tree.map(jax.device_put, params, shardings)


def describe(params: Mapping) -> dict[str, str]:
  """``{path: "shape spec"}`` of placed parameters (``"replicated"`` when unsharded)."""
  out = {}
  for path, v in jax.tree_util.tree_leaves_with_path(params):
    sharding = getattr(v, "sharding", None)
    spec = getattr(sharding, "spec", None)
    text = "replicated" if spec is None or all(e is None for e in spec) else str(spec)
    out[_path_str(path)] = f"{tuple(v.shape)} {text}"
  return out


def abstract_bytes_per_device(shapes: Mapping, shardings: Mapping) -> dict[Any, int]:
  """Bytes each device would hold if ``shapes`` were placed with ``shardings``.

  Checks a placement without materialising the arrays (e.g. ViT-L from
  ``jax.eval_shape``).

  Args:
    shapes: tree of arrays or ``jax.ShapeDtypeStruct``s.
    shardings: a matching tree of ``jax.sharding.Sharding``s.

  Returns:
    ``{device: bytes}`` over the shardings' devices.
  """
  out: dict[Any, int] = {}
  for v, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
    shape, itemsize = tuple(v.shape), np.dtype(v.dtype).itemsize
    for device, index in sharding.devices_indices_map(shape).items():
      size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape))
      out[device] = out.get(device, 0) + size * itemsize
  return out


def bytes_per_device(params: Mapping) -> dict[Any, int]:
  """Bytes of parameter shards each device holds (to check a model really spreads)."""
  out: dict[Any, int] = {}
  for v in jax.tree.leaves(params):
    for shard in v.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out

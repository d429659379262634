"""The backbone contract shared by every model in clx.

A :class:`Backbone` bundles an NNX ``graphdef`` with its frozen base parameters
as a plain nested dict with string keys (``params``). Methods never edit model
code: they compute *effective* parameters (base + adapters, or a fine-tuned
copy) and call :meth:`Backbone.apply`, a pure function of
``(params, inputs)``, so the same backbone object serves every method and the
frozen base is loaded once and never checkpointed per task.

The contract every backbone module follows (``module(x, *, taps=None, prefix=None)``):

- ``x``: inputs, ``(n, *input_shape)``. Images are float arrays; text is int32
  token ids ``(n, L)`` where ``pad_id`` marks padding (the attention mask is
  ``x != pad_id``), so the training loop treats every modality alike.
- returns pooled features ``(n, feature_dim)`` (CLS or mean pooling, as the
  checkpoint expects) when ``taps is None``;
- ``taps="inputs"`` additionally returns ``{site: input}`` with the raw input
  activations of every adaptation site (``(n, d)`` or ``(n, L, d)``), for small
  models (GPM representation matrices);
- ``taps="gram"`` additionally returns ``{site: {"gram": XᵀX (d, d) float32,
  "count": number of rows}}`` over the valid (non-padding) tokens of the batch,
  so a pass over a dataset accumulates second moments without keeping tokens
  (InfLoRA's input matrix, GPM, SPARC's PCA);
- ``prefix``: optional soft-prompt embeddings ``(p, d)`` or ``(n, p, d)``
  prepended to the input embeddings (SPARC); ignored by non-sequence models.

- ``adapters`` (an argument of :meth:`Backbone.apply`, not of the module):
  LoRA adapters ``{kernel path: {"a": (d_in, r), "b": (r, d_out)}}`` computed
  *factored* at their sites, ``y = x W + bias + scale·((x a) b)``, instead of
  being merged into ``W`` (:func:`clx.ops.lora.apply_adapters`); every site
  whose module is an ``nnx.Linear`` called as ``layer(x)`` supports it.

Sites are named by the path of their kernel in ``params`` (``"lin1/kernel"``,
``"encoder/layers/3/attention/key/kernel"``), the same key adapters use;
:attr:`Backbone.sites` groups them by role (``q``, ``k``, ``v``, ``o``,
``mlp_in``, ``mlp_out``, ``mlp``) so methods target sites without knowing the
model. :attr:`Backbone.site_groups` names the sites that read one input array
(the q/k/v kernels of an attention block: one Gram matrix serves them all), and
:attr:`Backbone.embedding` the token-embedding table of text models, so methods
neither split path strings nor probe parameter names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clx.ops import lora as lora_ops

Params = dict[str, Any]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Compute dtypes of the transformer backbones (ViT, BERT, Llama).

The mixed-precision policy: parameters stay float32 masters (trainable ones
are updated in float32 and the gradients are float32); each layer casts its
kernel to the compute dtype where it is used, so activations and matmuls run
in ``bfloat16``; LayerNorm/RMSNorm statistics, the attention softmax, pooling
and the Gram / input taps are computed in float32, and every subspace, Fisher
and merge op downstream (``clx.ops``) receives float32. Set it per experiment
with the model argument ``dtype`` (``"model": {"name": "minilm", "dtype":
"bfloat16"}``).
"""


def compute_dtype(dtype, who: str = "model") -> jnp.dtype:
  """``dtype`` (a name or dtype) checked against :data:`COMPUTE_DTYPES`.

  Args:
    dtype: ``"bfloat16"``, ``jnp.bfloat16``, ``"float32"``, ...
    who: the model, for the error message.

  Returns:
    The ``jnp.dtype``.

  Raises:
    ValueError: not a floating compute dtype clx supports.
  """
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or resolved.name not in COMPUTE_DTYPES:
    raise ValueError(f"{who}: compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
  return resolved


def to_str_keys(tree: Mapping) -> Params:
  """Nested mapping → nested dict with string keys (``nnx.List`` gives ints)."""
  return {str(k): to_str_keys(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, Params]:
  """``nnx.split`` a module into graphdef, a state template and pure params."""
  graphdef, state = nnx.split(module, nnx.Param)
  return graphdef, state, to_str_keys(nnx.to_pure_dict(state))


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A frozen feature extractor with a pure ``apply``.

  Attributes:
    name: model name (e.g. ``"mlp-784-100-100"``).
    graphdef: the NNX graph definition.
    template: an ``nnx.State`` whose structure matches ``params`` (values are
      replaced on every call; it is never mutated).
    params: frozen base parameters, nested dict of arrays with string keys.
    feature_dim: size of the pooled feature vector returned by ``apply``.
    input_shape: shape of one input example.
    sites: kernel paths of the adaptation/projection sites, grouped by role.
    pad_id: token id of padding (text models), else None.
    supports_grad_projection: whether ``apply(grad_projection=...)`` works.
    grad_projection_sites: the sites it works for (None: every site).
    train_kwargs: training-only call arguments the module takes (``"rng"``
      for dropout, ``"mask"`` for batch statistics over the real rows).
    site_groups: ``{group: (site path, ...)}``: sites that read the same input
      array (:func:`shared_input_groups`); a site in no group reads its own.
    embedding: path of the token-embedding table ``(vocab, d)`` in ``params``
      (text models), else None.
  """

  name: str
  graphdef: nnx.GraphDef
  template: nnx.State
  params: Params
  feature_dim: int
  input_shape: tuple[int, ...]
  sites: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  pad_id: int | None = None
  supports_grad_projection: bool = False
  grad_projection_sites: tuple[str, ...] | None = None
  train_kwargs: tuple[str, ...] = ()
  site_groups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  embedding: str | None = None

  def __post_init__(self):
    declared = {p for paths in self.sites.values() for p in paths}
    stray = {g: [m for m in members if m not in declared]
             for g, members in self.site_groups.items()}
    stray = {g: m for g, m in stray.items() if m}
    if stray:
      raise ValueError(f"{self.name}: site_groups name paths that are not sites: {stray}")

  @classmethod
  def from_module(cls, name: str, module: nnx.Module, feature_dim: int,
                  input_shape: tuple[int, ...], sites: Mapping[str, tuple[str, ...]] | None = None,
                  pad_id: int | None = None, supports_grad_projection: bool = False,
                  grad_projection_sites: tuple[str, ...] | None = None,
                  train_kwargs: tuple[str, ...] = (),
                  site_groups: Mapping[str, tuple[str, ...]] | None = None,
                  embedding: str | None = None) -> "Backbone":
    """A backbone from an NNX module (its ``nnx.Param`` leaves become ``params``)."""
    graphdef, template, params = split_params(module)
    return cls(name, graphdef, template, params, feature_dim, tuple(input_shape),
               dict(sites or {}), pad_id, supports_grad_projection,
               None if grad_projection_sites is None else tuple(grad_projection_sites),
               tuple(train_kwargs), dict(site_groups or {}), embedding)

  def group_of(self, site: str) -> str | None:
    """The :attr:`site_groups` key of ``site`` (a kernel path), or None if it reads its own input."""
    for group, members in self.site_groups.items():
      if site in members:
        return group
    return None

  def projects_through_inputs(self, site: str) -> bool:
    """Whether ``apply(grad_projection={site: ...})`` projects that site's gradient."""
    if not self.supports_grad_projection:
      return False
    return self.grad_projection_sites is None or site in self.grad_projection_sites

  def site_paths(self, roles: str | tuple[str, ...]) -> tuple[str, ...]:
    """Kernel paths of the sites with the given role(s), e.g. ``("k", "v")``."""
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    unknown = [r for r in roles if r not in self.sites]
    if unknown:
      raise ValueError(f"{self.name} has no site role(s) {unknown}; roles: {sorted(self.sites)}")
    return tuple(p for r in roles for p in self.sites[r])

  def merge(self, params: Params, *, adapters: Mapping[str, Any] | None = None,
            adapter_scale: Any = 1.0) -> nnx.Module:
    """A module carrying ``params`` (works on tracers inside ``jax.jit``).

    Args:
      params: the backbone parameters (``self.params``' structure).
      adapters: optional ``{kernel path: adapter spec}`` computed factored at their
        sites (:func:`install_adapters`); the module is a fresh copy, so nothing
        outside this call sees them.
      adapter_scale: scalar multiplier of every adapter branch.

    Returns:
      The NNX module.
    """
    state = jax.tree.map(lambda v: v, self.template)
    nnx.replace_by_pure_dict(state, params)
    module = nnx.merge(self.graphdef, state)
    if adapters:
      lora_ops.check_adapters(params, adapters)
      install_adapters(module, adapters, adapter_scale, self.name)
    return module

  def check_factored(self, paths: Iterable[str]) -> None:
    """Raises ValueError unless every kernel path in ``paths`` can take a factored adapter
    (:meth:`apply` ``adapters=``): each must be the kernel of an ``nnx.Linear``."""
    install_adapters(self.merge(self.params), {p: None for p in paths}, 1.0, self.name)

  def apply(self, params: Params, x: jax.Array, *, taps: str | None = None, prefix=None,
            grad_projection=None, tap_sites=None, rng=None, mask=None,
            adapters: Mapping[str, Any] | None = None, adapter_scale: Any = 1.0):
    """Pooled features ``(n, feature_dim)`` for inputs ``x`` of shape ``(n, *input_shape)``.

    ``taps`` (``"inputs"`` or ``"gram"``) also returns per-site input taps,
    see the module docstring. ``prefix`` prepends soft-prompt embeddings.
    ``grad_projection`` (``{site: (basis, scale|None)}``, models that support
    it) projects those sites' kernel gradients through their inputs.
    ``tap_sites`` (roles like ``("k", "v")`` or kernel paths) keeps only those
    taps; under ``jax.jit`` the others are dead code and never computed, so a
    Gram pass costs only what it returns.
    ``rng`` (training passes) turns on dropout and ``mask`` (n,) marks the real
    rows of a padded batch for batch statistics, on models that use them
    (:attr:`train_kwargs`); other models ignore both, so methods pass them
    unconditionally.
    ``adapters`` (``{kernel path: {"a": (d_in, r), "b": (r, d_out)}}``, a stacked
    adapter or a list of them, as :func:`clx.ops.lora.apply_adapters` takes) are
    computed factored at their sites: ``y = x W + b + adapter_scale·Σ_j (x a_j) b_j``,
    equal to ``apply(lora.apply_adapters(params, adapters, adapter_scale), x)`` up to
    float rounding, without forming ``W + a b`` (so the backward never forms the dense
    kernel gradient of an adapted site).
    """
    if taps not in (None, "inputs", "gram"):
      raise ValueError(f"taps must be None, 'inputs' or 'gram', got {taps!r}")
    kwargs = {"taps": taps}
    if prefix is not None:
      kwargs["prefix"] = prefix
    if grad_projection:
      if not self.supports_grad_projection:
        raise ValueError(f"{self.name} does not support grad_projection; project gradients instead")
      unsupported = [s for s in grad_projection if not self.projects_through_inputs(s)]
      if unsupported:
        raise ValueError(f"{self.name} cannot project {unsupported} through inputs; "
                         "project those gradients instead")
      kwargs["grad_projection"] = grad_projection
      both = sorted(set(grad_projection) & set(adapters or {}))
      if both:
        raise ValueError(f"{self.name}: sites {both} have both grad_projection and a factored "
                         "adapter; merge the adapters into params instead")
    if rng is not None and "rng" in self.train_kwargs:
      kwargs["rng"] = rng
    if mask is not None and "mask" in self.train_kwargs:
      kwargs["mask"] = mask
    out = self.merge(params, adapters=adapters, adapter_scale=adapter_scale)(x, **kwargs)
    if taps is None or tap_sites is None:
      return out
    features, tapped = out
    wanted = self._resolve_sites(tap_sites)
    missing = [s for s in wanted if s not in tapped]
    if missing:
      raise ValueError(f"{self.name} has no taps for sites {missing}; available: {sorted(tapped)}")
    return features, {s: tapped[s] for s in wanted}

  def _resolve_sites(self, sites) -> tuple[str, ...]:
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    out = []
    for s in sites:
      out.extend(self.sites[s] if s in self.sites else (s,))
    return tuple(dict.fromkeys(out))

  def num_params(self) -> int:
    """Number of scalars in the base parameters."""
    return sum(int(v.size) for v in jax.tree.leaves(self.params))


class FactoredLinear:
  """An ``nnx.Linear`` with a LoRA branch computed factored: ``layer(x) + scale·Σ_j (x a_j) b_j``.

  Stands in for the layer inside one forward of a freshly merged module
  (:func:`install_adapters`). It exposes no ``kernel``: module code that reads
  the kernel directly instead of calling the layer fails loudly rather than
  silently skipping the branch.
  """

  def __init__(self, layer: nnx.Linear, spec: Any, scale: Any, path: str):
    self._layer, self._spec, self._scale, self._path = layer, spec, scale, path

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x (..., d_in)`` → ``(..., d_out)`` in the layer's output dtype."""
    y = self._layer(x)
    return y + lora_ops.lora_branch(x.astype(y.dtype), self._spec, self._scale,
                                    path=self._path)


def install_adapters(module: nnx.Module, adapters: Mapping[str, Any], scale: Any,
                     who: str = "model") -> None:
  """Replaces the ``nnx.Linear`` owning each adapted kernel by a :class:`FactoredLinear`.

  Mutates ``module`` in place: call it only on a module made for one forward
  (:meth:`Backbone.merge` builds a fresh one per call).

  Args:
    module: a merged backbone module.
    adapters: ``{"path/to/kernel": adapter spec}`` (checked against the params).
    scale: scalar multiplier of every branch.
    who: the backbone's name, for errors.

  Raises:
    ValueError: a path that does not end in ``/kernel`` of an ``nnx.Linear`` attribute.
  """
  for path in adapters:
    parts = path.split("/")
    parents, attr, leaf = parts[:-2], parts[-2] if len(parts) > 1 else "", parts[-1]
    owner = module
    try:
      for part in parents:
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
      layer = getattr(owner, attr)
    except (AttributeError, IndexError, KeyError, TypeError):
      layer = None
    if leaf != "kernel" or not isinstance(layer, nnx.Linear):
      raise ValueError(f"{who}: cannot compute a factored adapter at {path!r}: it is not the "
                       f"kernel of an nnx.Linear layer ({type(layer).__name__}); merge the "
                       "adapters into params instead (lora_compute='merged')")
    setattr(owner, attr, FactoredLinear(layer, adapters[path], scale, path))


def shared_input_groups(sites: Mapping[str, tuple[str, ...]],
                        roles: tuple[str, ...] = ("q", "k", "v")) -> dict[str, tuple[str, ...]]:
  """Sites of ``roles`` grouped by their parent module: ``{parent path: (kernel path, ...)}``.

  For the transformer backbones the q, k and v kernels of one attention block
  read one array (the block's normalised hidden states), e.g.
  ``"encoder/layers/0/attention": (".../query/kernel", ".../key/kernel",
  ".../value/kernel")``; groups come in block order, members in ``roles`` order.

  Args:
    sites: the backbone's ``{role: kernel paths}``.
    roles: roles whose kernels in one parent module share their input.

  Returns:
    ``{parent path: member kernel paths}`` (parent = the path without its last two parts).
  """
  groups: dict[str, list[str]] = {}
  for role in roles:
    for path in sites.get(role, ()):
      parent = path.rsplit("/", 2)[0]
      groups.setdefault(parent, []).append(path)
  return {g: tuple(m) for g, m in groups.items()}


BackboneFactory = Callable[..., Backbone]

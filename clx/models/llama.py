"""Llama-family decoder-only language models in Flax NNX, loaded from Hugging Face checkpoints.

Architecture (as ``transformers.LlamaForCausalLM``): token embedding →
``num_hidden_layers`` × [RMSNorm → causal self-attention (RoPE, grouped-query
attention with ``num_key_value_heads``, separate q/k/v/o projections, biases
when ``attention_bias``) → residual → RMSNorm → SwiGLU MLP
``down(silu(gate(x)) * up(x))`` (biases when ``mlp_bias``) → residual] →
final RMSNorm → ``lm_head`` (or the transposed embedding when
``tie_word_embeddings``).

Parameter layout (HF names without ``model.``; kernels are Flax ``(in, out)``,
HF's torch ``(out, in)`` weights are transposed on load)::

  embed_tokens/embedding                          (vocab, d)
  layers/<i>/input_layernorm/scale                (d,)
  layers/<i>/self_attn/{q,k,v,o}_proj/kernel      q: (d, H·hd)  k, v: (d, Hkv·hd)  o: (H·hd, d)
  layers/<i>/self_attn/{q,k,v,o}_proj/bias        (attention_bias only)
  layers/<i>/post_attention_layernorm/scale       (d,)
  layers/<i>/mlp/{gate,up,down}_proj/kernel       gate, up: (d, I)  down: (I, d)
  layers/<i>/mlp/{gate,up,down}_proj/bias         (mlp_bias only)
  norm/scale                                      (d,)
  lm_head/kernel                                  (d, vocab), absent when tied

Backbone contract (:mod:`clx.models.base`), ``module(x, *, taps=None, prefix=None)``:

- ``x``: int token ids ``(n, L)``; positions equal to ``pad_id`` are padding.
  **Left and right padding (and any mix) are both handled** through the mask
  ``x != pad_id``: padded keys are masked out of attention and position ids
  count valid tokens only, ``position = cumsum(valid) - 1`` (what
  ``transformers``' ``generate`` builds from the attention mask). A sequence
  therefore gets the same outputs whatever its padding; with right padding
  this also equals HF's default ``arange`` positions. Outputs at padding
  positions are meaningless (finite). Padding ids are never embedded, so
  ``pad_id`` may be an id outside the vocabulary (``-1``, the default when
  the checkpoint has no usable pad token, can never collide with real text).
- pooled features ``(n, d)`` float32: the hidden state **after the final
  RMSNorm** at the **last non-padding token** of each row (the causal LM's
  summary of the whole prompt; with a prefix and an all-padding row, the last
  prefix position).
- ``taps``: sites are the q/k/v/o and gate/up/down kernels. The tapped input
  of a site is what its kernel multiplies: the attention RMSNorm output for
  q/k/v (one shared array), the attention context (heads concatenated,
  ``(…, H·hd)``) for o, the MLP RMSNorm output for gate/up (shared), and
  ``silu(gate) * up`` ``(…, I)`` for down. ``"inputs"``: ``{site: (n, p + L,
  d_in)}`` including padding rows; ``"gram"``: ``{site: {"gram": (d_in, d_in)
  float32, "count": ()}}`` over valid positions (prefix positions count as
  valid). Roles: ``q k v o``, ``mlp_in`` (gate + up), ``mlp_out`` (down),
  ``mlp`` (all three).
- ``prefix``: soft-prompt embeddings ``(p, d)`` or ``(n, p, d)`` placed
  **before the first array position** (``[P_1..P_p, x_1..x_L]``): they take
  positions ``0..p-1`` and the tokens ``p, p+1, …``; every token attends to the
  whole prefix (causal order), the prefix attends only to earlier prefix
  positions. With left padding the pads sit between prefix and tokens, are
  masked and take no position, so the result equals the right-padded one.

Language-model outputs (methods of :class:`Llama` and :class:`LlamaBackbone`):

- ``logits(x, prefix=None)``: next-token logits ``(n, L, vocab)`` float32 at
  the token positions (prefix positions dropped).
- ``label_word_scores(x, label_token_ids, prefix=None)``: ``(n, num_labels)``
  log-probabilities of each label's **first token** as the token following the
  prompt's last non-padding token (classification by label words). Multi-token
  labels are scored by their first token only: pass ``(num_labels, T)`` ids or
  ragged lists and column 0 is used; two labels sharing a first token would be
  indistinguishable and raise. Tokenise label words as they would follow the
  prompt (usually with a leading space, e.g. ``" positive"``).

RoPE: ``rope_theta`` and HF ``rope_scaling``/``rope_parameters`` of types
``default``, ``linear``, ``dynamic`` (NTK; computed from the batch's longest
sequence as a fresh HF model does: HF additionally *caches* the largest length
it has seen, which clx does not), ``llama3`` and ``yarn``; other types
(``longrope``, ``mrope``, …) and ``partial_rotary_factor != 1`` are rejected.

Checkpoints: a folder with ``config.json`` and ``model.safetensors`` or
sharded ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``
(F32/F16/BF16/F64 tensors, memory-mapped; torch never needed). Missing and
unexpected keys are listed, shape mismatches named, unsupported config fields
rejected (see :meth:`LlamaConfig.from_hf`). Weights can be placed straight onto
a device mesh (``mesh=``, rules from :mod:`clx.models.partitioning`), so a model
larger than one device never materialises whole on one.
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
import ml_dtypes
import numpy as np
from flax import nnx

from clx.models import partitioning
from clx.models.base import Backbone, Params, compute_dtype, shared_input_groups

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ATTENTION_IMPLS = ("einsum", "dot_product_attention")
_F32 = jnp.float32

# Keys of HF config.json that do not change the computation (generic PretrainedConfig
# fields, generation defaults, bookkeeping).
IGNORED_CONFIG_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    "use_cache", "initializer_range", "pretraining_tp", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "keys_to_ignore_at_inference",
    "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "sliding_window", "quantization_config", "hidden_act", "rope_scaling", "rope_parameters",
    "rope_theta", "original_max_position_embeddings", "partial_rotary_factor", "max_sequence_length",
    "rope_interleaved", "is_llama_config", "transformers.js_config", "_from_model_config",
})
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "original_max_position_embeddings", "truncate"},
}
_ROPE_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """HF ``rope_scaling`` / ``rope_parameters`` (minus ``rope_theta``), validated.

  Attributes:
    rope_type: one of :data:`ROPE_TYPES` other than ``"default"``.
    factor: context extension factor (``linear``, ``dynamic``, ``llama3``,
      ``yarn``; yarn falls back to ``max_position_embeddings /
      original_max_position_embeddings``).
    low_freq_factor, high_freq_factor: ``llama3`` band edges.
    original_max_position_embeddings: pre-training context (``llama3``, ``yarn``).
    attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate: ``yarn``.
  """

  rope_type: str
  factor: float | None = None
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  attention_factor: float | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES or self.rope_type == "default":
      raise ValueError(f"unsupported rope_type {self.rope_type!r}; clx supports {ROPE_TYPES}")
    needs = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"),
             "yarn": ("original_max_position_embeddings",)}[self.rope_type]
    missing = [k for k in needs if getattr(self, k) is None]
    if missing:
      raise ValueError(f"rope_type {self.rope_type!r} needs {missing} in rope_scaling")
    if self.factor is not None and not self.factor > 0:
      raise ValueError(f"rope factor must be > 0, got {self.factor}")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"llama3 rope needs high_freq_factor > low_freq_factor, got "
                       f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama architecture (the fields of HF ``LlamaConfig`` that matter).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_hidden_layers,
      num_attention_heads: sizes.
    num_key_value_heads: kv heads for grouped-query attention (``None``: =
      ``num_attention_heads``); must divide ``num_attention_heads``.
    head_dim: per-head size (``None``: ``hidden_size // num_attention_heads``).
    max_position_embeddings: context length (used by ``dynamic``/``yarn`` RoPE).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: ``None`` or a :class:`RopeScaling` (a dict is converted).
    attention_bias: biases on q/k/v/o.
    mlp_bias: biases on gate/up/down.
    tie_word_embeddings: ``lm_head`` is the transposed embedding.
    initializer_range: std of the N(0, σ²) init of random models.
    pad_token_id, bos_token_id, eos_token_id: special ids (informational;
      ``pad_token_id`` seeds the default ``pad_id``).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | Mapping | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                         f"{self.num_attention_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.rope_scaling, Mapping):
      theta, scaling = _rope_from_dict(self.rope_scaling, strict=True, source="rope_scaling",
                                       default_theta=self.rope_theta,
                                       max_position_embeddings=self.max_position_embeddings)
      object.__setattr__(self, "rope_scaling", scaling)
      object.__setattr__(self, "rope_theta", theta)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    sizes = {k: getattr(self, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "head_dim")}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or v <= 0}
    if bad:
      raise ValueError(f"LlamaConfig sizes must be positive ints, got {bad}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
      raise ValueError(f"rope_theta and rms_norm_eps must be > 0, got {self.rope_theta}, "
                       f"{self.rms_norm_eps}")

  @property
  def num_groups(self) -> int:
    """Query heads per kv head."""
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_hf(cls, raw: Mapping[str, Any], *, strict: bool = True,
              source: str = "config") -> "LlamaConfig":
    """Builds a config from a Hugging Face ``config.json`` dict.

    Handles both the ``rope_theta`` + ``rope_scaling`` layout (transformers 4)
    and ``rope_parameters`` (transformers 5).

    Args:
      raw: the parsed ``config.json``.
      strict: reject keys clx does not know (they might change the model);
        ``False`` ignores them. Known fields with unsupported values are always
        rejected.
      source: name used in error messages.

    Raises:
      ValueError: a non-Llama ``model_type``, an activation other than SiLU,
        attention dropout, sliding windows, quantisation, an unsupported RoPE
        type or RoPE key, or (``strict``) unknown keys.
    """
    raw = dict(raw)
    fields = {f.name for f in dataclasses.fields(cls)}
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
      raise ValueError(f"{source}: model_type {model_type!r} is not supported (clx.models.llama "
                       f"loads model_type 'llama')")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")
    if raw.get("attention_dropout") not in (None, 0, 0.0):
      raise ValueError(f"{source}: attention_dropout {raw['attention_dropout']} is not supported "
                       f"(clx implements no dropout); set it to 0.0")
    if raw.get("sliding_window") is not None:
      raise ValueError(f"{source}: sliding_window {raw['sliding_window']} is not supported")
    if raw.get("quantization_config"):
      raise ValueError(f"{source}: quantized checkpoints (quantization_config) are not supported")
    if raw.get("rope_interleaved"):
      raise ValueError(f"{source}: rope_interleaved=true (GPT-J style rotary pairs) is not "
                       f"supported; HF Llama checkpoints use the split-half layout")
    for key in ("partial_rotary_factor",):
      if raw.get(key) not in (None, 1, 1.0):
        raise ValueError(f"{source}: {key} {raw[key]} is not supported (only 1.0)")
    unknown = sorted(k for k in raw if k not in fields and k not in IGNORED_CONFIG_KEYS)
    if unknown and strict:
      raise ValueError(f"{source}: unsupported config fields {unknown}; clx.models.llama does "
                       f"not know what they do (pass strict=False / strict_config=False to "
                       f"ignore them)")
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta, scaling = _rope_from_dict(rope, strict=strict, source=f"{source} rope parameters",
                                     default_theta=raw.get("rope_theta", 10000.0),
                                     max_position_embeddings=raw.get("max_position_embeddings",
                                                                     2048),
                                     top_level_original=raw.get("original_max_position_embeddings"))
    kwargs = {k: raw[k] for k in fields if k in raw and k not in ("rope_scaling", "rope_theta")}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
      if key not in raw:
        raise ValueError(f"{source}: missing required field {key!r}")
    return cls(rope_theta=float(theta), rope_scaling=scaling, **kwargs)

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, strict: bool = True) -> "LlamaConfig":
    """Reads a Hugging Face ``config.json`` (see :meth:`from_hf`)."""
    path = pathlib.Path(path)
    try:
      raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
    return cls.from_hf(raw, strict=strict, source=str(path))

  def num_params(self) -> int:
    """Parameter count of the model this config describes."""
    d, hd = self.hidden_size, self.head_dim
    q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d) * self.attention_bias
    mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d) * self.mlp_bias
    layer = attn + mlp + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_hidden_layers * layer + d + head


def _rope_from_dict(rope: Mapping, *, strict: bool, source: str, default_theta: float = 10000.0,
                    max_position_embeddings: int | None = None,
                    top_level_original: int | None = None) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, RopeScaling | None)`` from an HF rope dict (either layout)."""
  rope = dict(rope)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{source}: unsupported rope_type {rope_type!r}; clx supports {ROPE_TYPES}")
  if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise ValueError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']} is not "
                     f"supported (only 1.0)")
  allowed = _ROPE_KEYS[rope_type] | _ROPE_COMMON_KEYS
  unknown = sorted(k for k in rope if k not in allowed)
  if unknown and strict:
    raise ValueError(f"{source}: keys {unknown} are not supported for rope_type {rope_type!r} "
                     f"(allowed: {sorted(allowed)})")
  theta = float(rope.get("rope_theta", default_theta))
  if rope_type == "default":
    return theta, None
  kwargs = {k: rope[k] for k in _ROPE_KEYS[rope_type] if rope.get(k) is not None}
  if rope_type in ("llama3", "yarn"):
    # As transformers: a top-level original_max_position_embeddings wins, else
    # max_position_embeddings.
    if top_level_original is not None:
      kwargs["original_max_position_embeddings"] = top_level_original
    elif "original_max_position_embeddings" not in kwargs and max_position_embeddings:
      kwargs["original_max_position_embeddings"] = max_position_embeddings
  if rope_type == "yarn" and kwargs.get("factor") is None and max_position_embeddings:
    kwargs["factor"] = max_position_embeddings / kwargs["original_max_position_embeddings"]
  return theta, RopeScaling(rope_type, **kwargs)


# ---------------------------------------------------------------------------------------------
# RoPE


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
  """``1 / θ^(2i/dim)`` in float32, as transformers computes it."""
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def rope_frequencies(config: LlamaConfig, seq_len: int | jax.Array | None = None
                     ) -> tuple[jax.Array | np.ndarray, float]:
  """Inverse frequencies ``(head_dim // 2,)`` float32 and the cos/sin scale.

  Matches ``transformers.modeling_rope_utils`` for :data:`ROPE_TYPES`.

  Args:
    config: the model config.
    seq_len: current sequence length (``dynamic`` only; may be traced): the
      NTK-scaled base applies when it exceeds ``max_position_embeddings``.

  Returns:
    ``(inv_freq, attention_scaling)``; ``inv_freq`` is NumPy except for
    ``dynamic`` with a traced ``seq_len``.
  """
  dim, theta, rs = config.head_dim, config.rope_theta, config.rope_scaling
  inv = _default_inv_freq(theta, dim)
  if rs is None:
    return inv, 1.0
  f32 = np.float32
  if rs.rope_type == "linear":
    return (inv / f32(rs.factor)).astype(f32), 1.0
  if rs.rope_type == "dynamic":
    max_pos = config.max_position_embeddings
    if seq_len is None:
      return inv, 1.0
    exps = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim))
    n = jnp.maximum(jnp.asarray(seq_len, _F32), f32(max_pos))
    base = f32(theta) * ((f32(rs.factor) * n / f32(max_pos)) - f32(rs.factor - 1)) ** f32(
        dim / (dim - 2))
    dyn = (1.0 / (base ** exps)).astype(_F32)
    if isinstance(seq_len, (int, np.integer)):
      return np.asarray(dyn), 1.0
    return dyn, 1.0
  if rs.rope_type == "llama3":
    factor, lo, hi = f32(rs.factor), rs.low_freq_factor, rs.high_freq_factor
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = (f32(2 * math.pi) / inv).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
    smooth = ((f32(old) / wavelen - f32(lo)) / f32(hi - lo)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32), 1.0
  # yarn
  factor = rs.factor
  old = rs.original_max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = rs.attention_factor
  if attention is None:
    if rs.mscale and rs.mscale_all_dim:
      attention = float(mscale(factor, rs.mscale) / mscale(factor, rs.mscale_all_dim))
    else:
      attention = mscale(factor)
  beta_fast, beta_slow = rs.beta_fast or 32, rs.beta_slow or 1

  def correction_dim(rotations):
    return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rs.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  pos_freqs = np.power(f32(theta), np.arange(0, dim, 2).astype(f32) / f32(dim)).astype(f32)
  extrapolation = (f32(1) / pos_freqs).astype(f32)
  interpolation = (f32(1) / (f32(factor) * pos_freqs)).astype(f32)
  ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
  extra_factor = (f32(1) - ramp).astype(f32)
  inv = interpolation * (f32(1) - extra_factor) + extrapolation * extra_factor
  return inv.astype(f32), float(attention)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``(n, T, heads, hd)`` by cos/sin ``(n, T, hd)`` (HF's half-split layout)."""
  return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
  """``scale * x / sqrt(mean(x²) + eps)``, normalised in float32 as transformers does."""

  def __init__(self, dim: int, eps: float, *, param_dtype=_F32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = float(eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(_F32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(dtype)
    return self.scale[...].astype(dtype) * y


def _linear(d_in: int, d_out: int, bias: bool, config: LlamaConfig, dtype, param_dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE.

  Query head ``h`` reads kv head ``h // num_groups`` (HF's ``repeat_kv``).
  Scores and softmax are float32.
  """

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, attention: str, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.head_dim
    h, kv = config.num_attention_heads, config.num_key_value_heads
    bias = config.attention_bias
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.attention = attention
    self.q_proj = _linear(d, h * hd, bias, config, dtype, param_dtype, rngs)
    self.k_proj = _linear(d, kv * hd, bias, config, dtype, param_dtype, rngs)
    self.v_proj = _linear(d, kv * hd, bias, config, dtype, param_dtype, rngs)
    self.o_proj = _linear(h * hd, d, bias, config, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Attention output ``(n, T, d)`` and context ``(n, T, H·hd)`` (the o_proj input).

    Args:
      x: normalised hidden states ``(n, T, d)``.
      cos, sin: RoPE tables ``(n, T, hd)`` in ``x``'s dtype.
      mask: ``(n, T, T)`` bool, True where query ``t`` may attend key ``s``.
    """
    n, t, _ = x.shape
    hd, kv, g = self.head_dim, self.num_kv_heads, self.num_heads // self.num_kv_heads
    q = apply_rope(self.q_proj(x).reshape(n, t, self.num_heads, hd), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(n, t, kv, hd), cos, sin)
    v = self.v_proj(x).reshape(n, t, kv, hd)
    scale = hd ** -0.5
    if self.attention == "dot_product_attention":
      ctx = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    else:
      q = q.reshape(n, t, kv, g, hd)
      scores = jnp.einsum("ntkgh,nskh->nkgts", q, k).astype(_F32) * scale
      scores = jnp.where(mask[:, None, None], scores, jnp.finfo(_F32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
      ctx = jnp.einsum("nkgts,nskh->ntkgh", probs, v)
    ctx = ctx.reshape(n, t, self.num_heads * hd)
    return self.o_proj(ctx), ctx


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.gate_proj = _linear(d, i, b, config, dtype, param_dtype, rngs)
    self.up_proj = _linear(d, i, b, config, dtype, param_dtype, rngs)
    self.down_proj = _linear(i, d, b, config, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Output ``(…, d)`` and the down_proj input ``(…, I)``."""
    act = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(act), act


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, attention: str, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                               rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                            param_dtype=param_dtype)
    self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """New hidden states and ``{site (relative path): input}`` of the layer's kernels."""
    x = self.input_layernorm(h)
    attn, ctx = self.self_attn(x, cos, sin, mask)
    h = h + attn
    y = self.post_attention_layernorm(h)
    out, act = self.mlp(y)
    h = h + out
    inputs = {"self_attn/q_proj": x, "self_attn/k_proj": x, "self_attn/v_proj": x,
              "self_attn/o_proj": ctx, "mlp/gate_proj": y, "mlp/up_proj": y,
              "mlp/down_proj": act}
    return h, inputs


def _gram(x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """``{"gram": XᵀX (d, d) float32, "count": valid rows}`` of x ``(n, T, d)`` over mask ``(n, T)``."""
  x = x.astype(_F32)
  m = mask.astype(_F32)[..., None]
  gram = jnp.einsum("ntd,nte->de", x * m, x, precision=jax.lax.Precision.HIGHEST)
  return {"gram": gram, "count": jnp.sum(m)}


def _label_first_tokens(label_token_ids) -> jax.Array:
  """First token of each label as int32 ``(num_labels,)``; checks concrete inputs."""
  if isinstance(label_token_ids, (list, tuple)):
    firsts = []
    for i, label in enumerate(label_token_ids):
      if isinstance(label, (list, tuple, np.ndarray)):
        if len(label) == 0:
          raise ValueError(f"label {i} has no tokens")
        firsts.append(int(label[0]))
      else:
        firsts.append(int(label))
    label_token_ids = np.asarray(firsts, np.int32)
  if isinstance(label_token_ids, np.ndarray):
    if label_token_ids.ndim == 2:
      label_token_ids = label_token_ids[:, 0]
    if label_token_ids.ndim != 1 or label_token_ids.size == 0:
      raise ValueError(f"label_token_ids must be (num_labels,) or (num_labels, T), got shape "
                       f"{label_token_ids.shape}")
    values, counts = np.unique(label_token_ids, return_counts=True)
    if np.any(counts > 1):
      raise ValueError(f"labels share first tokens {values[counts > 1].tolist()}: first-token "
                       f"scoring cannot tell them apart; choose label words that differ in "
                       f"their first token")
    return jnp.asarray(label_token_ids, jnp.int32)
  ids = jnp.asarray(label_token_ids)
  if ids.ndim == 2:
    ids = ids[:, 0]
  if ids.ndim != 1:
    raise ValueError(f"label_token_ids must be (num_labels,) or (num_labels, T), got {ids.shape}")
  return ids.astype(jnp.int32)


class Llama(nnx.Module):
  """A Llama causal LM following the clx backbone contract (see the module docstring).

  Args:
    config: architecture.
    pad_id: token id marking padding (may lie outside the vocabulary, e.g. -1).
    dtype: compute dtype (``jnp.bfloat16`` for speed); RMSNorm statistics,
      attention scores/softmax, pooled features, logits and taps are float32.
    param_dtype: parameter dtype.
    attention: ``"einsum"`` (explicit scores, the reference) or
      ``"dot_product_attention"`` (``jax.nn.dot_product_attention``, may pick
      cuDNN flash attention on GPU).
    remat: rematerialise each decoder layer in the backward pass
      (``nnx.remat``), trading compute for activation memory.
    rngs: initialisation randomness (N(0, initializer_range²) weights, unit norms).
  """

  def __init__(self, config: LlamaConfig, *, pad_id: int = -1, dtype=_F32, param_dtype=_F32,
               attention: str = "einsum", remat: bool = False, rngs: nnx.Rngs):
    if attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
    self.config = config
    self.pad_id = int(pad_id)
    self.dtype = dtype = compute_dtype(dtype, "Llama")
    self.remat = bool(remat)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, False, config, dtype,
                             param_dtype, rngs)

  # -- helpers ---------------------------------------------------------------------------------

  def _check_ids(self, x: jax.Array) -> None:
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"x must be integer token ids of shape (n, L), got {x.dtype} {x.shape}")

  def _embed(self, x: jax.Array, prefix) -> tuple[jax.Array, jax.Array, int]:
    """Embeddings ``(n, p + L, d)``, valid mask ``(n, p + L)`` and ``p``."""
    self._check_ids(x)
    valid = x != self.pad_id
    h = self.embed_tokens(jnp.where(valid, x, 0).astype(jnp.int32))
    if prefix is None:
      return h, valid, 0
    n, _, d = h.shape
    prefix = jnp.asarray(prefix)
    if prefix.ndim == 2:
      prefix = jnp.broadcast_to(prefix[None], (n, *prefix.shape))
    if prefix.ndim != 3 or prefix.shape[0] != n or prefix.shape[2] != d:
      raise ValueError(f"prefix must have shape (p, {d}) or ({n}, p, {d}), got {prefix.shape}")
    p = prefix.shape[1]
    h = jnp.concatenate([prefix.astype(h.dtype), h], axis=1)
    valid = jnp.concatenate([jnp.ones((n, p), bool), valid], axis=1)
    return h, valid, p

  def _head(self, h: jax.Array) -> jax.Array:
    """Logits float32 from final-norm hidden states ``(…, d)``."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(h).astype(_F32)
    return self.lm_head(h).astype(_F32)

  # -- forward ---------------------------------------------------------------------------------

  def hidden_states(self, x: jax.Array, *, prefix: jax.Array | None = None,
                    taps: str | None = None):
    """Final-norm hidden states of every position.

    Args:
      x: int token ids ``(n, L)`` padded with ``pad_id`` (either side).
      prefix: optional soft prompt ``(p, d)`` or ``(n, p, d)``.
      taps: ``None``, ``"inputs"`` or ``"gram"`` (module docstring).

    Returns:
      ``(h, valid, taps)``: ``h`` ``(n, p + L, d)`` in the compute dtype after
      the final RMSNorm, ``valid`` ``(n, p + L)`` bool, and the taps dict
      (``None`` when ``taps is None``).
    """
    if taps not in (None, "inputs", "gram"):
      raise ValueError(f"taps must be None, 'inputs' or 'gram', got {taps!r}")
    h, valid, _ = self._embed(x, prefix)
    n, t, _ = h.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    seq_len = None
    if self.config.rope_scaling is not None and self.config.rope_scaling.rope_type == "dynamic":
      seq_len = jnp.max(jnp.where(valid, positions, 0)) + 1
    inv_freq, scaling = rope_frequencies(self.config, seq_len)
    freqs = positions.astype(_F32)[..., None] * jnp.asarray(inv_freq, _F32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * scaling).astype(h.dtype)
    sin = (jnp.sin(emb) * scaling).astype(h.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & valid[:, None, :]

    def run_layer(layer, h, cos, sin, mask):
      return layer(h, cos, sin, mask)

    if self.remat:
      run_layer = nnx.remat(run_layer)
    inputs = {}
    for i, layer in enumerate(self.layers):
      h, layer_inputs = run_layer(layer, h, cos, sin, mask)
      if taps is not None:
        inputs.update({f"layers/{i}/{k}/kernel": v for k, v in layer_inputs.items()})
    h = self.norm(h)
    if taps is None:
      return h, valid, None
    if taps == "inputs":
      return h, valid, inputs
    grams, done = {}, {}
    for site, value in inputs.items():  # q/k/v and gate/up share one input: one Gram each
      if id(value) not in done:
        done[id(value)] = _gram(value, valid)
      grams[site] = done[id(value)]
    return h, valid, grams

  @staticmethod
  def _last_index(valid: jax.Array) -> jax.Array:
    t = valid.shape[1]
    return (t - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)

  def __call__(self, x: jax.Array, *, taps: str | None = None, prefix: jax.Array | None = None):
    """Pooled features ``(n, d)`` float32: final-norm state of the last non-padding token.

    Args:
      x: int token ids ``(n, L)`` padded with ``pad_id`` (either side).
      taps: ``None``, ``"inputs"`` or ``"gram"`` (module docstring).
      prefix: optional soft prompt ``(p, d)`` or ``(n, p, d)``.

    Returns:
      Features, plus the taps dict when ``taps`` is set.
    """
    h, valid, tapped = self.hidden_states(x, prefix=prefix, taps=taps)
    last = self._last_index(valid)
    features = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(_F32)
    return features if taps is None else (features, tapped)

  def logits(self, x: jax.Array, *, prefix: jax.Array | None = None) -> jax.Array:
    """Next-token logits ``(n, L, vocab)`` float32 at the token positions of ``x``."""
    h, _, _ = self.hidden_states(x, prefix=prefix)
    p = h.shape[1] - x.shape[1]
    return self._head(h[:, p:])

  def last_token_logits(self, x: jax.Array, *, prefix: jax.Array | None = None) -> jax.Array:
    """Logits ``(n, vocab)`` float32 of the token following each row's last non-padding token."""
    h, valid, _ = self.hidden_states(x, prefix=prefix)
    last = self._last_index(valid)
    return self._head(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])

  def label_word_scores(self, x: jax.Array, label_token_ids, *,
                        prefix: jax.Array | None = None) -> jax.Array:
    """Log-probabilities ``(n, num_labels)`` of each label's first token after the prompt.

    Args:
      x: prompts, int token ids ``(n, L)`` padded with ``pad_id`` (either side).
      label_token_ids: ``(num_labels,)`` first-token ids, or ``(num_labels, T)`` /
        ragged lists of label tokenisations (only the first token is scored).
      prefix: optional soft prompt.

    Returns:
      float32 ``log p(label_first_token | prompt)`` (a full-vocabulary
      log-softmax), usable directly as classification logits.
    """
    ids = _label_first_tokens(label_token_ids)
    logp = jax.nn.log_softmax(self.last_token_logits(x, prefix=prefix), axis=-1)
    return jnp.take(logp, ids, axis=1)


# ---------------------------------------------------------------------------------------------
# Backbone


def llama_sites(num_layers: int) -> dict[str, tuple[str, ...]]:
  """Kernel paths by role: ``q k v o``, ``mlp_in`` (gate, up), ``mlp_out`` (down), ``mlp``."""
  def paths(*subs: str) -> tuple[str, ...]:
    return tuple(f"layers/{i}/{s}/kernel" for i in range(num_layers) for s in subs)

  sites = {"q": paths("self_attn/q_proj"), "k": paths("self_attn/k_proj"),
           "v": paths("self_attn/v_proj"), "o": paths("self_attn/o_proj"),
           "mlp_in": paths("mlp/gate_proj", "mlp/up_proj"), "mlp_out": paths("mlp/down_proj")}
  sites["mlp"] = paths("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
  return sites


@dataclasses.dataclass(frozen=True, eq=False)
class LlamaBackbone(Backbone):
  """A :class:`~clx.models.base.Backbone` with the language-model outputs of :class:`Llama`.

  ``apply(params, x)`` gives pooled last-token features; the methods below are
  pure functions of ``(params, inputs)`` as well (jit-able, differentiable).
  """

  config: LlamaConfig | None = None

  def hidden_states(self, params: Params, x: jax.Array, *, prefix=None):
    """``(h (n, p + L, d), valid (n, p + L))`` after the final norm."""
    h, valid, _ = self.merge(params).hidden_states(x, prefix=prefix)
    return h, valid

  def logits(self, params: Params, x: jax.Array, *, prefix=None) -> jax.Array:
    """Next-token logits ``(n, L, vocab)`` float32."""
    return self.merge(params).logits(x, prefix=prefix)

  def last_token_logits(self, params: Params, x: jax.Array, *, prefix=None) -> jax.Array:
    """Logits ``(n, vocab)`` after each row's last non-padding token."""
    return self.merge(params).last_token_logits(x, prefix=prefix)

  def label_word_scores(self, params: Params, x: jax.Array, label_token_ids, *,
                        prefix=None) -> jax.Array:
    """``(n, num_labels)`` log-probs of the labels' first tokens (see :meth:`Llama.label_word_scores`)."""
    return self.merge(params).label_word_scores(x, label_token_ids, prefix=prefix)


def default_pad_id(config: LlamaConfig) -> int:
  """``pad_token_id`` when set and distinct from bos/eos, else ``-1`` (never a real token)."""
  pad = config.pad_token_id
  eos = config.eos_token_id
  specials = {config.bos_token_id, *(eos if isinstance(eos, tuple) else (eos,))}
  if pad is None or pad in specials:
    return -1
  return int(pad)


def _make_backbone(name: str, module: Llama, length: int) -> LlamaBackbone:
  sites = llama_sites(module.config.num_hidden_layers)
  groups = {**shared_input_groups(sites), **shared_input_groups(sites, ("mlp_in",))}
  backbone = LlamaBackbone.from_module(name, module, module.config.hidden_size, (length,),
                                       sites=sites, pad_id=module.pad_id, site_groups=groups,
                                       embedding="embed_tokens/embedding")
  return dataclasses.replace(backbone, config=module.config)


def _resolve_config(config, config_fields) -> LlamaConfig:
  if config is None:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  elif isinstance(config, Mapping):
    config = LlamaConfig.from_hf(config)
  if config_fields:
    config = dataclasses.replace(config, **config_fields)
  return config


def llama(input_shape: Sequence[int] = (128,), *, config: LlamaConfig | Mapping | None = None,
          seed: int = 0, pad_id: int | None = None, dtype=_F32, param_dtype=_F32,
          attention: str = "einsum", remat: bool = False, name: str | None = None,
          mesh: jax.sharding.Mesh | None = None, rules: partitioning.Rules | None = None,
          **config_fields) -> LlamaBackbone:
  """A randomly initialised Llama backbone (tests, benchmarks, from-scratch runs).

  Args:
    input_shape: ``(L,)``, the longest token sequence used.
    config: a :class:`LlamaConfig` or HF-style dict; default a tiny 2-layer,
      64-wide model with vocabulary 256; ``config_fields`` override fields.
    seed: initialisation seed.
    pad_id: padding id (default :func:`default_pad_id`).
    dtype, param_dtype, attention, remat: see :class:`Llama`.
    name: backbone name (default ``"llama-L{layers}-H{hidden}"``).
    mesh, rules: shard the parameters on ``mesh`` (:mod:`clx.models.partitioning`);
      initialisation runs under ``jit`` with sharded outputs, so the full model
      never sits on one device.
  """
  config = _resolve_config(config, config_fields)
  (length,) = tuple(input_shape)
  if length < 1:
    raise ValueError(f"input length must be >= 1, got {length}")
  pad_id = default_pad_id(config) if pad_id is None else int(pad_id)

  def build():
    return Llama(config, pad_id=pad_id, dtype=dtype, param_dtype=param_dtype,
                 attention=attention, remat=remat, rngs=nnx.Rngs(seed))

  if mesh is None:
    module = build()
  else:
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    shardings = partitioning.param_shardings(pure, mesh, rules)

    def init():
      return nnx.to_pure_dict(nnx.split(build())[1])

    params = jax.jit(init, out_shardings=shardings)()
    nnx.replace_by_pure_dict(state, params)
    module = nnx.merge(graphdef, state)
  return _make_backbone(name or f"llama-L{config.num_hidden_layers}-H{config.hidden_size}",
                        module, length)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

_ML_FLOATS = frozenset(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                            ml_dtypes.float8_e5m2))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a ``.safetensors`` file as read-only memory-mapped NumPy arrays.

  Reads the format directly (8-byte little-endian header size, JSON header,
  raw little-endian data), so BF16/FP8 work through ``ml_dtypes`` and nothing
  is loaded until an array is used.

  Raises:
    ValueError: a malformed file or an unsupported dtype.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: too short to be a safetensors file")
    n = int.from_bytes(head, "little")
    if n <= 0 or 8 + n > size:
      raise ValueError(f"{path}: bad safetensors header length {n} (file has {size} bytes)")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
  base = 8 + n
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape = tuple(int(s) for s in info["shape"])
    start, end = (int(o) for o in info["data_offsets"])
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if end - start != nbytes or base + end > size:
      raise ValueError(f"{path}: tensor {key!r} {info['dtype']}{list(shape)} has inconsistent "
                       f"offsets {start}..{end} (file truncated?)")
    if nbytes == 0:
      out[key] = np.zeros(shape, dtype)
    else:
      out[key] = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r",
                           offset=base + start, shape=shape)
  return out


def checkpoint_files(folder: str | os.PathLike) -> list[pathlib.Path]:
  """The safetensors files of an HF folder (single file or sharded with an index)."""
  folder = pathlib.Path(folder)
  index = folder / "model.safetensors.index.json"
  single = folder / "model.safetensors"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
      raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
    return [folder / n for n in names]
  if single.is_file():
    return [single]
  raise FileNotFoundError(f"{folder} holds neither model.safetensors nor "
                          f"model.safetensors.index.json (clx reads safetensors only; convert "
                          f"pytorch_model.bin elsewhere)")


def read_checkpoint(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of an HF folder's safetensors file(s), memory-mapped."""
  tensors: dict[str, np.ndarray] = {}
  for file in checkpoint_files(folder):
    for key, value in read_safetensors(file).items():
      if key in tensors:
        raise ValueError(f"tensor {key!r} appears in more than one shard of {folder}")
      tensors[key] = value
  return tensors


def checkpoint_layout(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """HF key (without ``model.``) → (clx param path, HF shape, transpose to a Flax kernel)."""
  d, hd, i = config.hidden_size, config.head_dim, config.intermediate_size
  q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
  layout = {"embed_tokens.weight": ("embed_tokens/embedding", (config.vocab_size, d), False),
            "norm.weight": ("norm/scale", (d,), False)}
  for n in range(config.num_hidden_layers):
    hf, cl = f"layers.{n}.", f"layers/{n}/"
    layout[hf + "input_layernorm.weight"] = (cl + "input_layernorm/scale", (d,), False)
    layout[hf + "post_attention_layernorm.weight"] = (cl + "post_attention_layernorm/scale", (d,),
                                                      False)
    for name, out_dim, in_dim, bias in (("q_proj", q, d, config.attention_bias),
                                        ("k_proj", kv, d, config.attention_bias),
                                        ("v_proj", kv, d, config.attention_bias),
                                        ("o_proj", d, q, config.attention_bias)):
      layout[f"{hf}self_attn.{name}.weight"] = (f"{cl}self_attn/{name}/kernel", (out_dim, in_dim),
                                                True)
      if bias:
        layout[f"{hf}self_attn.{name}.bias"] = (f"{cl}self_attn/{name}/bias", (out_dim,), False)
    for name, out_dim, in_dim in (("gate_proj", i, d), ("up_proj", i, d), ("down_proj", d, i)):
      layout[f"{hf}mlp.{name}.weight"] = (f"{cl}mlp/{name}/kernel", (out_dim, in_dim), True)
      if config.mlp_bias:
        layout[f"{hf}mlp.{name}.bias"] = (f"{cl}mlp/{name}/bias", (out_dim,), False)
  return layout


def _show(keys: Sequence[str], limit: int = 12) -> str:
  keys = sorted(keys)
  more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _set_path(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def convert_checkpoint(tensors: Mapping[str, np.ndarray], config: LlamaConfig, *,
                       param_dtype=_F32, shardings: Mapping | None = None,
                       source: str = "checkpoint") -> Params:
  """HF Llama tensors → clx params (nested dict of ``jax.Array``).

  Accepts ``LlamaForCausalLM`` keys (``model.…`` + ``lm_head.weight``) or bare
  ``LlamaModel`` keys. ``lm_head.weight`` is ignored when embeddings are tied;
  ``rotary_emb.inv_freq`` buffers are ignored.

  Args:
    tensors: HF key → array (NumPy or memory-mapped).
    config: the model config.
    param_dtype: dtype of the returned parameters.
    shardings: optional tree (clx layout) of ``jax.sharding.Sharding`` to place
      each parameter with as it is converted.
    source: name used in error messages.

  Raises:
    ValueError: missing or unexpected keys (all listed) or shape mismatches (all named).
  """
  layout = checkpoint_layout(config)
  prefixed = any(k.startswith("model.") for k in tensors)
  strip = "model." if prefixed else ""
  found: dict[str, str] = {}
  unexpected = []
  for key in tensors:
    if key.endswith("rotary_emb.inv_freq"):
      continue
    if key == "lm_head.weight":
      if not config.tie_word_embeddings:
        found["lm_head.weight"] = key
      continue
    short = key[len(strip):] if key.startswith(strip) else None
    if short is not None and short in layout:
      found[short] = key
    else:
      unexpected.append(key)
  expected = dict(layout)
  if not config.tie_word_embeddings:
    expected["lm_head.weight"] = ("lm_head/kernel", (config.vocab_size, config.hidden_size), True)
  missing = [strip + k if k != "lm_head.weight" else k for k in expected if k not in found]
  if missing or unexpected:
    raise ValueError(f"{source} does not match the Llama config: missing keys "
                     f"[{_show(missing)}]; unexpected keys [{_show(unexpected)}]")
  bad = [f"{found[k]}: checkpoint {tuple(tensors[found[k]].shape)} vs config {shape}"
         for k, (_, shape, _) in expected.items() if tuple(tensors[found[k]].shape) != shape]
  if bad:
    raise ValueError(f"{source}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:12]))
  params: dict = {}
  for short, (path, _, transpose) in expected.items():
    array = np.asarray(tensors[found[short]])
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype in _ML_FLOATS):
      raise ValueError(f"{source}: tensor {found[short]} has non-float dtype {array.dtype}")
    array = np.ascontiguousarray(array.T if transpose else array).astype(param_dtype)
    sharding = None
    if shardings is not None:
      node = shardings
      for part in path.split("/"):
        node = node[part]
      sharding = node
    _set_path(params, path, jax.device_put(array, sharding) if sharding is not None
              else jnp.asarray(array))
  return params


def from_pretrained(folder: str | os.PathLike, *, pad_id: int | None = None,
                    max_length: int | None = None, dtype=_F32, param_dtype=_F32,
                    attention: str = "einsum", remat: bool = False,
                    mesh: jax.sharding.Mesh | None = None, rules: partitioning.Rules | None = None,
                    strict_config: bool = True, name: str | None = None) -> LlamaBackbone:
  """Loads an HF Llama folder (``config.json`` + safetensors) as a :class:`LlamaBackbone`.

  Args:
    folder: local folder in Hugging Face layout (clx never downloads).
    pad_id: padding id of the inputs (default :func:`default_pad_id`: the
      config's ``pad_token_id`` unless unset or equal to bos/eos, else -1).
    max_length: the backbone's ``input_shape`` ``(max_length,)`` (default
      ``max_position_embeddings``).
    dtype, param_dtype, attention, remat: see :class:`Llama`.
    mesh: place parameters on this mesh as they are read (default: the
      default device); ``rules`` default :func:`partitioning.default_rules`.
    strict_config: reject unknown ``config.json`` keys.
    name: backbone name (default the folder name).

  Raises:
    FileNotFoundError: no ``config.json`` or safetensors in ``folder``.
    ValueError: unsupported config, missing/unexpected keys, shape mismatches.
  """
  folder = pathlib.Path(folder).expanduser()
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"{folder} has no config.json (expected a Hugging Face model folder)")
  config = LlamaConfig.from_file(folder / "config.json", strict=strict_config)
  pad_id = default_pad_id(config) if pad_id is None else int(pad_id)
  module_kwargs = dict(pad_id=pad_id, dtype=dtype, param_dtype=param_dtype, attention=attention,
                       remat=remat)
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), **module_kwargs))
  graphdef, state = nnx.split(abstract)
  shardings = None
  if mesh is not None:
    shardings = _str_keys(partitioning.param_shardings(nnx.to_pure_dict(state), mesh, rules))
  params = convert_checkpoint(read_checkpoint(folder), config, param_dtype=param_dtype,
                              shardings=shardings, source=str(folder))
  nnx.replace_by_pure_dict(state, params)
  module = nnx.merge(graphdef, state)
  length = int(max_length or config.max_position_embeddings)
  return _make_backbone(name or folder.resolve().name, module, length)


def pretrained(input_shape: Sequence[int] = (512,), *, path: str | os.PathLike,
               **kwargs) -> LlamaBackbone:
  """Registry-style factory: :func:`from_pretrained` of ``path`` with ``max_length = L``.

  Args:
    input_shape: ``(L,)``, the longest token sequence used.
    path: local Hugging Face folder.
    **kwargs: forwarded to :func:`from_pretrained`.
  """
  (length,) = tuple(input_shape)
  return from_pretrained(path, max_length=int(length), **kwargs)


def _str_keys(tree):
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree

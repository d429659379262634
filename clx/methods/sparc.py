"""SPARC: subspace-aware prompt adaptation (Jayasuriya et al., arXiv 2502.02909), and prompt tuning.

SPARC learns one soft prompt per task inside a low-dimensional PCA subspace of
the task's *input token embeddings*, with the backbone frozen, and re-uses
earlier prompts when a new task's subspace overlaps an old one. No official
code exists; every choice the paper leaves open is an option below, and its
default is documented (see also ``shared/research/sparc_proteus_survey.md`` §A).

Per task ``t`` (``begin_task``, on the host, one jitted pass over the data):

1. **PCA subspace.** The frozen input embeddings of the task's *real* tokens
   — by default (``embedding_source="input"``) the embedding layer's output,
   i.e. exactly the vectors the prompt is inserted among (BERT: word +
   position + type embeddings after the embedding LayerNorm; Llama: the
   table rows), with padding and special tokens left out
   (``special_tokens="auto"``: BERT's [CLS] and [SEP], the first and last real
   position of each row) — are summarised by their moments Σw, Σw·e, Σw·eeᵀ
   accumulated inside ``jit`` (:mod:`clx.ops.pca`; no token is materialised
   on the host), then ``μ_t`` and ``U_t`` (d, k) = the top-``k`` eigenvectors
   of the covariance. ``pooling="token"`` (default) uses every kept token as
   a sample; ``"mean"`` one mean-pooled embedding per example. *Why these
   defaults (clx's reconstruction; the paper says "a compact subspace of the
   training data", no code is public):* the prompt is a set of input
   vectors, so the subspace that describes where it lives is that of the
   input vectors it sits among. BERT inserts the prompt after the embedding
   LayerNorm, whose outputs are ~9× the norm of word-table rows (MiniLM:
   9.9 vs 1.07); a subspace of table rows (``embedding_source="table"``, the
   earlier default, kept as an option) describes another space, and its
   prompts started ~9× too small. [CLS]/[SEP] add the same two vectors to
   every example of every task (shared directions that inflate overlaps).
   On MiniLM post-LayerNorm token rows have mean norm 9.9 with a mean of
   norm 1.7, so ``P = Z Uᵀ`` (no mean) starts at token scale.
2. **Overlap with every stored task** ``s < t`` (the stored PCA bases):
   ``M = U_tᵀ U_s`` (k×k) holds the cosines S_ij of the paper's Fig. 1(a).
   ``overlap="subspace"`` (default): ``‖M‖_F² / k``, the mean squared cosine
   of the principal angles (:func:`clx.ops.subspace.subspace_overlap`);
   ``"mean_max_cosine"``: ``mean_i max_j |M_ij|`` (each new principal
   direction matched to its most similar old one, the literal reading of
   S_ij); ``"principal"``: the mean cosine of the principal angles. All are 1
   for the same subspace and 0 for orthogonal ones; the best-matching task
   ``s*`` and its score are recorded. *Why "subspace" by default:* it does not
   depend on how the basis is rotated inside the subspace, while single
   principal directions of real embeddings are unstable (nearly equal
   eigenvalues). Measured on MiniLM, k = 100, 128 texts per task: with the
   default inputs (post-LayerNorm real tokens), two random halves of one
   WordNet ``wordnet_living`` task score 0.73-0.80 and two different tasks
   0.61-0.71 (``experiments/text_sparc.py --calibrate``, validation stream);
   on word-table rows (the earlier default) two halves of one task scored
   0.67-0.70 ("subspace") but only 0.31-0.33 ("mean_max_cosine", vs 0.14 for
   a random subspace), RT sentiment vs RT subjectivity 0.75, RT vs convention
   speeches 0.64-0.66; a random 100-dim subspace scores k/d = 0.26. Scores
   shrink with fewer samples (noisier components): calibrate τ against
   split-half overlaps of your tasks at the size of a task, on data you do
   not evaluate on (``text_sparc.calibrate_tau``).
3. **Initialisation.** If ``score(s*) ≥ τ`` (``overlap_threshold``, default
   0.7 with "subspace": the paper gives no value) the prompt is *re-used*: task ``t`` gets its
   own copy of ``s*``'s prompt re-expressed in the new basis, ``Z_t = (P_s* −
   [μ_t]) U_t`` (least-squares coordinates, i.e. ``Z_s U_sᵀ U_t`` without the
   mean), and, with ``reuse_lora`` (default True), a copy of ``s*``'s LoRA.
   Otherwise a *new* prompt ``Z_t ~ N(0, diag(λ_t)) · prompt_init_scale`` (each
   prompt token a random draw from the task's embedding distribution, mean
   removed) is projected orthogonal to the span of all stored prompt
   directions ``Z_s U_sᵀ`` — *inside* the new subspace, so the prompt stays in
   span(U_t): with ``Q`` an orthonormal basis of the stored directions and
   ``W`` one of ``col(U_tᵀQ)``, ``Z_t ← Z_t − Z_t W Wᵀ`` gives ``Z_t U_tᵀ Q = 0``.
   When the stored prompts fill more than ``k − n`` dimensions of the subspace
   only the ``k − n`` most-overlapping directions are removed. Fresh LoRA
   adapters start at zero (``b = 0``). ``orthogonal_penalty`` λ > 0 adds
   ``λ·‖Z_t U_tᵀ Q‖_F²`` to the loss so a new prompt stays orthogonal (re-used
   prompts get no penalty: they start on purpose at an old prompt).
4. **Prompt.** ``P_t = Z_t U_tᵀ (+ μ_t if use_mean)`` (n, d), ``Z_t`` (n, k)
   trainable, ``U_t`` frozen (``train_basis=True`` trains it too: the paper's
   "0.04 %" suggests the projection is counted), prepended to the input
   embeddings through the backbone's ``prefix`` (BERT: right after [CLS];
   Llama: before the first token). *Default use_mean=False*: the paper writes
   ``Z Uᵀ``; the mean offset is an option.
5. **LoRA** (``lora_rank > 0``; the paper's SPARC+LoRA): per-task adapters on
   ``sites`` (roles, default q and v), ``ΔW = (α/r)·a b``, trained jointly
   with ``Z_t`` and stored per task.

Prediction. *Task-incremental* (task id given): the task's prompt, LoRA and
head; logits of other tasks' classes are at ``NEG_INF``. Nothing of task ``s``
is touched after it is trained, so its predictions are bit-identical later.
*No task id* (domain- or class-incremental), ``selection``:

- ``"subspace"`` (default): per example, the stored task whose PCA model
  reconstructs the example's token embeddings best (smallest mean squared
  residual ``‖(e − μ_s) − (e − μ_s)U_sU_sᵀ‖²`` over its valid tokens, or of its
  mean-pooled embedding with ``pooling="mean"``) supplies prompt and LoRA;
  with per-task heads (class-IL) only that task's head gives logits.
- ``"latest"``: the most recent task's prompt and LoRA for every example.

Domain-incremental streams use one shared head (``head_mode`` default:
shared for the domain scenario, per-task otherwise), trained on every task in
turn with that task's prompt; per-task prompts then keep each domain's
features while the shared head drifts (the paper's ~3 % domain-IL forgetting).

Decoder LMs: ``label_words`` (one token id, or a string with ``tokenizer``,
per global class) replaces the head by label-word scoring
(``backbone.label_word_scores``: log-probability of each label's first token
after the prompt); no head parameters are trained.

State (checkpointed per task as deltas)::

  heads/...                              clx.methods.heads layout (absent with label_words)
  tasks/<t>/pca/{mean, components, eigenvalues, total_variance}   frozen PCA of task t
  tasks/<t>/z                            Z_t (n, k)
  tasks/<t>/basis                        U_t (d, k), only with train_basis
  tasks/<t>/lora/<site with '/'→'.'>/{a, b}   only with lora_rank > 0
  tasks/<t>/ortho                        Q (d, m), only with orthogonal_penalty > 0
  tasks/<t>/overlap/{scores (T,), matched, score, reused}   decisions (-1 = none)

Trainable parameters per task (reported by ``diagnostics`` as a percentage of
the frozen backbone): ``n·k`` (+ ``d·k`` with ``train_basis``) + LoRA
``Σ r·(d_in + d_out)`` (``trainable_pct``); ``trainable_pct_with_head``
adds the task's head (``feature_dim × classes + classes``), which the
encoder runs train too. MiniLM (22.57 M): 2,000 = 0.009 % (n = 20, k = 100),
0.18 % with ``train_basis``, 0.336 % with rank-8 LoRA on q/v; a 2-way head
adds 770 (0.0034 %).

Code shape. :class:`SPARCConfig` (frozen, validated) holds the options; :func:`resolve` binds
it to a backbone (:class:`SPARCSetup`); the protocol's functions (:func:`init`,
:func:`begin_task`, :func:`trainable`, :func:`combine`, :func:`loss`, :func:`predict`,
:func:`diagnostics`; nothing to do in ``end_task``) are module-level and :func:`sparc` binds
them. ``params_for`` is None: the forward adds a soft prompt (and routes per example), so no
single backbone parameter set describes it; :func:`effective_params` gives a task's LoRA'd
backbone. The pieces
a notebook or test wants are public: :func:`task_pca` (the PCA pass over a task's batches),
:func:`token_pca` (the same from token ids), :func:`reuse_decision`, :func:`new_task_entry`,
:func:`prompt_of`, :func:`effective_params`, :func:`reconstruction_errors` and :func:`route`.
The old option names ``lora_sites`` and ``pca_batch_size`` are still accepted.

Baselines in this file: :func:`prompt_tuning` (one shared free prompt trained
in turn) and :func:`prompt_lora` (sequential LoRA, optionally with a shared
prompt), both with heads or label words.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from clx.methods import _options
from clx.methods import heads as heads_lib
from clx.methods.base import (Batch, ContinualMethod, Params, StreamSpec, TaskContext, TaskInfo,
                              no_host_hook, renamed)
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import pca as pca_ops
from clx.ops import subspace
from clx.ops import tree as tree_ops

POOLINGS = ("token", "mean")
OVERLAPS = ("subspace", "mean_max_cosine", "principal")
SELECTIONS = ("subspace", "latest")
EMBEDDING_SOURCES = ("table", "input")
SPECIAL_TOKENS = ("auto", "edges", "none")
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Helpers shared by SPARC and prompt tuning


def embedding_path(backbone: Backbone, path: str | None = None) -> str:
  """The word-embedding table's path: ``path`` if given, else the backbone's declared
  :attr:`~clx.models.base.Backbone.embedding`; checked to be a 2-D array of ``backbone.params``.

  Args:
    backbone: the text backbone.
    path: a ``/`` path into ``backbone.params``, or None for ``backbone.embedding``.

  Returns:
    The path of the (vocabulary, d) table.

  Raises:
    ValueError: no path is given and the backbone declares none, or the path does not hold a
      2-D array.
  """
  path = path if path is not None else backbone.embedding
  if path is None:
    raise ValueError(f"{backbone.name} declares no token-embedding table (Backbone.embedding); "
                     f"pass embedding_path=")
  try:
    table = tree_ops.get(backbone.params, path)
  except (KeyError, TypeError):
    table = None
  if np.ndim(table) != 2:
    raise ValueError(f"no 2-D word-embedding table at {path!r} of {backbone.name}")
  return path


def _special_rule(special_tokens, path: str):
  """``"edges"``, ``"none"`` or a sorted int32 array of token ids to leave out of the PCA."""
  if isinstance(special_tokens, str):
    if special_tokens not in SPECIAL_TOKENS:
      raise ValueError(f"special_tokens must be one of {SPECIAL_TOKENS} or a sequence of token "
                       f"ids, got {special_tokens!r}")
    if special_tokens == "auto":  # BERT family: [CLS] first, [SEP] last (right padding)
      return "edges" if path.startswith("embeddings/") else "none"
    return special_tokens
  ids = np.asarray(list(special_tokens))
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"special_tokens as ids must be a flat sequence of ints, got "
                     f"{special_tokens!r}")
  return np.unique(ids).astype(np.int32)


class _Embedder:
  """Frozen input token embeddings ``(n, L, d)`` and the mask of the tokens the PCA uses.

  The mask keeps real tokens: not padding, and not the special tokens named by
  ``special`` (``"edges"``: the first and the last non-padding position of each
  right-padded row, i.e. BERT's [CLS] and [SEP]; an id array: those ids).
  """

  def __init__(self, backbone: Backbone, source: str, path: str | None, special="auto"):
    if source not in EMBEDDING_SOURCES:
      raise ValueError(f"embedding_source must be one of {EMBEDDING_SOURCES}, got {source!r}")
    if backbone.pad_id is None:
      raise ValueError(f"{backbone.name} has no pad_id: SPARC needs a token-id (text) backbone")
    self.backbone, self.source = backbone, source
    self.path = embedding_path(backbone, path)
    self.dim = int(np.shape(tree_ops.get(backbone.params, self.path))[1])
    self.pad_id = int(backbone.pad_id)
    self.special = _special_rule(special, self.path)

  def mask(self, x: ArrayLike) -> jax.Array:
    """``(n, L)`` bool: the positions whose embeddings are PCA samples."""
    x = jnp.asarray(x)
    valid = x != self.pad_id
    if isinstance(self.special, str):
      if self.special == "edges":
        pos = jnp.arange(x.shape[1])[None, :]
        last = jnp.sum(valid, axis=1, keepdims=True) - 1
        return valid & (pos > 0) & (pos < last)
      return valid
    return valid & ~jnp.isin(x, jnp.asarray(self.special))

  def __call__(self, base: Params, x: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Embeddings ``(n, L, d)`` float32 of token ids ``x`` (n, L) and the PCA mask ``(n, L)``.

    ``"input"``: the output of the embedding layer, i.e. the top-level module that holds the
    declared table (BERT: ``embeddings``, word + position + type embeddings and LayerNorm;
    Llama: ``embed_tokens``, the table itself); ``"table"``: the table's rows.
    """
    x = jnp.asarray(x)
    valid = x != self.pad_id
    keep = self.mask(x)
    ids = jnp.where(valid, x, 0)  # padding positions get weight 0; any id in range will do
    if self.source == "table":
      return tree_ops.get(base, self.path)[ids].astype(jnp.float32), keep
    layer = getattr(self.backbone.merge(base), tree_ops.as_site(self.path)[0])
    return layer(ids).astype(jnp.float32), keep


def _resolve_label_words(label_words, tokenizer) -> np.ndarray | None:
  """First token id of each label word (ints are taken as ids; strings need ``tokenizer``)."""
  if label_words is None:
    return None
  words = list(label_words)
  if all(isinstance(w, (int, np.integer)) for w in words):
    return np.asarray(words, np.int32)
  if tokenizer is None:
    raise ValueError("label_words given as strings need tokenizer= (a tokenizer.json path or a "
                     "Hugging Face folder)")
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(tokenizer).expanduser()
  tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
  ids = []
  for w in words:
    if isinstance(w, (int, np.integer)):
      ids.append(int(w))
      continue
    enc = tok.encode(str(w), add_special_tokens=False).ids
    if not enc:
      raise ValueError(f"label word {w!r} tokenises to nothing")
    ids.append(int(enc[0]))
  if len(set(ids)) != len(ids):
    raise ValueError(f"label words {words} share first tokens {ids}; first-token scoring cannot "
                     f"tell them apart")
  return np.asarray(ids, np.int32)


class _Scorer:
  """Logits from features (heads) or from label-word scores (decoder LMs)."""

  def __init__(self, backbone: Backbone, head_mode: str | None, label_ids: np.ndarray | None):
    self.backbone, self.label_ids = backbone, label_ids
    if label_ids is not None:
      if head_mode not in (None, "label_words"):
        raise ValueError(f"label_words replaces the head; head_mode must be None, got "
                         f"{head_mode!r}")
      if not hasattr(backbone, "label_word_scores"):
        raise ValueError(f"label_words needs a backbone with label_word_scores (a decoder LM); "
                         f"{backbone.name} has none")
    elif head_mode not in (None, "per_task", "shared"):
      raise ValueError(f"head_mode must be None, 'per_task' or 'shared', got {head_mode!r}")
    self.head_mode = head_mode

  @property
  def uses_heads(self) -> bool:
    """Whether logits come from trained heads (False: label-word scores)."""
    return self.label_ids is None

  def mode(self, spec: StreamSpec) -> str:
    """``"per_task"`` or ``"shared"`` heads (label words: per task in task-IL, else shared)."""
    if self.label_ids is not None:
      return "per_task" if spec.scenario == "task" else "shared"
    return self.head_mode or heads_lib.default_mode(spec)

  def check(self, spec: StreamSpec) -> None:
    """Refuse label words whose count is not the stream's number of classes."""
    if self.label_ids is not None and len(self.label_ids) != spec.num_classes:
      raise ValueError(f"label_words has {len(self.label_ids)} entries but the stream has "
                       f"{spec.num_classes} classes (one label word per global class)")

  def forward(self, params: Params, x: ArrayLike, prefix: jax.Array | None) -> jax.Array:
    """Features ``(n, f)`` or global label-word scores ``(n, C)``."""
    if self.label_ids is None:
      return self.backbone.apply(params, x, prefix=prefix)
    return self.backbone.label_word_scores(params, x, jnp.asarray(self.label_ids), prefix=prefix)

  def train_logits(self, heads: Mapping | None, out: jax.Array, y: ArrayLike, spec: StreamSpec,
                   task_index: int) -> tuple[jax.Array, jax.Array]:
    """Training logits and the labels they are scored against (the task's classes)."""
    mode = self.mode(spec)
    if self.label_ids is None:
      return heads_lib.train_logits_and_labels(heads, out, y, spec, task_index, mode)
    if mode == "per_task":
      classes = jnp.asarray(spec.task_classes[task_index])
      return out[:, classes], heads_lib.train_labels(y, spec, task_index, mode)
    seen = jnp.asarray(heads_lib._seen_class_mask(  # pylint: disable=protected-access
        spec, task_index))
    return jnp.where(seen, out, heads_lib.NEG_INF), y

  def task_logits(self, heads: Mapping | None, out: jax.Array, spec: StreamSpec, task: int,
                  seen_upto: int) -> jax.Array:
    """Global logits ``(n, C)`` using only task ``task``'s head (per-task) or the shared one."""
    mode = self.mode(spec)
    if self.label_ids is not None:
      keep = np.zeros(spec.num_classes, bool)
      if mode == "per_task":
        keep[list(spec.task_classes[task])] = True
      else:
        keep = heads_lib._seen_class_mask(spec, seen_upto)  # pylint: disable=protected-access
      return jnp.where(jnp.asarray(keep), out, heads_lib.NEG_INF)
    if mode == "shared":
      return heads_lib.global_logits(heads, out, spec, mode, seen_upto)
    logits = jnp.full((out.shape[0], spec.num_classes), heads_lib.NEG_INF, out.dtype)
    return logits.at[:, jnp.asarray(spec.task_classes[task])].set(
        heads_lib.linear(heads[str(task)], out))


def _lora_paths(backbone: Backbone, sites: Sequence[str]) -> tuple[str, ...]:
  """Kernel paths of ``sites`` (roles of ``backbone.sites`` or kernel paths), checked."""
  paths = tuple(dict.fromkeys(
      p for s in sites for p in (backbone.site_paths(s) if s in backbone.sites else (s,))))
  for p in paths:
    try:
      tree_ops.get(backbone.params, p)
    except (KeyError, TypeError):
      raise ValueError(f"sites entry {p!r} is neither a site role of {backbone.name} "
                       f"({sorted(backbone.sites)}) nor a kernel path in its params") from None
    tree_ops.to_key(p)
  return paths


def _lora_scale(lora_rank: int, lora_alpha: float | None) -> float:
  """LoRA output scale α / r; α defaults to r (scale 1), as ``clx.methods.sequential.lora``."""
  rank = max(int(lora_rank), 1)
  return (lora_alpha if lora_alpha is not None else rank) / rank


def _num(tree) -> int:
  return int(sum(int(np.size(v)) for v in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Configuration and state


@dataclasses.dataclass(frozen=True)
class SPARCConfig:
  """SPARC's options, each default written once (see the module docstring for the why).

  Attributes:
    num_prompt_tokens: n, soft-prompt length (paper: 20 or 40).
    num_components: k, PCA components (paper: 100 or 300); at most the embedding width d.
    pooling: PCA samples: ``"token"`` (every kept token, default) or ``"mean"`` (one
      mean-pooled embedding per example).
    use_mean: prompt ``Z Uᵀ + μ`` instead of ``Z Uᵀ``.
    train_basis: train ``U`` too (per task; it starts at the PCA basis).
    overlap_threshold: τ; re-use the best-matching prompt when its overlap ≥ τ (inf: never).
    overlap: ``"subspace"`` (default), ``"mean_max_cosine"`` or ``"principal"``.
    orthogonal_init: initialise new prompts orthogonal to the stored ones.
    orthogonal_penalty: λ of ``λ‖Z U_tᵀ Q‖_F²`` (0 = off).
    lora_rank: 0 = prompt only (SPARC); > 0 = per-task LoRA (SPARC+LoRA).
    sites: LoRA sites: roles (``backbone.sites`` keys) or kernel paths.
    lora_alpha: LoRA α (scale α / r); default r (scale 1), as ``clx.methods.sequential.lora``.
    reuse_lora: on re-use, also start from the matched task's LoRA.
    prompt_init_scale: multiplies the N(0, λ) initial coordinates of new prompts.
    embedding_source: ``"input"`` (default: the embedding layer's output, the vectors the
      prompt is inserted among) or ``"table"`` (word-embedding rows).
    embedding_path: path of the word-embedding table (default: auto-detected).
    special_tokens: tokens left out of the PCA (and of routing) besides padding: ``"auto"``
      (``"edges"`` for BERT-family tables, else ``"none"``), ``"edges"`` (first and last real
      position: [CLS], [SEP]), ``"none"``, or a sequence of token ids.
    in_subspace: ``False`` switches the subspace constraint off (the per-task *free prompt*
      control): ``Z_t`` is the (n, d) prompt itself, initialised exactly as SPARC's
      (``Z_t U_tᵀ``, or the matched old prompt itself on re-use) but trained in all d
      dimensions. PCA, overlap, re-use and routing are unchanged.
    lora_lr_scale: the LoRA factors' learning rate relative to the prompt's: the factors are
      trained as ``a / c`` and ``b / c`` (``c = lora_lr_scale``), which under Adam (update
      invariant to the gradient's scale) moves them ``c`` times as far per step.
    selection: prompt choice without a task id: ``"subspace"`` or ``"latest"``.
    head_mode: ``"per_task"`` / ``"shared"`` (default by scenario).
    label_words: per global class, a token id or a word (with ``tokenizer``): label-word
      scoring instead of a head (decoder LMs).
    tokenizer: ``tokenizer.json`` or HF folder for string ``label_words``.
    aux_batch_size: batch size of the PCA pass (default the run's eval batch size).
    name: registry/run name (default ``"sparc"``, ``"sparc_lora"``, ``"free_prompt"``, …).
  """

  num_prompt_tokens: int = 20
  num_components: int = 100
  pooling: str = "token"
  use_mean: bool = False
  train_basis: bool = False
  overlap_threshold: float = 0.7
  overlap: str = "subspace"
  orthogonal_init: bool = True
  orthogonal_penalty: float = 0.0
  lora_rank: int = 0
  sites: tuple[str, ...] = ("q", "v")
  lora_alpha: float | None = None
  reuse_lora: bool = True
  prompt_init_scale: float = 1.0
  embedding_source: str = "input"
  embedding_path: str | None = None
  special_tokens: str | tuple[int, ...] = "auto"
  in_subspace: bool = True
  lora_lr_scale: float = 1.0
  selection: str = "subspace"
  head_mode: str | None = None
  label_words: tuple | None = None
  tokenizer: str | None = None
  aux_batch_size: int | None = None
  name: str | None = None

  def __post_init__(self):
    # sequences become tuples so the config stays hashable and immutable
    for field in ("sites", "label_words", "special_tokens"):
      value = getattr(self, field)
      if value is not None and not isinstance(value, (str, tuple)):
        object.__setattr__(self, field, tuple(value))
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    if self.overlap not in OVERLAPS:
      raise ValueError(f"overlap must be one of {OVERLAPS}, got {self.overlap!r}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
    if self.embedding_source not in EMBEDDING_SOURCES:
      raise ValueError(f"embedding_source must be one of {EMBEDDING_SOURCES}, got "
                       f"{self.embedding_source!r}")
    if int(self.num_prompt_tokens) < 1:
      raise ValueError(f"num_prompt_tokens must be >= 1, got {self.num_prompt_tokens}")
    if int(self.num_components) < 1:
      raise ValueError(f"num_components must be >= 1, got {self.num_components}")
    tau = self.overlap_threshold
    if not 0.0 <= float(tau) <= 1.0 + 1e-9 and not math.isinf(tau):
      raise ValueError(f"overlap_threshold must lie in [0, 1] (or inf: never re-use), got {tau}")
    if float(self.orthogonal_penalty) < 0:
      raise ValueError(f"orthogonal_penalty must be >= 0, got {self.orthogonal_penalty}")
    if int(self.lora_rank) < 0:
      raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
    if not float(self.lora_lr_scale) > 0:
      raise ValueError(f"lora_lr_scale must be > 0, got {self.lora_lr_scale}")
    if self.train_basis and not self.in_subspace:
      raise ValueError("train_basis needs in_subspace=True (a free prompt has no basis)")
    if self.aux_batch_size is not None and int(self.aux_batch_size) < 1:
      raise ValueError(f"aux_batch_size must be >= 1, got {self.aux_batch_size}")

  @property
  def lora_scale(self) -> float:
    """The adapters' output scale α / r (1 without LoRA or without ``lora_alpha``)."""
    return _lora_scale(self.lora_rank, self.lora_alpha)

  @property
  def default_name(self) -> str:
    """``name``, or the run name by what is trained."""
    if self.name:
      return self.name
    if self.in_subspace:
      return "sparc_lora" if self.lora_rank else "sparc"
    return "free_prompt_lora" if self.lora_rank else "free_prompt"


# Old spellings of SPARCConfig / prompt_tuning fields, still accepted by the factories so
# that existing experiment configs keep running (one name per concept: DESIGN.md).
_LEGACY_NAMES = {"lora_sites": "sites", "pca_batch_size": "aux_batch_size"}
_PT_LEGACY_NAMES = {"lora_sites": "sites", "init": "prompt_init"}


def _renamed(kwargs: Mapping[str, Any], names: Mapping[str, str] = _LEGACY_NAMES,
             who: str = "sparc") -> dict:
  """``kwargs`` with SPARC's legacy option names (or ``names``) mapped to the current ones."""
  return renamed(dict(kwargs), dict(names), who)


class SPARCState(TypedDict, total=False):
  """SPARC's state (a dict, so checkpoints keep their keys; layout in the module docstring).

  ``heads``: :mod:`clx.methods.heads` layout (absent with label words); ``tasks``:
  ``{str(t): entry}`` with ``pca``, ``z``, ``basis`` (train_basis), ``lora`` (lora_rank > 0),
  ``ortho`` (orthogonal_penalty > 0) and ``overlap``.
  """

  heads: dict
  tasks: dict[str, dict]


class SPARCSetup(NamedTuple):
  """What SPARC resolves once from its config and backbone (built by :func:`resolve`).

  Attributes:
    cfg: the options.
    backbone: the frozen text backbone.
    embed: frozen input embeddings and the mask of PCA tokens.
    scorer: logits from heads or label words.
    lora_paths: kernel paths of the LoRA sites (empty without LoRA).
    first_mean: jitted ``(base, x, mask) -> (d,)`` mean of a batch's PCA rows (the shift).
    accumulate: jitted ``(moments, base, x, mask) -> moments``.
  """

  cfg: SPARCConfig
  backbone: Backbone
  embed: _Embedder
  scorer: _Scorer
  lora_paths: tuple[str, ...]
  first_mean: Callable
  accumulate: Callable


# ---------------------------------------------------------------------------------------------
# Overlap and re-use


def overlap_score(new_basis: ArrayLike, old_basis: ArrayLike, kind: str = "subspace") -> float:
  """Overlap in [0, 1] of two orthonormal bases; see the module docstring.

  Args:
    new_basis: ``(d, k_a)`` orthonormal columns.
    old_basis: ``(d, k_b)`` orthonormal columns.
    kind: ``"subspace"`` ‖AᵀB‖_F² / k_a, ``"principal"`` the mean cosine of the principal
      angles, ``"mean_max_cosine"`` mean_i max_j |(AᵀB)_ij|.

  Returns:
    A Python float: 1 for the same subspace, 0 for orthogonal ones.
  """
  if kind not in OVERLAPS:
    raise ValueError(f"overlap must be one of {OVERLAPS}, got {kind!r}")
  a, b = jnp.asarray(new_basis, jnp.float32), jnp.asarray(old_basis, jnp.float32)
  if kind == "subspace":
    return float(subspace.subspace_overlap(a, b))
  if kind == "principal":
    return float(jnp.mean(subspace.principal_cosines(a, b)))
  cross = jnp.abs(jnp.matmul(a.T, b, precision=_HIGHEST))
  return float(jnp.clip(jnp.mean(jnp.max(cross, axis=1)), 0.0, 1.0))


class ReuseDecision(NamedTuple):
  """SPARC's re-use decision for a new task (host values).

  Attributes:
    scores: ``(T,)`` float32 overlap with every stored task, −1 where none is stored.
    matched: the best-matching stored task, −1 when none.
    score: its overlap (−1 when none).
    reused: whether ``score ≥ τ``.
  """

  scores: np.ndarray
  matched: int
  score: float
  reused: bool


def reuse_decision(new_basis: ArrayLike, old_bases: Mapping[int, Any], num_tasks: int, *,
                   overlap: str = "subspace", threshold: float = 0.7) -> ReuseDecision:
  """Overlap of a new task's PCA basis with every stored one, and whether to re-use.

  Args:
    new_basis: ``(d, k)`` the new task's PCA components U_t.
    old_bases: ``{s: U_s (d, k)}`` of the stored tasks s < t (may be empty).
    num_tasks: T, the length of the ``scores`` vector.
    overlap: the overlap kind (:func:`overlap_score`).
    threshold: τ.

  Returns:
    A :class:`ReuseDecision`; ties go to the earliest task (``argmax``).
  """
  prev = sorted(old_bases)
  scores = np.full((num_tasks,), -1.0, np.float32)
  for s in prev:
    scores[s] = overlap_score(new_basis, old_bases[s], overlap)
  if not prev:
    return ReuseDecision(scores, -1, -1.0, False)
  t = max(prev) + 1
  matched = int(np.argmax(scores[:t]))
  best = float(scores[matched])
  return ReuseDecision(scores, matched, best, best >= float(threshold))


def orthogonal_coordinates(z: ArrayLike, basis: ArrayLike, directions: ArrayLike, num_tokens: int,
                           tol: float = 1e-6
                           ) -> tuple[np.ndarray, np.ndarray]:
  """``z`` with ``z basisᵀ`` made orthogonal to the row space of ``directions`` (float64, host).

  With ``Q`` an orthonormal basis of the stored directions and ``W`` one of
  ``col(basisᵀ Q)``, ``z' = z − z W Wᵀ`` gives ``z' basisᵀ Q = 0``. At most
  ``k − num_tokens`` directions (the most overlapping ones) are removed so that a prompt
  can always be formed.

  Args:
    z: ``(n, k)`` coordinates.
    basis: ``(d, k)`` orthonormal.
    directions: ``(m, d)`` the stored prompt directions.
    num_tokens: n.
    tol: relative singular-value cut-off.

  Returns:
    ``(z' (n, k), Q (d, r))``.
  """
  z = np.asarray(z, np.float64)
  basis = np.asarray(basis, np.float64)
  directions = np.asarray(directions, np.float64)
  k = basis.shape[1]
  u, s, _ = np.linalg.svd(directions.T, full_matrices=False)
  q = u[:, s > tol * max(float(s.max(initial=0.0)), 1e-30)] if s.size else u[:, :0]
  coords = basis.T @ q  # (k, r): stored directions seen from inside span(basis)
  w, sw, _ = np.linalg.svd(coords, full_matrices=False)
  w = w[:, sw > tol * max(float(sw.max(initial=0.0)), 1e-30)] if sw.size else w[:, :0]
  w = w[:, :max(k - num_tokens, 0)]
  return z - (z @ w) @ w.T, q


# ---------------------------------------------------------------------------------------------
# The PCA pass


def pca_samples(embed: _Embedder, pooling: str, base: Params, x: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """PCA rows and their weights for a batch of token ids (pure, jit-able).

  Args:
    embed: the task's embedder (source, special-token rule).
    pooling: ``"token"`` or ``"mean"``.
    base: frozen backbone params.
    x: ``(n, L)`` token ids.
    mask: ``(n,)`` 1 for real rows of a padded batch.

  Returns:
    ``"token"``: rows ``(n, L, d)`` and weights ``(n, L)``; ``"mean"``: the mean of each
    row's kept tokens ``(n, d)`` and weights ``(n,)`` (1 where a row has a kept token).
  """
  e, valid = embed(base, x)
  w = valid.astype(jnp.float32) * mask.astype(jnp.float32)[:, None]
  if pooling == "token":
    return e, w
  cnt = jnp.sum(w, axis=1)
  pooled = jnp.einsum("nld,nl->nd", e, w, precision=_HIGHEST) / jnp.maximum(cnt, 1.0)[:, None]
  return pooled, (cnt > 0).astype(jnp.float32)


def _moments_pass(batches: Iterable[tuple], dim: int, first_mean: Callable,
                  accumulate: Callable):
  """PCA moments over ``batches`` of jit arguments, shifted by the first batch's mean."""
  moments = None
  for args in batches:
    if moments is None:
      moments = pca_ops.init_moments(dim, shift=first_mean(*args))
    moments = accumulate(moments, *args)
  return moments


def task_pca(setup: SPARCSetup, base: Params, batches: Iterable[Mapping[str, Any]]
             ) -> dict[str, np.ndarray]:
  """SPARC's PCA pass: the task's subspace of its frozen input token embeddings (host).

  Args:
    setup: the resolved SPARC (:func:`resolve`).
    base: frozen backbone params.
    batches: the task's training batches, each with ``x`` (n, L) token ids and ``mask`` (n,).

  Returns:
    ``{"mean" (d,), "components" (d, k), "eigenvalues" (k,), "total_variance" ()}``;
    raises ``ValueError`` with fewer than 2 samples.
  """
  moments = _moments_pass(((base, b["x"], b["mask"]) for b in batches), setup.embed.dim,
                          setup.first_mean, setup.accumulate)
  if moments is None or float(moments["count"]) < 2:
    raise ValueError("too few valid tokens for a PCA")
  return jax.device_get(pca_ops.pca_from_moments(moments, int(setup.cfg.num_components)))


def token_pca(backbone: Backbone, x: ArrayLike, num_components: int, *,
              embedding_source: str = "input", special_tokens: str | Sequence[int] = "auto", embedding_path: str | None = None,
              batch_size: int = 256) -> dict[str, np.ndarray]:
  """The PCA SPARC's ``begin_task`` computes (``pooling="token"``), for token ids ``x`` (n, L).

  A host helper for calibrating τ outside a run (e.g. split-half overlaps of
  one task at the sample size of a task, on a validation stream).

  Args:
    backbone: a text backbone (BERT, Llama).
    x: int token ids ``(n, L)``.
    num_components: k.
    embedding_source, special_tokens, embedding_path: as in :class:`SPARCConfig`.
    batch_size: rows per jitted accumulation.

  Returns:
    ``{"mean" (d,), "components" (d, k), "eigenvalues" (k,), "total_variance" ()}``.
  """
  embed = _Embedder(backbone, embedding_source, embedding_path, special_tokens)
  x = np.asarray(x)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"x must be non-empty token ids (n, L), got shape {x.shape}")

  @jax.jit
  def rows_of(xb):
    return embed(backbone.params, xb)

  def pad(xb):
    fill = np.full((batch_size - len(xb), x.shape[1]), embed.pad_id, x.dtype)
    return np.concatenate([xb, fill]) if len(xb) < batch_size else xb

  def first_mean(xb):
    e, w = rows_of(xb)
    return jnp.sum(e * w[..., None], (0, 1)) / jnp.maximum(jnp.sum(w), 1.0)

  step = jax.jit(lambda m, xb: pca_ops.accumulate(m, *rows_of(xb)))
  # padded rows are all padding: weight 0
  moments = _moments_pass(((pad(x[i:i + batch_size]),) for i in range(0, len(x), batch_size)),
                          embed.dim, first_mean, step)
  return jax.device_get(pca_ops.pca_from_moments(moments, int(num_components)))


# ---------------------------------------------------------------------------------------------
# Prompts, effective parameters and routing (pure)


def basis_of(entry: Mapping) -> jax.Array:
  """A task's prompt basis ``(d, k)``: the trained one (train_basis) or its PCA components.

  Args:
    entry: a task entry of the state (``basis`` or ``pca/components``).

  Returns:
    ``(d, k)`` basis U_t, orthonormal columns for the PCA one.
  """
  return entry["basis"] if "basis" in entry else entry["pca"]["components"]


def prompt_of(cfg: SPARCConfig, entry: Mapping) -> jax.Array:
  """A task's prompt ``P = Z Uᵀ (+ μ with use_mean)`` ``(n, d)``; ``Z`` itself when free.

  Args:
    cfg: the options (``in_subspace``, ``use_mean``).
    entry: a task entry of the state (``z`` (n, k) in the subspace, (n, d) when free).

  Returns:
    The prompt ``(n, d)`` prepended to the task's inputs.
  """
  if cfg.in_subspace:
    p = jnp.matmul(entry["z"], jnp.asarray(basis_of(entry)).T, precision=_HIGHEST)
  else:  # free prompt: z is the (n, d) prompt (minus the mean with use_mean)
    p = jnp.asarray(entry["z"])
  return p + entry["pca"]["mean"] if cfg.use_mean else p


def effective_params(setup: SPARCSetup, base: Params, entry: Mapping) -> Params:
  """The backbone params a task's examples run through: ``base`` + its LoRA (if any).

  Args:
    setup: the resolved SPARC (``lora_paths``, ``cfg.lora_scale``).
    base: frozen backbone params.
    entry: a task entry (its ``lora`` ``{site_key: {"a", "b"}}`` when LoRA is on).

  Returns:
    ``base`` itself without LoRA, else ``base`` with ``scale · a b`` added at every LoRA site.
  """
  if not setup.lora_paths:
    return base
  adapters = {p: entry["lora"][tree_ops.to_key(p)] for p in setup.lora_paths}
  return lora_ops.apply_adapters(base, adapters, setup.cfg.lora_scale)


def reconstruction_errors(setup: SPARCSetup, state: Mapping, base: Params, x: jax.Array, upto: int
                          ) -> jax.Array:
  """Per example and stored task ``s ≤ upto``, the PCA reconstruction error ``(n, upto + 1)``.

  ``‖(e − μ_s) − (e − μ_s)U_sU_sᵀ‖²`` averaged over the example's kept tokens (``"token"``
  pooling) or of its mean-pooled embedding (``"mean"``).

  Args:
    setup: the resolved SPARC (embedder, ``cfg.pooling``).
    state: a state holding ``tasks/<s>/pca`` (``mean`` (d,), ``components`` (d, k)) for s ≤
      ``upto``.
    base: frozen backbone params.
    x: ``(n, L)`` token ids.
    upto: the last stored task to score.

  Returns:
    ``(n, upto + 1)`` float errors, column s for task s.
  """
  rows, w = pca_samples(setup.embed, setup.cfg.pooling, base, x,
                        jnp.ones((x.shape[0],), jnp.float32))
  errs = []
  for s in range(upto + 1):
    pc = state["tasks"][str(s)]["pca"]
    centred = rows - pc["mean"]
    coords = jnp.matmul(centred, pc["components"], precision=_HIGHEST)
    # ‖c‖² − ‖cU‖² = ‖c − cUUᵀ‖² (orthonormal U)
    resid = jnp.sum(centred**2, -1) - jnp.sum(coords**2, -1)
    if setup.cfg.pooling == "token":
      resid = jnp.sum(resid * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)
    errs.append(resid)
  return jnp.stack(errs, -1)


def route(setup: SPARCSetup, state: Mapping, base: Params, x: jax.Array, upto: int) -> jax.Array:
  """SPARC's routing: per example, the stored task whose PCA reconstructs it best ``(n,)``.

  Args:
    setup: the resolved SPARC.
    state: a state holding the PCA of every task ≤ ``upto``.
    base: frozen backbone params.
    x: ``(n, L)`` token ids.
    upto: the last stored task.

  Returns:
    ``(n,)`` int task index in [0, ``upto``] (argmin of :func:`reconstruction_errors`).
  """
  return jnp.argmin(reconstruction_errors(setup, state, base, x, upto), -1)


# ---------------------------------------------------------------------------------------------
# The protocol's functions (bound to a setup by :func:`sparc`)


def resolve(backbone: Backbone, cfg: SPARCConfig) -> SPARCSetup:
  """Resolve ``cfg`` against ``backbone``: embedder, scorer, LoRA paths, jitted PCA steps.

  Args:
    backbone: the frozen text backbone (token ids in, takes a ``prefix``).
    cfg: SPARC's options.

  Returns:
    A :class:`SPARCSetup`.

  Raises:
    ValueError: ``num_components`` is outside [1, d], or the embedding table, label words or
      LoRA sites do not resolve on ``backbone``.
  """
  embed = _Embedder(backbone, cfg.embedding_source, cfg.embedding_path, cfg.special_tokens)
  if not 1 <= int(cfg.num_components) <= embed.dim:
    raise ValueError(f"num_components must be in [1, d={embed.dim}], got {cfg.num_components}")
  scorer = _Scorer(backbone, cfg.head_mode, _resolve_label_words(cfg.label_words, cfg.tokenizer))
  lora_paths = _lora_paths(backbone, cfg.sites) if cfg.lora_rank else ()

  def first_mean(base, x, mask):
    rows, w = pca_samples(embed, cfg.pooling, base, x, mask)
    rows, w = rows.reshape(-1, embed.dim), w.reshape(-1)
    return jnp.sum(rows * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)

  def accumulate(moments, base, x, mask):
    return pca_ops.accumulate(moments, *pca_samples(embed, cfg.pooling, base, x, mask))

  return SPARCSetup(cfg, backbone, embed, scorer, lora_paths, jax.jit(first_mean),
                    jax.jit(accumulate))


def init(setup: SPARCSetup, rng: jax.Array, spec: StreamSpec) -> SPARCState:
  """Empty state: no tasks, and the heads (unless label words score).

  Args:
    setup: the resolved SPARC.
    rng: key for the heads.
    spec: the stream.

  Returns:
    ``{"tasks": {}}`` plus ``"heads"`` when the scorer uses heads.

  Raises:
    ValueError: label words whose count is not ``spec.num_classes``.
  """
  setup.scorer.check(spec)
  state: SPARCState = {"tasks": {}}
  if setup.scorer.uses_heads:
    state["heads"] = heads_lib.init_heads(rng, spec, setup.backbone.feature_dim,
                                          setup.scorer.mode(spec))
  return state


def new_task_entry(setup: SPARCSetup, comp: Mapping, tasks: Mapping[str, Mapping],
                   task_index: int, num_tasks: int, key: jax.Array) -> dict:
  """Task ``t``'s state entry from its PCA and the stored tasks (host; steps 2-3 of SPARC).

  Args:
    setup: the resolved SPARC.
    comp: the task's PCA (:func:`task_pca`).
    tasks: ``{str(s): entry}`` of the stored tasks (host arrays).
    task_index: t.
    num_tasks: T (length of the overlap scores).
    key: the task's key (fold 1: new prompt, fold 2: fresh LoRA).

  Returns:
    ``{"pca", "z", ["basis"], ["lora"], ["ortho"], "overlap"}``.
  """
  cfg = setup.cfg
  n_tok, k = int(cfg.num_prompt_tokens), int(cfg.num_components)
  u_t = np.asarray(comp["components"], np.float32)
  mu_t = np.asarray(comp["mean"], np.float32)
  prev = [s for s in range(task_index) if str(s) in tasks]
  decision = reuse_decision(u_t, {s: tasks[str(s)]["pca"]["components"] for s in prev},
                            num_tasks, overlap=cfg.overlap, threshold=cfg.overlap_threshold)
  matched, reused = decision.matched, decision.reused
  entry = {"pca": {kk: jnp.asarray(v, jnp.float32) for kk, v in comp.items()}}
  ortho = None
  if prev:
    directions = np.concatenate(
        [np.asarray(prompt_of(cfg, tasks[str(s)])) - (np.asarray(tasks[str(s)]["pca"]["mean"])
                                                      if cfg.use_mean else 0.0) for s in prev])
  if reused:
    old = np.asarray(prompt_of(cfg, tasks[str(matched)]), np.float64)
    z = (old - (mu_t if cfg.use_mean else 0.0)) @ u_t.astype(np.float64)
    if not cfg.in_subspace:  # the free prompt starts at the old prompt itself
      z = old - (mu_t if cfg.use_mean else 0.0)
  else:
    std = np.sqrt(np.maximum(np.asarray(comp["eigenvalues"], np.float64), 0.0))
    z = (np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (n_tok, k)), np.float64) * std
         * cfg.prompt_init_scale)
    if prev and cfg.orthogonal_init:
      z, ortho = orthogonal_coordinates(z, u_t, directions, n_tok)
    if not cfg.in_subspace:  # same initial prompt as SPARC's, free from here on
      z = z @ u_t.astype(np.float64).T
  penalty = float(cfg.orthogonal_penalty)
  if prev and penalty > 0 and ortho is None and not reused:
    _, ortho = orthogonal_coordinates(np.zeros((n_tok, k)), u_t, directions, n_tok)
  entry["z"] = jnp.asarray(z, jnp.float32)
  if cfg.train_basis:
    entry["basis"] = jnp.asarray(u_t)
  if setup.lora_paths:
    if reused and cfg.reuse_lora:
      entry["lora"] = jax.tree.map(jnp.array, tasks[str(matched)]["lora"])
    else:
      fresh = lora_ops.init_lora(jax.random.fold_in(key, 2), setup.backbone.params,
                                 list(setup.lora_paths), int(cfg.lora_rank))
      entry["lora"] = {tree_ops.to_key(p): fresh[p] for p in setup.lora_paths}
  if penalty > 0 and ortho is not None:
    entry["ortho"] = jnp.asarray(ortho, jnp.float32)
  entry["overlap"] = {"scores": jnp.asarray(decision.scores),
                      "matched": jnp.asarray(matched, jnp.int32),
                      "score": jnp.asarray(decision.score, jnp.float32),
                      "reused": jnp.asarray(int(reused), jnp.int32)}
  return entry


def begin_task(setup: SPARCSetup, state: SPARCState, ctx: TaskContext) -> SPARCState:
  """Add the task's head, run the PCA pass and store the task's new entry (host).

  Args:
    setup: the resolved SPARC.
    state: the state after the previous task.
    ctx: the loop's context for task t (training batches, base params, ``rng`` folded with 0).

  Returns:
    The state with ``heads`` grown (heads scoring) and ``tasks/<t>`` the new entry (PCA,
    overlap decision, initial ``z``, optional basis/LoRA/ortho).

  Raises:
    ValueError: the task's PCA pass failed (the message names the task).
  """
  t, spec = ctx.task_index, ctx.spec
  key = jax.random.fold_in(ctx.rng, 0)
  state = dict(state)
  if setup.scorer.uses_heads:
    state["heads"] = heads_lib.add_task_head(state["heads"], key, spec,
                                             setup.backbone.feature_dim, t,
                                             setup.scorer.mode(spec))
  try:
    comp = task_pca(setup, ctx.base, ctx.batches("train", batch_size=setup.cfg.aux_batch_size))
  except ValueError as e:
    raise ValueError(f"task {t}: {e}") from None
  tasks = {str(s): jax.device_get(v) for s, v in state["tasks"].items()}
  entry = new_task_entry(setup, comp, tasks, t, spec.num_tasks, key)
  state["tasks"] = {**state["tasks"], str(t): entry}
  return state


def trainable(setup: SPARCSetup, state: SPARCState, info: TaskInfo) -> dict:
  """Task ``info.task``'s ``z`` (+ ``basis``, LoRA / c, head) to optimise.

  Args:
    setup: the resolved SPARC.
    state: the state after :func:`begin_task`.
    info: ``info.task`` is the task being trained.

  Returns:
    ``{"z"}`` plus ``"basis"`` (train_basis), ``"lora"`` (divided by ``lora_lr_scale``) and
    ``"head"`` where they apply.
  """
  task_index = info.task
  entry = state["tasks"][str(task_index)]
  params = {"z": entry["z"]}
  if setup.cfg.train_basis:
    params["basis"] = entry["basis"]
  if setup.lora_paths:  # trained as lora / c (see lora_lr_scale)
    params["lora"] = jax.tree.map(lambda v: v / setup.cfg.lora_lr_scale, entry["lora"])
  if setup.scorer.uses_heads:
    params["head"] = state["heads"][heads_lib.head_key(state["heads"], task_index)]
  return params


def combine(setup: SPARCSetup, state: SPARCState, params: Mapping, info: TaskInfo
            ) -> SPARCState:
  """The pure write-back of trained ``params`` into task ``info.task``'s entry (and head).

  Args:
    setup: the resolved SPARC.
    state: the state before the step.
    params: the trained parameters of :func:`trainable`.
    info: ``info.task`` is the task trained.

  Returns:
    The state with the task's entry (``lora`` multiplied back by ``lora_lr_scale``) and head
    replaced.
  """
  task_index = info.task
  entry = dict(state["tasks"][str(task_index)])
  entry.update({kk: params[kk] for kk in ("z", "basis") if kk in params})
  if "lora" in params:
    entry["lora"] = jax.tree.map(lambda v: v * setup.cfg.lora_lr_scale, params["lora"])
  state = {**state, "tasks": {**state["tasks"], str(task_index): entry}}
  if setup.scorer.uses_heads:
    state = heads_lib.with_head(state, params["head"], task_index)
  return state


def loss(setup: SPARCSetup, params: Params, state: SPARCState, base: Params, batch: Batch,
         rng: jax.Array, info: TaskInfo) -> tuple[jax.Array, dict]:
  """Masked cross-entropy of the task's prompt (+ LoRA) forward (+ λ‖Z U_tᵀ Q‖_F²).

  Args:
    setup: the resolved SPARC.
    params: the trainables of :func:`trainable`.
    state: the current state.
    base: frozen backbone params.
    batch: ``{"x" (b, L) token ids, "y" (b,) global labels, "mask" (b,)}``.
    rng: unused (no dropout).
    info: ``info.task`` the task trained, ``info.spec`` the stream.

  Returns:
    ``(loss scalar, {"accuracy"(, "orthogonal_penalty")})``.
  """
  del rng
  cfg, scorer = setup.cfg, setup.scorer
  task_index, spec = info.task, info.spec
  state = combine(setup, state, params, info)
  entry = state["tasks"][str(task_index)]
  out = scorer.forward(effective_params(setup, base, entry), batch["x"], prompt_of(cfg, entry))
  logits, labels = scorer.train_logits(state.get("heads"), out, batch["y"], spec, task_index)
  value = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
  aux = {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"])}
  penalty = float(cfg.orthogonal_penalty)
  if penalty > 0 and "ortho" in entry:
    directions = (jnp.matmul(entry["z"], basis_of(entry).T, precision=_HIGHEST)
                  if cfg.in_subspace else entry["z"])
    ortho_loss = jnp.sum(jnp.matmul(directions, entry["ortho"], precision=_HIGHEST) ** 2)
    value = value + penalty * ortho_loss
    aux["orthogonal_penalty"] = ortho_loss
  return value, aux


def predict(setup: SPARCSetup, state: SPARCState, base: Params, x: jax.Array, info: TaskInfo
            ) -> jax.Array:
  """Global logits ``(n, C)``: the given task's prompt, or each example's routed task's.

  ``info.task`` is the last trained task, ``info.task_id`` the test task (task-IL) or None.

  Args:
    setup: the resolved SPARC.
    state: the state after task ``info.task``.
    base: frozen backbone params.
    x: ``(n, L)`` token ids.
    info: ``info.task``, ``info.task_id``, ``info.spec``.

  Returns:
    ``(n, C)`` float logits over the global label space.
  """
  cfg, scorer = setup.cfg, setup.scorer
  current_task, task_id, spec = info.task, info.task_id, info.spec
  heads = state.get("heads")

  def task_forward(s):
    entry = state["tasks"][str(s)]
    out = scorer.forward(effective_params(setup, base, entry), x, prompt_of(cfg, entry))
    return scorer.task_logits(heads, out, spec, s, current_task)

  if task_id is not None or cfg.selection == "latest" or current_task == 0:
    return task_forward(current_task if task_id is None else task_id)
  choice = route(setup, state, base, x, current_task)
  if setup.lora_paths:  # one forward per stored task, each example keeps its routed one
    per_task = [task_forward(s) for s in range(current_task + 1)]
  else:  # one forward with each example's routed prompt
    prompts = jnp.stack([prompt_of(cfg, state["tasks"][str(s)])
                         for s in range(current_task + 1)])
    out = scorer.forward(base, x, prompts[choice])
    per_task = [scorer.task_logits(heads, out, spec, s, current_task)
                for s in range(current_task + 1)]
  logits = per_task[0]
  for s in range(1, current_task + 1):
    logits = jnp.where((choice == s)[:, None], per_task[s], logits)
  return logits


def diagnostics(setup: SPARCSetup, state: SPARCState) -> dict:
  """Per task: the re-use decision, explained variance and parameter counts; trainable %.

  Args:
    setup: the resolved SPARC (the backbone's parameter count).
    state: the state.

  Returns:
    ``{"backbone_params", "tasks": {t: {"matched", "score", "reused", "scores",
    "explained_variance", "prompt_params", "lora_params", "head_params"}}}`` plus, once a task is
    stored, ``trainable_params_per_task``, ``trainable_pct``, ``trainable_pct_with_head`` and
    ``reuse_decisions``.
  """
  backbone_params = setup.backbone.num_params()
  tasks = state.get("tasks", {})
  out = {"backbone_params": backbone_params, "tasks": {}}
  per_task = None
  for t in sorted(tasks, key=int):
    entry = tasks[t]
    prompt = _num(entry["z"]) + (_num(entry["basis"]) if "basis" in entry else 0)
    lora_n = _num(entry.get("lora", {}))
    head_n = 0
    if "heads" in state:
      head_n = _num(state["heads"].get(heads_lib.head_key(state["heads"], int(t)), {}))
    ev = np.asarray(entry["pca"]["eigenvalues"], np.float64)
    tv = float(np.asarray(entry["pca"]["total_variance"]))
    ov = entry["overlap"]
    scores = np.asarray(ov["scores"], np.float64)
    out["tasks"][t] = {
        "matched": int(np.asarray(ov["matched"])),
        "score": round(float(np.asarray(ov["score"])), 4),
        "reused": bool(int(np.asarray(ov["reused"]))),
        "scores": [round(float(v), 4) for v in scores[:int(t)]],
        "explained_variance": round(float(ev.sum() / tv) if tv > 0 else 0.0, 4),
        "prompt_params": prompt, "lora_params": lora_n, "head_params": head_n}
    per_task = (prompt, lora_n, head_n)
  if per_task is not None:
    prompt, lora_n, head_n = per_task
    out["trainable_params_per_task"] = prompt + lora_n
    out["trainable_pct"] = round(100.0 * (prompt + lora_n) / backbone_params, 5)
    out["trainable_pct_with_head"] = round(
        100.0 * (prompt + lora_n + head_n) / backbone_params, 5)
    out["reuse_decisions"] = [out["tasks"][t]["reused"] for t in sorted(tasks, key=int)]
  return out


def sparc(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """SPARC (and SPARC+LoRA with ``lora_rank=8``); see the module docstring.

  Args:
    backbone: a frozen text backbone taking token ids and a ``prefix`` (BERT, Llama).
    **kwargs: :class:`SPARCConfig` fields (``lora_sites`` / ``pca_batch_size`` are accepted
      as the old names of ``sites`` / ``aux_batch_size``).

  Returns:
    The method; its functions are this module's, bound to :func:`resolve`'s result.
  """
  s = resolve(backbone, SPARCConfig(**_renamed(kwargs)))
  bind = functools.partial
  return ContinualMethod(
      name=s.cfg.default_name, backbone=backbone, init=bind(init, s),
      begin_task=bind(begin_task, s), trainable=bind(trainable, s), loss=bind(loss, s),
      combine=bind(combine, s), end_task=no_host_hook, predict=bind(predict, s),
      diagnostics=bind(diagnostics, s))


def sparc_lora(backbone: Backbone, *, lora_rank: int = 8, **kwargs: Any) -> ContinualMethod:
  """SPARC with per-task LoRA (rank 8 on q and v by default); see :func:`sparc`.

  Args:
    backbone: the frozen text backbone.
    lora_rank: rank of the per-task LoRA.
    **kwargs: :class:`SPARCConfig` fields.

  Returns:
    The method (see :func:`sparc`).
  """
  return sparc(backbone, lora_rank=lora_rank, **kwargs)


def free_prompt(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """SPARC with the PCA-subspace constraint switched off (per-task free prompts).

  The control that isolates the subspace: everything else (PCA, overlap,
  re-use, orthogonal initialisation, routing, heads) is SPARC's; see
  ``in_subspace`` of :func:`sparc`.

  Args:
    backbone: the frozen text backbone.
    **kwargs: :class:`SPARCConfig` fields other than ``in_subspace``.

  Returns:
    The method (see :func:`sparc`).
  """
  return sparc(backbone, in_subspace=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Sequential prompt tuning (baseline)


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
  """Options of the prompt-tuning / sequential-LoRA / linear-probe baselines.

  Attributes:
    num_prompt_tokens: n of the one shared prompt (0: no prompt).
    prompt_init: ``"vocab"`` (n random rows of the word-embedding table, the pad row excluded;
      Lester et al. 2021) or ``"normal"`` (N(0, σ²), σ the table's std).
    lora_rank: rank of one shared LoRA trained in turn (0: none).
    sites: LoRA sites (roles or kernel paths).
    lora_alpha: LoRA α (scale α / r; default r).
    embedding_path: path of the word-embedding table (default: auto-detected).
    head_mode: ``"per_task"`` / ``"shared"`` (default by scenario).
    label_words: per global class, a token id or a word: label-word scoring (decoder LMs).
    tokenizer: ``tokenizer.json`` or HF folder for string ``label_words``.
    name: run name (default ``prompt_tuning`` / ``linear_probe`` / ``prompt_lora`` /
      ``seq_lora`` by what is trained).
  """

  num_prompt_tokens: int = 20
  prompt_init: str = "vocab"
  lora_rank: int = 0
  sites: tuple[str, ...] = ("q", "v")
  lora_alpha: float | None = None
  embedding_path: str | None = None
  head_mode: str | None = None
  label_words: tuple | None = None
  tokenizer: str | None = None
  name: str | None = None

  def __post_init__(self):
    for field in ("sites", "label_words"):
      value = getattr(self, field)
      if value is not None and not isinstance(value, (str, tuple)):
        object.__setattr__(self, field, tuple(value))
    if self.prompt_init not in ("vocab", "normal"):
      raise ValueError(f"init must be 'vocab' or 'normal', got {self.prompt_init!r}")
    if int(self.num_prompt_tokens) < 0 or int(self.lora_rank) < 0:
      raise ValueError(f"num_prompt_tokens and lora_rank must be >= 0, got "
                       f"{self.num_prompt_tokens} and {self.lora_rank}")
    if not self.num_prompt_tokens and not self.lora_rank and self.label_words is not None:
      raise ValueError("num_prompt_tokens=0 and lora_rank=0 train only the head (linear probe); "
                       "with label_words nothing would be trained")

  @property
  def shared_keys(self) -> tuple[str, ...]:
    """The state entries trained on every task: ``prompt`` and/or ``lora``."""
    return (("prompt",) if self.num_prompt_tokens else ()) + (("lora",) if self.lora_rank else ())

  @property
  def default_name(self) -> str:
    """``name``, or the run name by what is trained."""
    if self.name:
      return self.name
    if not self.lora_rank:
      return "prompt_tuning" if self.num_prompt_tokens else "linear_probe"
    return "prompt_lora" if self.num_prompt_tokens else "seq_lora"


class PromptTuningSetup(NamedTuple):
  """A :class:`PromptTuningConfig` resolved against a backbone (:func:`resolve_prompt_tuning`)."""

  cfg: PromptTuningConfig
  backbone: Backbone
  scorer: _Scorer
  lora_paths: tuple[str, ...]
  embedding_path: str


def resolve_prompt_tuning(backbone: Backbone, cfg: PromptTuningConfig) -> PromptTuningSetup:
  """Resolve the embedding table, the scorer and the LoRA paths of ``cfg`` on ``backbone``.

  Args:
    backbone: the frozen text backbone.
    cfg: the prompt-tuning options.

  Returns:
    A :class:`PromptTuningSetup`.

  Raises:
    ValueError: the embedding table, label words or LoRA sites do not resolve on ``backbone``.
  """
  path = embedding_path(backbone, cfg.embedding_path)
  scorer = _Scorer(backbone, cfg.head_mode, _resolve_label_words(cfg.label_words, cfg.tokenizer))
  lora_paths = _lora_paths(backbone, cfg.sites) if cfg.lora_rank else ()
  return PromptTuningSetup(cfg, backbone, scorer, lora_paths, path)


def _pt_init(setup: PromptTuningSetup, rng: jax.Array, spec: StreamSpec) -> dict:
  """The shared prompt (vocab rows or normal), the shared LoRA and the heads."""
  cfg, backbone, n_tok = setup.cfg, setup.backbone, int(setup.cfg.num_prompt_tokens)
  setup.scorer.check(spec)
  k_head, k_prompt = jax.random.split(rng)
  state = {}
  if n_tok:
    table = np.asarray(tree_ops.get(backbone.params, setup.embedding_path), np.float32)
    if cfg.prompt_init == "vocab":
      rows = np.asarray(jax.random.choice(k_prompt, table.shape[0] - 1, (n_tok,), replace=False))
      pad = backbone.pad_id if backbone.pad_id is not None else -1
      rows = rows + (rows >= pad) if 0 <= pad < table.shape[0] else rows  # skip the pad row
      prompt = table[rows]
    else:
      prompt = np.asarray(jax.random.normal(k_prompt, (n_tok, table.shape[1]))) * table.std()
    state["prompt"] = jnp.asarray(prompt, jnp.float32)
  if cfg.lora_rank:
    fresh = lora_ops.init_lora(jax.random.fold_in(k_prompt, 1), backbone.params,
                               list(setup.lora_paths), int(cfg.lora_rank))
    state["lora"] = {tree_ops.to_key(p): fresh[p] for p in setup.lora_paths}
  if setup.scorer.uses_heads:
    state["heads"] = heads_lib.init_heads(k_head, spec, backbone.feature_dim,
                                          setup.scorer.mode(spec))
  return state


def _pt_forward(setup: PromptTuningSetup, state: Mapping, base, x: jax.Array) -> jax.Array:
  """Features (or label-word scores) with the shared LoRA and prompt."""
  params = base
  if setup.cfg.lora_rank:
    params = lora_ops.apply_adapters(
        base, {p: state["lora"][tree_ops.to_key(p)] for p in setup.lora_paths},
        _lora_scale(setup.cfg.lora_rank, setup.cfg.lora_alpha))
  return setup.scorer.forward(params, x, state["prompt"] if setup.cfg.num_prompt_tokens else None)


def _pt_begin_task(setup: PromptTuningSetup, state: dict, ctx) -> dict:
  if not setup.scorer.uses_heads:
    return state
  heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                  setup.backbone.feature_dim, ctx.task_index,
                                  setup.scorer.mode(ctx.spec))
  return {**state, "heads": heads}


def _pt_trainable(setup: PromptTuningSetup, state: Mapping, info: TaskInfo) -> dict:
  params = {k: state[k] for k in setup.cfg.shared_keys}
  if setup.scorer.uses_heads:
    params["head"] = state["heads"][heads_lib.head_key(state["heads"], info.task)]
  return params


def _pt_combine(setup: PromptTuningSetup, state: Mapping, params: Mapping, info: TaskInfo
                ) -> dict:
  state = {**state, **{k: params[k] for k in setup.cfg.shared_keys}}
  if setup.scorer.uses_heads:
    state = heads_lib.with_head(state, params["head"], info.task)
  return state


def _pt_loss(setup: PromptTuningSetup, params: Params, state: Mapping, base: Params, batch: Batch,
             rng: jax.Array, info: TaskInfo) -> tuple[jax.Array, dict]:
  del rng
  task_index, spec = info.task, info.spec
  state = _pt_combine(setup, state, params, info)
  out = _pt_forward(setup, state, base, batch["x"])
  logits, labels = setup.scorer.train_logits(state.get("heads"), out, batch["y"], spec,
                                             task_index)
  value = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
  return value, {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"])}


def _pt_predict(setup: PromptTuningSetup, state: Mapping, base: Params, x: jax.Array,
                info: TaskInfo) -> jax.Array:
  scorer = setup.scorer
  current_task, task_id, spec = info.task, info.task_id, info.spec
  out = _pt_forward(setup, state, base, x)
  mode = scorer.mode(spec)
  if not scorer.uses_heads:
    if mode == "per_task" and task_id is None:  # class-IL: every seen task's label words
      keep = heads_lib._seen_class_mask(spec, current_task)  # pylint: disable=protected-access
      return jnp.where(jnp.asarray(keep), out, heads_lib.NEG_INF)
    task = current_task if task_id is None else task_id
    return scorer.task_logits(None, out, spec, task, current_task)
  return heads_lib.global_logits(state["heads"], out, spec, mode, current_task)


def _pt_diagnostics(setup: PromptTuningSetup, state: Mapping) -> dict:
  backbone_params = setup.backbone.num_params()
  shared = _num({k: state[k] for k in setup.cfg.shared_keys})
  head = 0
  if state.get("heads"):
    heads = state["heads"]
    head = _num(heads["shared"] if "shared" in heads else heads[max(heads, key=int)])
  return {"backbone_params": backbone_params, "trainable_params_per_task": shared,
          "prompt_params": _num(state.get("prompt", {})),
          "lora_params": _num(state.get("lora", {})),
          "trainable_pct": round(100.0 * shared / backbone_params, 5),
          "trainable_pct_with_head": round(100.0 * (shared + head) / backbone_params, 5)}


def prompt_tuning(backbone: Backbone, **kwargs: Any) -> ContinualMethod:
  """One shared soft prompt ``P`` (n, d), trained on every task in turn (no protection).

  The prompt is free (no subspace) and prepended like SPARC's; the backbone is frozen. Heads
  as in :mod:`clx.methods.sequential` (per-task heads in task-IL: forgetting comes from the
  shared prompt drifting), or label-word scoring with ``label_words``. ``lora_rank > 0`` adds
  one shared LoRA on ``sites`` trained in turn as well; with ``num_prompt_tokens=0`` that is
  sequential LoRA (:func:`prompt_lora`, which also supports label words, unlike
  ``clx.methods.sequential.lora``).

  Args:
    backbone: a frozen text backbone taking token ids and a ``prefix``.
    **kwargs: :class:`PromptTuningConfig` fields (``init`` / ``lora_sites`` are accepted as
      the old names of ``prompt_init`` / ``sites``).

  Returns:
    The method.
  """
  s = resolve_prompt_tuning(
      backbone, PromptTuningConfig(**_renamed(kwargs, _PT_LEGACY_NAMES, "prompt_tuning")))
  bind = functools.partial
  return ContinualMethod(
      name=s.cfg.default_name, backbone=backbone, init=bind(_pt_init, s),
      begin_task=bind(_pt_begin_task, s), trainable=bind(_pt_trainable, s),
      loss=bind(_pt_loss, s), combine=bind(_pt_combine, s), end_task=no_host_hook,
      predict=bind(_pt_predict, s), diagnostics=bind(_pt_diagnostics, s))


def prompt_lora(backbone: Backbone, *, num_prompt_tokens: int = 0, lora_rank: int = 8,
                name: str = "prompt_lora", **kwargs: Any) -> ContinualMethod:
  """Sequential LoRA (rank 8 on q, v) with an optional shared prompt; see :func:`prompt_tuning`.

  With the defaults (no prompt) it is ``clx.methods.sequential.lora`` on q/v,
  plus label-word scoring for decoder LMs.

  Args:
    backbone: the frozen text backbone.
    num_prompt_tokens: length of the shared prompt (0: none).
    lora_rank: rank of the shared LoRA.
    name: registry/run name.
    **kwargs: :func:`prompt_tuning`'s other options.

  Returns:
    The method.
  """
  return prompt_tuning(backbone, num_prompt_tokens=num_prompt_tokens, lora_rank=lora_rank,
                       name=name, **kwargs)


def linear_probe(backbone: Backbone, *, head_mode: str | None = None,
                 name: str = "linear_probe") -> ContinualMethod:
  """The head alone on the frozen backbone (no prompt, no LoRA), trained task after task.

  The control for every prompt/adapter method that trains a head: what the head
  reaches by itself. Per-task heads in task-IL, one shared head in domain-IL.

  Args:
    backbone: the frozen backbone.
    head_mode: ``"per_task"``/``"shared"``, or None for the scenario's default.
    name: registry/run name.

  Returns:
    The method.
  """
  return prompt_tuning(backbone, num_prompt_tokens=0, lora_rank=0, head_mode=head_mode,
                       name=name)


for _factory in (sparc, sparc_lora, free_prompt):
  _options.config_signature(_factory, SPARCConfig, _LEGACY_NAMES)
for _factory in (prompt_tuning, prompt_lora):
  _options.config_signature(_factory, PromptTuningConfig, _PT_LEGACY_NAMES)

REGISTRY = {"sparc": sparc, "sparc_lora": sparc_lora, "free_prompt": free_prompt,
            "prompt_tuning": prompt_tuning, "prompt_lora": prompt_lora,
            "linear_probe": linear_probe}

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
   ``lora_sites`` (roles, default q and v), ``ΔW = (α/r)·a b``, trained jointly
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

Baselines in this file: :func:`prompt_tuning` (one shared free prompt trained
in turn) and :func:`prompt_lora` (sequential LoRA, optionally with a shared
prompt), both with heads or label words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.methods import heads as heads_lib
from clx.methods.base import (ContinualMethod, StreamSpec, TaskInfo, identity_grads,
                              no_host_hook, site_key)
from clx.methods.base import get_path as _get
from clx.models.base import Backbone
from clx.ops import lora as lora_ops
from clx.ops import pca as pca_ops
from clx.ops import subspace

POOLINGS = ("token", "mean")
OVERLAPS = ("subspace", "mean_max_cosine", "principal")
SELECTIONS = ("subspace", "latest")
EMBEDDING_SOURCES = ("table", "input")
SPECIAL_TOKENS = ("auto", "edges", "none")
# Word-embedding tables of the clx text backbones (BERT/MiniLM, Llama).
EMBEDDING_PATHS = ("embeddings/word_embeddings/embedding", "embed_tokens/embedding")
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Helpers shared by SPARC and prompt tuning


def find_embedding_path(params, path: str | None = None) -> str:
  """The word-embedding table's path in ``params`` (given, or one of :data:`EMBEDDING_PATHS`)."""
  candidates = (path,) if path is not None else EMBEDDING_PATHS
  for cand in candidates:
    try:
      table = _get(params, cand)
    except (KeyError, TypeError):
      continue
    if np.ndim(table) == 2:
      return cand
  raise ValueError(f"no 2-D word-embedding table at {list(candidates)}; pass embedding_path= "
                   f"(the backbone's params have top-level keys {sorted(params)})")


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
    self.path = find_embedding_path(backbone.params, path)
    self.dim = int(np.shape(_get(backbone.params, self.path))[1])
    self.pad_id = int(backbone.pad_id)
    self.special = _special_rule(special, self.path)

  def mask(self, x):
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

  def __call__(self, base, x):
    x = jnp.asarray(x)
    valid = x != self.pad_id
    keep = self.mask(x)
    if self.source == "table":
      table = _get(base, self.path)
      return table[jnp.where(valid, x, 0)].astype(jnp.float32), keep
    module = self.backbone.merge(base)
    if hasattr(module, "embeddings"):  # BERT: word + position + type, LayerNorm
      return module.embeddings(x).astype(jnp.float32), keep
    if hasattr(module, "embed_tokens"):  # Llama: the table is the input
      return module.embed_tokens(jnp.where(valid, x, 0)).astype(jnp.float32), keep
    raise ValueError(f"embedding_source='input' does not know {self.backbone.name}'s embedding "
                     f"layer; use embedding_source='table'")


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
    return self.label_ids is None

  def mode(self, spec: StreamSpec) -> str:
    if self.label_ids is not None:
      return "per_task" if spec.scenario == "task" else "shared"
    return self.head_mode or heads_lib.default_mode(spec)

  def check(self, spec: StreamSpec):
    if self.label_ids is not None and len(self.label_ids) != spec.num_classes:
      raise ValueError(f"label_words has {len(self.label_ids)} entries but the stream has "
                       f"{spec.num_classes} classes (one label word per global class)")

  def forward(self, params, x, prefix):
    """Features ``(n, f)`` or global label-word scores ``(n, C)``."""
    if self.label_ids is None:
      return self.backbone.apply(params, x, prefix=prefix)
    return self.backbone.label_word_scores(params, x, jnp.asarray(self.label_ids), prefix=prefix)

  def train_logits(self, heads, out, y, spec, task_index):
    mode = self.mode(spec)
    if self.label_ids is None:
      return heads_lib.train_logits_and_labels(heads, out, y, spec, task_index, mode)
    if mode == "per_task":
      classes = jnp.asarray(spec.task_classes[task_index])
      return out[:, classes], heads_lib.train_labels(y, spec, task_index, mode)
    seen = jnp.asarray(heads_lib._seen_class_mask(  # pylint: disable=protected-access
        spec, task_index))
    return jnp.where(seen, out, heads_lib.NEG_INF), y

  def task_logits(self, heads, out, spec, task: int, seen_upto: int):
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


def _head_key(state, task_index) -> str:
  return "shared" if "shared" in state["heads"] else str(task_index)


def _lora_paths(backbone: Backbone, sites: Sequence[str]) -> tuple[str, ...]:
  """Kernel paths of ``sites`` (roles of ``backbone.sites`` or kernel paths), checked."""
  paths = tuple(dict.fromkeys(
      p for s in sites for p in (backbone.site_paths(s) if s in backbone.sites else (s,))))
  for p in paths:
    try:
      _get(backbone.params, p)
    except (KeyError, TypeError):
      raise ValueError(f"lora_sites entry {p!r} is neither a site role of {backbone.name} "
                       f"({sorted(backbone.sites)}) nor a kernel path in its params") from None
    site_key(p)
  return paths


def _num(tree) -> int:
  return int(sum(int(np.size(v)) for v in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Overlap


def overlap_score(new_basis, old_basis, kind: str = "subspace") -> float:
  """Overlap in [0, 1] of two orthonormal bases (d, k_a), (d, k_b); see the module docstring."""
  if kind not in OVERLAPS:
    raise ValueError(f"overlap must be one of {OVERLAPS}, got {kind!r}")
  a, b = jnp.asarray(new_basis, jnp.float32), jnp.asarray(old_basis, jnp.float32)
  if kind == "subspace":
    return float(subspace.subspace_overlap(a, b))
  if kind == "principal":
    return float(jnp.mean(subspace.principal_cosines(a, b)))
  cross = jnp.abs(jnp.matmul(a.T, b, precision=_HIGHEST))
  return float(jnp.clip(jnp.mean(jnp.max(cross, axis=1)), 0.0, 1.0))


def orthogonal_coordinates(z, basis, directions, num_tokens: int, tol: float = 1e-6):
  """``z`` (n, k) with ``z basisᵀ`` made orthogonal to the row space of ``directions`` (m, d).

  Returns ``(z', Q)`` where ``Q`` (d, r) is an orthonormal basis of the stored
  directions. Removes at most ``k − num_tokens`` directions (the most
  overlapping ones) so that a prompt can always be formed.
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


def token_pca(backbone: Backbone, x, num_components: int, *, embedding_source: str = "input",
              special_tokens="auto", embedding_path: str | None = None,
              batch_size: int = 256) -> dict[str, np.ndarray]:
  """The PCA SPARC's ``begin_task`` computes (``pooling="token"``), for token ids ``x`` (n, L).

  A host helper for calibrating τ outside a run (e.g. split-half overlaps of
  one task at the sample size of a task, on a validation stream).

  Args:
    backbone: a text backbone (BERT, Llama).
    x: int token ids ``(n, L)``.
    num_components: k.
    embedding_source, special_tokens, embedding_path: as in :func:`sparc`.
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

  e, w = rows_of(pad(x[:batch_size]))
  shift = jnp.sum(e * w[..., None], (0, 1)) / jnp.maximum(jnp.sum(w), 1.0)
  moments = pca_ops.init_moments(embed.dim, shift=shift)
  step = jax.jit(lambda m, xb: pca_ops.accumulate(m, *rows_of(xb)))
  for i in range(0, len(x), batch_size):
    moments = step(moments, pad(x[i:i + batch_size]))  # padded rows have weight 0
  return jax.device_get(pca_ops.pca_from_moments(moments, int(num_components)))


# ---------------------------------------------------------------------------------------------
# SPARC


def sparc(backbone: Backbone, *, num_prompt_tokens: int = 20, num_components: int = 100,
          pooling: str = "token", use_mean: bool = False, train_basis: bool = False,
          overlap_threshold: float = 0.7, overlap: str = "subspace",
          orthogonal_init: bool = True, orthogonal_penalty: float = 0.0, lora_rank: int = 0,
          lora_sites: Sequence[str] = ("q", "v"), lora_alpha: float | None = None,
          reuse_lora: bool = True, prompt_init_scale: float = 1.0,
          embedding_source: str = "input", embedding_path: str | None = None,
          special_tokens="auto", in_subspace: bool = True, lora_lr_scale: float = 1.0,
          selection: str = "subspace", head_mode: str | None = None,
          label_words: Sequence | None = None, tokenizer: str | None = None,
          pca_batch_size: int | None = None, name: str | None = None) -> ContinualMethod:
  """SPARC (and SPARC+LoRA with ``lora_rank=8``); see the module docstring.

  Args:
    backbone: a frozen text backbone taking token ids and a ``prefix`` (BERT, Llama).
    num_prompt_tokens: n, soft-prompt length (paper: 20 or 40).
    num_components: k, PCA components (paper: 100 or 300); at most d.
    pooling: PCA samples: ``"token"`` (every valid token, default) or
      ``"mean"`` (one mean-pooled embedding per example).
    use_mean: prompt ``Z Uᵀ + μ`` instead of ``Z Uᵀ``.
    train_basis: train ``U`` too (per task; it starts at the PCA basis).
    overlap_threshold: τ; re-use the best-matching prompt when its overlap ≥ τ.
    overlap: ``"subspace"`` (default), ``"mean_max_cosine"`` or ``"principal"``.
    orthogonal_init: initialise new prompts orthogonal to the stored ones.
    orthogonal_penalty: λ of ``λ‖Z U_tᵀ Q‖_F²`` (0 = off).
    lora_rank: 0 = prompt only (SPARC); > 0 = per-task LoRA (SPARC+LoRA).
    lora_sites: site roles (``backbone.sites`` keys) or kernel paths for LoRA.
    lora_alpha: LoRA α (scale α / r); default r (scale 1), as ``clx.methods.sequential.lora``.
    reuse_lora: on re-use, also start from the matched task's LoRA.
    prompt_init_scale: multiplies the N(0, λ) initial coordinates of new prompts.
    embedding_source: ``"input"`` (default: the embedding layer's output, the
      vectors the prompt is inserted among) or ``"table"`` (word-embedding rows).
    embedding_path: path of the word-embedding table (default: auto-detected).
    special_tokens: tokens left out of the PCA (and of routing) besides padding:
      ``"auto"`` (default: ``"edges"`` for BERT-family tables, else
      ``"none"``), ``"edges"`` (first and last real position: [CLS], [SEP]),
      ``"none"``, or a sequence of token ids.
    in_subspace: ``False`` switches the subspace constraint off (the
      per-task *free prompt* control): ``Z_t`` is the (n, d) prompt itself,
      initialised exactly as SPARC's (``Z_t U_tᵀ``, or the matched old prompt
      itself on re-use) but trained in all d dimensions. PCA, overlap,
      re-use and routing are unchanged.
    lora_lr_scale: the LoRA factors' learning rate relative to the run's (the
      prompt's): the factors are trained as ``a / c`` and ``b / c`` (``c =
      lora_lr_scale``), which under Adam (update invariant to the gradient's
      scale) moves them ``c`` times as far per step. 1 = one learning rate.
    selection: prompt choice without a task id: ``"subspace"`` or ``"latest"``.
    head_mode: ``"per_task"`` / ``"shared"`` (default by scenario).
    label_words: per global class, a token id or a word (with ``tokenizer``):
      label-word scoring instead of a head (decoder LMs).
    tokenizer: ``tokenizer.json`` or HF folder for string ``label_words``.
    pca_batch_size: batch size of the PCA pass (default the run's eval batch size).
    name: registry/run name (default ``"sparc"`` or ``"sparc_lora"``).
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
  if overlap not in OVERLAPS:
    raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
  if int(num_prompt_tokens) < 1:
    raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
  if not 0.0 <= float(overlap_threshold) <= 1.0 + 1e-9 and not math.isinf(overlap_threshold):
    raise ValueError(f"overlap_threshold must lie in [0, 1] (or inf: never re-use), got "
                     f"{overlap_threshold}")
  if float(orthogonal_penalty) < 0:
    raise ValueError(f"orthogonal_penalty must be >= 0, got {orthogonal_penalty}")
  if int(lora_rank) < 0:
    raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
  if not float(lora_lr_scale) > 0:
    raise ValueError(f"lora_lr_scale must be > 0, got {lora_lr_scale}")
  if train_basis and not in_subspace:
    raise ValueError("train_basis needs in_subspace=True (a free prompt has no basis)")
  embed = _Embedder(backbone, embedding_source, embedding_path, special_tokens)
  lora_c = float(lora_lr_scale)
  d, n_tok, k = embed.dim, int(num_prompt_tokens), int(num_components)
  if not 1 <= k <= d:
    raise ValueError(f"num_components must be in [1, d={d}], got {k}")
  scorer = _Scorer(backbone, head_mode, _resolve_label_words(label_words, tokenizer))
  lora_paths = _lora_paths(backbone, lora_sites) if lora_rank else ()
  lora_scale = (lora_alpha if lora_alpha is not None else max(lora_rank, 1)) / max(lora_rank, 1)
  penalty = float(orthogonal_penalty)
  method_name = name or (("sparc_lora" if lora_rank else "sparc") if in_subspace else
                         ("free_prompt_lora" if lora_rank else "free_prompt"))

  # -- jitted pieces ---------------------------------------------------------------------------

  def samples(base, x, mask):
    """PCA rows ``(n, L, d)`` or ``(n, d)`` and their weights."""
    e, valid = embed(base, x)
    w = valid.astype(jnp.float32) * mask.astype(jnp.float32)[:, None]
    if pooling == "token":
      return e, w
    cnt = jnp.sum(w, axis=1)
    pooled = jnp.einsum("nld,nl->nd", e, w, precision=_HIGHEST) / jnp.maximum(cnt, 1.0)[:, None]
    return pooled, (cnt > 0).astype(jnp.float32)

  @jax.jit
  def first_mean(base, x, mask):
    rows, w = samples(base, x, mask)
    rows, w = rows.reshape(-1, d), w.reshape(-1)
    return jnp.sum(rows * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)

  @jax.jit
  def accumulate(moments, base, x, mask):
    rows, w = samples(base, x, mask)
    return pca_ops.accumulate(moments, rows, w)

  def task_pca(ctx, base):
    moments = None
    for batch in ctx.batches("train", batch_size=pca_batch_size):
      if moments is None:
        moments = pca_ops.init_moments(d, shift=first_mean(base, batch["x"], batch["mask"]))
      moments = accumulate(moments, base, batch["x"], batch["mask"])
    if moments is None or float(moments["count"]) < 2:
      raise ValueError(f"task {ctx.task_index}: too few valid tokens for a PCA")
    return jax.device_get(pca_ops.pca_from_moments(moments, k))

  # -- prompt pieces ----------------------------------------------------------------------------

  def basis_of(entry):
    return entry["basis"] if "basis" in entry else entry["pca"]["components"]

  def prompt_of(entry):
    if in_subspace:
      p = jnp.matmul(entry["z"], jnp.asarray(basis_of(entry)).T, precision=_HIGHEST)
    else:  # free prompt: z is the (n, d) prompt (minus the mean with use_mean)
      p = jnp.asarray(entry["z"])
    return p + entry["pca"]["mean"] if use_mean else p

  def effective(base, entry):
    if not lora_paths:
      return base
    adapters = {p: entry["lora"][site_key(p)] for p in lora_paths}
    return lora_ops.apply_adapters(base, adapters, lora_scale)

  def init(rng, spec: StreamSpec):
    scorer.check(spec)
    state = {"tasks": {}}
    if scorer.uses_heads:
      state["heads"] = heads_lib.init_heads(rng, spec, backbone.feature_dim, scorer.mode(spec))
    return state

  def begin_task(state, ctx):
    t, spec = ctx.task_index, ctx.spec
    key = jax.random.fold_in(ctx.rng, 0)
    state = dict(state)
    if scorer.uses_heads:
      state["heads"] = heads_lib.add_task_head(state["heads"], key, spec, backbone.feature_dim,
                                               t, scorer.mode(spec))
    comp = task_pca(ctx, ctx.base)
    u_t = np.asarray(comp["components"], np.float32)
    mu_t = np.asarray(comp["mean"], np.float32)
    tasks = {str(s): jax.device_get(v) for s, v in state["tasks"].items()}
    prev = [s for s in range(t) if str(s) in tasks]
    scores = np.full((spec.num_tasks,), -1.0, np.float32)
    for s in prev:
      scores[s] = overlap_score(u_t, tasks[str(s)]["pca"]["components"], overlap)
    matched = int(np.argmax(scores[:t])) if prev else -1
    best = float(scores[matched]) if prev else -1.0
    reused = bool(prev) and best >= float(overlap_threshold)

    entry = {"pca": {kk: jnp.asarray(v, jnp.float32) for kk, v in comp.items()}}
    ortho = None
    if prev:
      directions = np.concatenate(
          [np.asarray(prompt_of(tasks[str(s)])) - (np.asarray(tasks[str(s)]["pca"]["mean"])
                                                   if use_mean else 0.0) for s in prev])
    if reused:
      old = np.asarray(prompt_of(tasks[str(matched)]), np.float64)
      z = (old - (mu_t if use_mean else 0.0)) @ u_t.astype(np.float64)
      if not in_subspace:  # the free prompt starts at the old prompt itself
        z = old - (mu_t if use_mean else 0.0)
    else:
      k_z = jax.random.fold_in(key, 1)
      std = np.sqrt(np.maximum(np.asarray(comp["eigenvalues"], np.float64), 0.0))
      z = np.asarray(jax.random.normal(k_z, (n_tok, k)), np.float64) * std * prompt_init_scale
      if prev and orthogonal_init:
        z, ortho = orthogonal_coordinates(z, u_t, directions, n_tok)
      if not in_subspace:  # same initial prompt as SPARC's, free from here on
        z = z @ u_t.astype(np.float64).T
    if prev and penalty > 0 and ortho is None and not reused:
      _, ortho = orthogonal_coordinates(np.zeros((n_tok, k)), u_t, directions, n_tok)
    entry["z"] = jnp.asarray(z, jnp.float32)
    if train_basis:
      entry["basis"] = jnp.asarray(u_t)
    if lora_paths:
      if reused and reuse_lora:
        entry["lora"] = jax.tree.map(jnp.array, tasks[str(matched)]["lora"])
      else:
        fresh = lora_ops.init_lora(jax.random.fold_in(key, 2), backbone.params, list(lora_paths),
                                   int(lora_rank))
        entry["lora"] = {site_key(p): fresh[p] for p in lora_paths}
    if penalty > 0 and ortho is not None:
      entry["ortho"] = jnp.asarray(ortho, jnp.float32)
    entry["overlap"] = {"scores": jnp.asarray(scores), "matched": jnp.asarray(matched, jnp.int32),
                        "score": jnp.asarray(best, jnp.float32),
                        "reused": jnp.asarray(int(reused), jnp.int32)}
    state["tasks"] = {**state["tasks"], str(t): entry}
    return state

  def trainable(state, info: TaskInfo):
    task_index = info.task
    entry = state["tasks"][str(task_index)]
    params = {"z": entry["z"]}
    if train_basis:
      params["basis"] = entry["basis"]
    if lora_paths:  # trained as lora / c (see lora_lr_scale)
      params["lora"] = jax.tree.map(lambda v: v / lora_c, entry["lora"])
    if scorer.uses_heads:
      params["head"] = state["heads"][_head_key(state, task_index)]
    return params

  def merged(state, params, task_index):
    entry = dict(state["tasks"][str(task_index)])
    entry.update({kk: params[kk] for kk in ("z", "basis") if kk in params})
    if "lora" in params:
      entry["lora"] = jax.tree.map(lambda v: v * lora_c, params["lora"])
    state = {**state, "tasks": {**state["tasks"], str(task_index): entry}}
    if scorer.uses_heads:
      state["heads"] = {**state["heads"], _head_key(state, task_index): params["head"]}
    return state

  def loss(params, state, base, batch, rng, info: TaskInfo):
    del rng
    task_index, spec = info.task, info.spec
    state = merged(state, params, task_index)
    entry = state["tasks"][str(task_index)]
    out = scorer.forward(effective(base, entry), batch["x"], prompt_of(entry))
    logits, labels = scorer.train_logits(state.get("heads"), out, batch["y"], spec, task_index)
    value = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
    aux = {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"])}
    if penalty > 0 and "ortho" in entry:
      directions = (jnp.matmul(entry["z"], basis_of(entry).T, precision=_HIGHEST)
                    if in_subspace else entry["z"])
      ortho_loss = jnp.sum(jnp.matmul(directions, entry["ortho"], precision=_HIGHEST) ** 2)
      value = value + penalty * ortho_loss
      aux["orthogonal_penalty"] = ortho_loss
    return value, aux

  def combine(state, params, info: TaskInfo):
    return merged(state, params, info.task)

  def select(state, base, x, upto: int):
    """Per example, the stored task whose PCA reconstructs its embeddings best ``(n,)``."""
    rows, w = samples(base, x, jnp.ones((x.shape[0],), jnp.float32))
    errs = []
    for s in range(upto + 1):
      pc = state["tasks"][str(s)]["pca"]
      centred = rows - pc["mean"]
      coords = jnp.matmul(centred, pc["components"], precision=_HIGHEST)
      # ‖c‖² − ‖cU‖² = ‖c − cUUᵀ‖² (orthonormal U)
      resid = jnp.sum(centred**2, -1) - jnp.sum(coords**2, -1)
      if pooling == "token":
        resid = jnp.sum(resid * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)
      errs.append(resid)
    return jnp.argmin(jnp.stack(errs, -1), -1)

  def predict(state, base, x, info: TaskInfo):
    current_task, task_id, spec = info.task, info.task_id, info.spec
    heads = state.get("heads")
    if task_id is not None or selection == "latest" or current_task == 0:
      task = current_task if task_id is None else task_id
      entry = state["tasks"][str(task)]
      out = scorer.forward(effective(base, entry), x, prompt_of(entry))
      return scorer.task_logits(heads, out, spec, task, current_task)
    choice = select(state, base, x, current_task)
    logits = None
    if not lora_paths:
      prompts = jnp.stack([prompt_of(state["tasks"][str(s)]) for s in range(current_task + 1)])
      out = scorer.forward(base, x, prompts[choice])
      for s in range(current_task + 1):
        ls = scorer.task_logits(heads, out, spec, s, current_task)
        logits = ls if logits is None else jnp.where((choice == s)[:, None], ls, logits)
      return logits
    for s in range(current_task + 1):
      entry = state["tasks"][str(s)]
      ls = scorer.task_logits(heads, scorer.forward(effective(base, entry), x, prompt_of(entry)),
                              spec, s, current_task)
      logits = ls if logits is None else jnp.where((choice == s)[:, None], ls, logits)
    return logits

  backbone_params = backbone.num_params()

  def diagnostics(state):
    tasks = state.get("tasks", {})
    out = {"backbone_params": backbone_params, "tasks": {}}
    per_task = None
    for t in sorted(tasks, key=int):
      entry = tasks[t]
      prompt = _num(entry["z"]) + (_num(entry["basis"]) if "basis" in entry else 0)
      lora_n = _num(entry.get("lora", {}))
      head_n = 0
      if "heads" in state:
        head_n = _num(state["heads"].get(_head_key(state, int(t)), {}))
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

  return ContinualMethod(name=method_name, backbone=backbone, init=init, begin_task=begin_task,
                         trainable=trainable, loss=loss, combine=combine,
                         transform_grads=identity_grads, end_task=no_host_hook, predict=predict,
                         diagnostics=diagnostics)


def sparc_lora(backbone: Backbone, *, lora_rank: int = 8, **kwargs) -> ContinualMethod:
  """SPARC with per-task LoRA (rank 8 on q and v by default); see :func:`sparc`."""
  return sparc(backbone, lora_rank=lora_rank, **kwargs)


def free_prompt(backbone: Backbone, **kwargs) -> ContinualMethod:
  """SPARC with the PCA-subspace constraint switched off (per-task free prompts).

  The control that isolates the subspace: everything else (PCA, overlap,
  re-use, orthogonal initialisation, routing, heads) is SPARC's; see
  ``in_subspace`` of :func:`sparc`.
  """
  return sparc(backbone, in_subspace=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Sequential prompt tuning (baseline)


def prompt_tuning(backbone: Backbone, *, num_prompt_tokens: int = 20, init: str = "vocab",
                  lora_rank: int = 0, lora_sites: Sequence[str] = ("q", "v"),
                  lora_alpha: float | None = None, embedding_path: str | None = None,
                  head_mode: str | None = None, label_words: Sequence | None = None,
                  tokenizer: str | None = None, name: str | None = None) -> ContinualMethod:
  """One shared soft prompt ``P`` (n, d), trained on every task in turn (no protection).

  The prompt is free (no subspace) and prepended like SPARC's; the backbone is
  frozen. ``init="vocab"`` (default) starts from ``n`` random rows of the
  word-embedding table (Lester et al. 2021's sampled-vocabulary init; the pad
  row excluded), ``"normal"`` from N(0, σ²) with σ the table's std. Heads as
  in :mod:`clx.methods.sequential` (per-task heads in task-IL: forgetting comes
  from the shared prompt drifting), or label-word scoring with ``label_words``.
  ``lora_rank > 0`` adds one shared LoRA on ``lora_sites`` trained in turn as
  well; with ``num_prompt_tokens=0`` that is sequential LoRA
  (:func:`prompt_lora`, which also supports label words, unlike
  ``clx.methods.sequential.lora``).
  """
  if init not in ("vocab", "normal"):
    raise ValueError(f"init must be 'vocab' or 'normal', got {init!r}")
  n_tok, rank = int(num_prompt_tokens), int(lora_rank)
  if n_tok < 0 or rank < 0:
    raise ValueError(f"num_prompt_tokens and lora_rank must be >= 0, got {num_prompt_tokens} and "
                     f"{lora_rank}")
  if n_tok == 0 and rank == 0 and label_words is not None:
    raise ValueError("num_prompt_tokens=0 and lora_rank=0 train only the head (linear probe); "
                     "with label_words nothing would be trained")
  path = find_embedding_path(backbone.params, embedding_path)
  scorer = _Scorer(backbone, head_mode, _resolve_label_words(label_words, tokenizer))
  lora_paths = _lora_paths(backbone, lora_sites) if rank else ()
  lora_scale = (lora_alpha if lora_alpha is not None else max(rank, 1)) / max(rank, 1)
  backbone_params = backbone.num_params()
  shared_keys = (("prompt",) if n_tok else ()) + (("lora",) if rank else ())

  def init_fn(rng, spec):
    scorer.check(spec)
    k_head, k_prompt = jax.random.split(rng)
    state = {}
    if n_tok:
      table = np.asarray(_get(backbone.params, path), np.float32)
      if init == "vocab":
        rows = np.asarray(jax.random.choice(k_prompt, table.shape[0] - 1, (n_tok,), replace=False))
        pad = backbone.pad_id if backbone.pad_id is not None else -1
        rows = rows + (rows >= pad) if 0 <= pad < table.shape[0] else rows
        prompt = table[rows]
      else:
        prompt = np.asarray(jax.random.normal(k_prompt, (n_tok, table.shape[1]))) * table.std()
      state["prompt"] = jnp.asarray(prompt, jnp.float32)
    if rank:
      fresh = lora_ops.init_lora(jax.random.fold_in(k_prompt, 1), backbone.params,
                                 list(lora_paths), rank)
      state["lora"] = {site_key(p): fresh[p] for p in lora_paths}
    if scorer.uses_heads:
      state["heads"] = heads_lib.init_heads(k_head, spec, backbone.feature_dim, scorer.mode(spec))
    return state

  def forward(state, base, x):
    params = base
    if rank:
      params = lora_ops.apply_adapters(
          base, {p: state["lora"][site_key(p)] for p in lora_paths}, lora_scale)
    return scorer.forward(params, x, state["prompt"] if n_tok else None)

  def begin_task(state, ctx):
    if not scorer.uses_heads:
      return state
    heads = heads_lib.add_task_head(state["heads"], jax.random.fold_in(ctx.rng, 0), ctx.spec,
                                    backbone.feature_dim, ctx.task_index, scorer.mode(ctx.spec))
    return {**state, "heads": heads}

  def trainable(state, info: TaskInfo):
    task_index = info.task
    params = {k: state[k] for k in shared_keys}
    if scorer.uses_heads:
      params["head"] = state["heads"][_head_key(state, task_index)]
    return params

  def merged(state, params, task_index):
    state = {**state, **{k: params[k] for k in shared_keys}}
    if scorer.uses_heads:
      state["heads"] = {**state["heads"], _head_key(state, task_index): params["head"]}
    return state

  def loss(params, state, base, batch, rng, info: TaskInfo):
    del rng
    task_index, spec = info.task, info.spec
    state = merged(state, params, task_index)
    out = forward(state, base, batch["x"])
    logits, labels = scorer.train_logits(state.get("heads"), out, batch["y"], spec, task_index)
    value = heads_lib.masked_cross_entropy(logits, labels, batch["mask"])
    return value, {"accuracy": heads_lib.masked_accuracy(logits, labels, batch["mask"])}

  def combine(state, params, info: TaskInfo):
    return merged(state, params, info.task)

  def predict(state, base, x, info: TaskInfo):
    current_task, task_id, spec = info.task, info.task_id, info.spec
    out = forward(state, base, x)
    mode = scorer.mode(spec)
    if not scorer.uses_heads:
      if mode == "per_task" and task_id is None:  # class-IL: every seen task's label words
        keep = heads_lib._seen_class_mask(spec, current_task)  # pylint: disable=protected-access
        return jnp.where(jnp.asarray(keep), out, heads_lib.NEG_INF)
      task = current_task if task_id is None else task_id
      return scorer.task_logits(None, out, spec, task, current_task)
    return heads_lib.global_logits(state["heads"], out, spec, mode, current_task)

  def diagnostics(state):
    shared = _num({k: state[k] for k in shared_keys})
    head = 0
    if state.get("heads"):
      heads = state["heads"]
      head = _num(heads["shared"] if "shared" in heads else heads[max(heads, key=int)])
    return {"backbone_params": backbone_params, "trainable_params_per_task": shared,
            "prompt_params": _num(state.get("prompt", {})),
            "lora_params": _num(state.get("lora", {})),
            "trainable_pct": round(100.0 * shared / backbone_params, 5),
            "trainable_pct_with_head": round(100.0 * (shared + head) / backbone_params, 5)}

  default_name = ("prompt_tuning" if n_tok else "linear_probe") if not rank else (
      "prompt_lora" if n_tok else "seq_lora")
  return ContinualMethod(name=name or default_name, backbone=backbone, init=init_fn,
                         begin_task=begin_task, trainable=trainable, loss=loss, combine=combine,
                         transform_grads=identity_grads, end_task=no_host_hook, predict=predict,
                         diagnostics=diagnostics)


def prompt_lora(backbone: Backbone, *, num_prompt_tokens: int = 0, lora_rank: int = 8,
                name: str = "prompt_lora", **kwargs) -> ContinualMethod:
  """Sequential LoRA (rank 8 on q, v) with an optional shared prompt; see :func:`prompt_tuning`.

  With the defaults (no prompt) it is ``clx.methods.sequential.lora`` on q/v,
  plus label-word scoring for decoder LMs.
  """
  return prompt_tuning(backbone, num_prompt_tokens=num_prompt_tokens, lora_rank=lora_rank,
                       name=name, **kwargs)


def linear_probe(backbone: Backbone, *, head_mode: str | None = None,
                 name: str = "linear_probe") -> ContinualMethod:
  """The head alone on the frozen backbone (no prompt, no LoRA), trained task after task.

  The control for every prompt/adapter method that trains a head: what the head
  reaches by itself. Per-task heads in task-IL, one shared head in domain-IL.
  """
  return prompt_tuning(backbone, num_prompt_tokens=0, lora_rank=0, head_mode=head_mode,
                       name=name)


REGISTRY = {"sparc": sparc, "sparc_lora": sparc_lora, "free_prompt": free_prompt,
            "prompt_tuning": prompt_tuning, "prompt_lora": prompt_lora,
            "linear_probe": linear_probe}

"""Text task streams: raw-text tasks (:func:`text_stream`) and token-id ``Stream`` factories."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from clx.data.text.datasets import ClxWordnetSupersense, load_text_dataset
from clx.data.text.sources import PARTIES, SUPERSENSES
from clx.data.text.tokens import DEFAULT_MAX_LENGTH, token_ids
from clx.data.types import ArraySplit, Stream, Task


# ---------------------------------------------------------------------------------------------
# Raw-text task streams


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """A split of a text task.

  Attributes:
    texts: object array of ``str``.
    y: int32 global labels.
    index: int64 row of each example in its dataset split (``load_text_dataset``).
    source: the dataset split ``index`` refers to; ``None`` (default) means the
      split of the same name (a validation stream's ``test`` split is carved
      out of the dataset's ``train`` split and says ``"train"``).
  """

  texts: np.ndarray
  y: np.ndarray
  index: np.ndarray
  source: str | None = None

  def __len__(self) -> int:
    return len(self.y)


@dataclasses.dataclass(frozen=True)
class TextTask:
  """A task of raw texts.

  Attributes:
    name: e.g. ``"rt_sentiment"`` or ``"wordnet: noun.act, noun.animal"``.
    train, test: the splits.
    classes: sorted global class ids of the task.
    dataset: the :data:`TEXT_BUILDERS` name the texts come from.
    field: the text column used.
  """

  name: str
  train: TextSplit
  test: TextSplit
  classes: tuple[int, ...]
  dataset: str
  field: str = "text"


@dataclasses.dataclass(frozen=True)
class TextStream:
  """An ordered sequence of text tasks.

  Attributes:
    name: stream name.
    tasks: the tasks in training order.
    scenario: ``"task"``, ``"class"`` or ``"domain"`` (``wordnet_living``).
    num_classes: size of the global label space.
    class_names: name of each global class.
  """

  name: str
  tasks: tuple[TextTask, ...]
  scenario: str
  num_classes: int
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.tasks)


def _check_cap(value, what: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
  return int(value)


def _sample(indices: np.ndarray, cap: int | None, seed: int, *salt: int) -> np.ndarray:
  """Up to ``cap`` of ``indices`` (sorted), drawn with a RandomState keyed by (seed, salt)."""
  if cap is None or len(indices) <= cap:
    return np.sort(indices)
  rng = np.random.RandomState([int(seed) % 2**32, *salt])
  return np.sort(indices[rng.permutation(len(indices))[:cap]])


def _text_split(columns: Mapping[str, np.ndarray], field: str, index: np.ndarray,
                y: np.ndarray, source: str | None = None) -> TextSplit:
  index = np.asarray(index, np.int64)
  order = np.argsort(index, kind="stable")
  return TextSplit(texts=columns[field][index[order]], y=np.asarray(y, np.int32)[order],
                   index=index[order], source=source)


_SPLITS = ("train", "test")


def _wordnet_tasks(data, *, num_tasks: int, classes_per_task: int | None, per_class_train,
                   per_class_test, class_order, seed: int, pos: Sequence[str], field: str,
                   offset: int) -> tuple[list[TextTask], list[str]]:
  who = "wordnet_supersense"
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"{who}: num_tasks must be a positive integer, got {num_tasks!r}")
  pos = (pos,) if isinstance(pos, str) else tuple(pos)
  if not pos or set(pos) - {"noun", "verb"}:
    raise ValueError(f"{who}: pos must be 'noun', 'verb' or both, got {pos!r}")
  counts = {s: np.bincount(data[s]["label"], minlength=len(SUPERSENSES)) for s in _SPLITS}
  need_train, need_test = per_class_train or 1, per_class_test or 1
  eligible = [c for c, lexname in enumerate(SUPERSENSES)
              if lexname.split(".")[0] in pos and counts["train"][c] >= need_train
              and counts["test"][c] >= need_test]
  if class_order is not None and not isinstance(class_order, str):
    order = []
    for c in class_order:
      if isinstance(c, str):
        if c not in SUPERSENSES:
          raise ValueError(f"{who}: unknown supersense {c!r}; known: {SUPERSENSES}")
        c = SUPERSENSES.index(c)
      if int(c) not in eligible:
        raise ValueError(f"{who}: class {SUPERSENSES[int(c)]} has fewer than {need_train} train / "
                         f"{need_test} test examples or another part of speech; eligible: "
                         f"{[SUPERSENSES[e] for e in eligible]}")
      order.append(int(c))
    if len(set(order)) != len(order):
      raise ValueError(f"{who}: class_order repeats classes: {class_order}")
    if classes_per_task is None:
      if len(order) % num_tasks:
        raise ValueError(f"{who}: {len(order)} classes do not divide into {num_tasks} tasks")
      classes_per_task = len(order) // num_tasks
  else:
    if classes_per_task is None:
      classes_per_task = min(4, len(eligible) // num_tasks)
    if classes_per_task < 1 or num_tasks * classes_per_task > len(eligible):
      raise ValueError(
          f"{who}: {num_tasks} tasks x {classes_per_task or '?'} classes need "
          f"{num_tasks * max(classes_per_task, 1)} supersenses with at least {need_train} train / "
          f"{need_test} test examples, but only {len(eligible)} have that; lower num_tasks, "
          f"classes_per_task or per_class_train/per_class_test")
    total = counts["train"] + counts["test"]
    chosen = sorted(sorted(eligible, key=lambda c: (-total[c], c))[:num_tasks * classes_per_task])
    if class_order is None:
      order = chosen
    elif class_order == "seed":
      order = [chosen[i] for i in np.random.RandomState(seed).permutation(len(chosen))]
    else:
      raise ValueError(f"{who}: class_order must be None, 'seed' or a sequence of supersenses, "
                       f"got {class_order!r}")
  if isinstance(classes_per_task, bool) or int(classes_per_task) < 1:
    raise ValueError(f"{who}: classes_per_task must be a positive integer, got "
                     f"{classes_per_task!r}")
  classes_per_task = int(classes_per_task)
  if num_tasks * classes_per_task > len(order):
    raise ValueError(f"{who}: {num_tasks} tasks x {classes_per_task} classes need "
                     f"{num_tasks * classes_per_task} classes, class_order has {len(order)}")
  order = order[:num_tasks * classes_per_task]
  caps = {"train": per_class_train, "test": per_class_test}
  tasks = []
  for t in range(num_tasks):
    members = order[t * classes_per_task:(t + 1) * classes_per_task]
    parts = {}
    for s_id, s in enumerate(_SPLITS):
      index, y = [], []
      for k, c in enumerate(members):
        picked = _sample(np.flatnonzero(data[s]["label"] == c), caps[s], seed, s_id, c)
        index.append(picked)
        y.append(np.full(len(picked), offset + t * classes_per_task + k))
      parts[s] = _text_split(data[s], field, np.concatenate(index), np.concatenate(y))
    tasks.append(TextTask(
        name=f"wordnet: {', '.join(SUPERSENSES[c] for c in members)}", train=parts["train"],
        test=parts["test"], dataset="clx_wordnet_supersense", field=field,
        classes=tuple(range(offset + t * classes_per_task, offset + (t + 1) * classes_per_task))))
  return tasks, [SUPERSENSES[c] for c in order]


# Domain-incremental "is it a living thing?" over WordNet lexical domains: each task pairs a
# living supersense (label 1) with a non-living one (label 0), so the labels mean the same in
# every task while the vocabulary (the domain) changes. Every class has >= 500 test glosses.
LIVING_PAIRS: tuple[tuple[str, str], ...] = (
    ("noun.animal", "noun.artifact"),
    ("noun.plant", "noun.substance"),
    ("noun.person", "noun.location"),
)
LIVING_CLASS_NAMES = ("non-living", "living")
VALIDATION_FRACTION = 0.2  # of each class's train split, held out for the validation stream
VALIDATION_SPLIT_SEED = 2  # fixed: the held-out part is the same for every run seed


def _validation_pools(labels: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit pool, validation pool) of class ``c``'s rows of the dataset's train split.

  A fixed permutation (seeded by ``(VALIDATION_SPLIT_SEED, c)``, not by the run
  seed) holds out ``ceil(VALIDATION_FRACTION * n)`` rows, so the validation
  stream of any seed never shares a text with the evaluated stream of any seed.
  """
  rows = np.flatnonzero(labels == c)
  perm = np.random.RandomState([VALIDATION_SPLIT_SEED, int(c)]).permutation(len(rows))
  held = int(np.ceil(VALIDATION_FRACTION * len(rows)))
  return np.sort(rows[perm[held:]]), np.sort(rows[perm[:held]])


def _wordnet_living_tasks(data, *, pairs, per_class_train, per_class_test, seed: int,
                          field: str, validation: bool) -> list[TextTask]:
  who = "wordnet_living"
  if isinstance(pairs, str) or not pairs:
    raise ValueError(f"{who}: pairs must be a non-empty sequence of (living, non-living) "
                     f"supersense pairs, got {pairs!r}")
  ids = []
  for pair in pairs:
    if isinstance(pair, str) or len(pair) != 2:
      raise ValueError(f"{who}: every pair must be (living, non-living) supersenses, got {pair!r}")
    for lexname in pair:
      if lexname not in SUPERSENSES:
        raise ValueError(f"{who}: unknown supersense {lexname!r}; known: {SUPERSENSES}")
    ids.append(tuple(SUPERSENSES.index(n) for n in pair))
  flat = [c for pair in ids for c in pair]
  if len(set(flat)) != len(flat):
    raise ValueError(f"{who}: a supersense appears in two pairs ({pairs}); every class must "
                     f"belong to one task so that tasks never share a text")
  tasks = []
  for (pos_c, neg_c), pair in zip(ids, pairs):
    parts = {}
    for s_id, s in enumerate(_SPLITS):
      index, y = [], []
      for label, c in ((0, neg_c), (1, pos_c)):
        if validation:  # train and test both from the held-out part of the train split
          pool = _validation_pools(data["train"]["label"], c)[1]
          rng = np.random.RandomState([int(seed) % 2**32, 7, int(c)])
          pool = pool[rng.permutation(len(pool))]
          n_train = per_class_train if per_class_train is not None else len(pool) // 2
          n_test = per_class_test if per_class_test is not None else len(pool) - n_train
          if n_train + n_test > len(pool):
            raise ValueError(f"{who}: validation holds {len(pool)} {SUPERSENSES[c]} glosses, "
                             f"fewer than per_class_train + per_class_test = {n_train + n_test}")
          picked = np.sort(pool[:n_train] if s == "train" else pool[n_train:n_train + n_test])
        elif s == "train":
          pool = _validation_pools(data["train"]["label"], c)[0]
          picked = _sample(pool, per_class_train, seed, s_id, c)
        else:
          picked = _sample(np.flatnonzero(data["test"]["label"] == c), per_class_test, seed,
                           s_id, c)
        index.append(picked)
        y.append(np.full(len(picked), label))
      source = "train" if validation else None
      parts[s] = _text_split(data[source or s], field, np.concatenate(index), np.concatenate(y),
                             source=source)
    tasks.append(TextTask(name=f"living: {pair[0]} vs {pair[1]}", train=parts["train"],
                          test=parts["test"], classes=(0, 1), dataset="clx_wordnet_supersense",
                          field=field))
  return tasks


RT_TASKS = ("sentiment", "subjectivity")
RT_TASK_CLASSES = {"sentiment": ("negative (rotten)", "positive (fresh)"),
                   "subjectivity": ("objective (plot)", "subjective (review)")}


def _rt_tasks(data, *, tasks: Sequence[str], per_class_train, per_class_test, seed: int,
              offset: int) -> tuple[list[TextTask], list[str]]:
  unknown = [t for t in tasks if t not in RT_TASKS]
  if unknown or not tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f"rotten_tomatoes: tasks must be distinct names from {RT_TASKS}, got "
                     f"{tasks!r}")
  caps = {"train": per_class_train, "test": per_class_test}
  parts: dict[str, dict[str, TextSplit]] = {t: {} for t in tasks}
  for s_id, s in enumerate(_SPLITS):
    labels = data[s]["label"]
    reviews = np.flatnonzero(labels < 2)
    base = {t: offset + 2 * i for i, t in enumerate(tasks)}
    if "subjectivity" in tasks:
      objective = _sample(np.flatnonzero(labels == 2), caps[s], seed, s_id, 2)
      rng = np.random.RandomState([int(seed) % 2**32, s_id, 3])
      shuffled = reviews[rng.permutation(len(reviews))]
      subjective = np.sort(shuffled[:len(objective)])
      reviews = np.sort(shuffled[len(objective):])  # sentiment never reuses these reviews
      index = np.concatenate([objective, subjective])
      y = np.concatenate([np.full(len(objective), base["subjectivity"]),
                          np.full(len(subjective), base["subjectivity"] + 1)])
      parts["subjectivity"][s] = _text_split(data[s], "text", index, y)
    if "sentiment" in tasks:
      picked = [_sample(reviews[labels[reviews] == c], caps[s], seed, s_id, c) for c in (0, 1)]
      y = np.concatenate([np.full(len(p), base["sentiment"] + c) for c, p in enumerate(picked)])
      parts["sentiment"][s] = _text_split(data[s], "text", np.concatenate(picked), y)
  out, names = [], []
  for i, t in enumerate(tasks):
    out.append(TextTask(name=f"rt_{t}", train=parts[t]["train"], test=parts[t]["test"],
                        classes=(offset + 2 * i, offset + 2 * i + 1),
                        dataset="clx_rotten_tomatoes"))
    names.extend(RT_TASK_CLASSES[t])
  return out, names


def _political_task(data, *, per_class_train, per_class_test, seed: int,
                    offset: int) -> tuple[TextTask, list[str]]:
  caps = {"train": per_class_train, "test": per_class_test}
  parts = {}
  for s_id, s in enumerate(_SPLITS):
    picked = [_sample(np.flatnonzero(data[s]["label"] == c), caps[s], seed, s_id, 10 + c)
              for c in (0, 1)]
    y = np.concatenate([np.full(len(p), offset + c) for c, p in enumerate(picked)])
    parts[s] = _text_split(data[s], "text", np.concatenate(picked), y)
  return (TextTask(name="convention_party", train=parts["train"], test=parts["test"],
                   classes=(offset, offset + 1), dataset="clx_political_sentences"),
          list(PARTIES))


def _check_scenario(scenario: str, who: str) -> str:
  if scenario not in ("task", "class"):
    raise ValueError(f"{who}: scenario must be 'task' or 'class', got {scenario!r} (the text "
                     f"tasks have disjoint label sets, so there is no 'domain' form)")
  return scenario


def text_stream(name: str, *, num_tasks: int | None = None, per_class_train: int | None = -1,
                per_class_test: int | None = -1, seed: int = 0, scenario: str | None = None,
                classes_per_task: int | None = None, class_order=None,
                pos: Sequence[str] = ("noun", "verb"), text_field: str = "text",
                tasks: Sequence[str] | None = None, political: bool = False,
                pairs: Sequence[Sequence[str]] | None = None, validation: bool = False,
                data_dir: str | os.PathLike | None = None,
                asset_cache: str | os.PathLike | None = None) -> TextStream:
  """The raw-text form of a named text stream (same tasks, order and labels as the id form).

  Streams:
    ``wordnet_supersense``: ``num_tasks`` (default 5) tasks of
      ``classes_per_task`` supersenses (default ``min(4, eligible //
      num_tasks)``). Eligible supersenses (of ``pos``) have at least
      ``per_class_train`` train and ``per_class_test`` test glosses; the
      ``num_tasks * classes_per_task`` largest are used, in ascending
      lexicographer-file order (``class_order=None``), a seeded permutation
      (``"seed"``) or an explicit list of lexnames/label ids. Global label
      ``k`` is the ``k``-th class of that order. Default caps 600 / 150 per
      class; default scenario ``"class"``.
    ``rotten_tomatoes``: tasks (default ``("sentiment", "subjectivity")``,
      truncated to ``num_tasks``). Task ``i`` owns global labels ``2i, 2i+1``:
      sentiment 0 negative (rotten) / 1 positive (fresh); subjectivity 2
      objective (plot sentence) / 3 subjective (review snippet). The
      subjective reviews are drawn at random in the same number as the plot
      sentences and are removed from the sentiment pool, so no text has two
      labels. Default caps: none (all data); default scenario ``"task"``.
    ``text_tasks``: RT sentiment, RT subjectivity, then ``num_tasks - 2``
      (default 3) WordNet groups of ``classes_per_task`` (default 4)
      supersenses, then the convention party task if ``political``. Labels are
      consecutive in task order. Default caps 600 / 150; scenario ``"task"``.
    ``wordnet_living``: domain-incremental "is it a living thing?": one task
      per ``(living, non-living)`` supersense pair of ``pairs`` (default
      :data:`LIVING_PAIRS`: animal/artifact, plant/substance,
      person/location), label 1 living, 0 non-living in every task (classes
      ``(0, 1)``, class names :data:`LIVING_CLASS_NAMES`), so only the lexical
      domain changes between tasks. Training texts come from the dataset's
      train split minus a fixed held-out 20 % per class
      (:data:`VALIDATION_FRACTION`); test texts from its test split. Default
      caps 128 / 500 (test: 500 per class per task). ``validation=True``
      gives the validation stream for choosing hyper-parameters: the same
      domains, train *and* test drawn (disjointly) from the held-out 20 %, so
      it shares no text with the evaluated stream of any seed; default caps
      128 / 200. Scenario ``"domain"`` only.

  Args:
    name: ``"wordnet_supersense"``, ``"rotten_tomatoes"`` or ``"text_tasks"``.
    num_tasks: number of tasks (see above).
    per_class_train, per_class_test: at most this many examples per class and
      split (chosen with a ``RandomState`` keyed by ``(seed, split, class)``);
      ``None`` keeps all; default per stream (see above).
    seed: seed of the per-class subsampling, the review draw and
      ``class_order="seed"``. The train/test split of each dataset is fixed.
    scenario: ``"task"`` or ``"class"`` (``"domain"`` for ``wordnet_living``).
    classes_per_task, class_order, pos, text_field: WordNet options
      (``text_field``: ``"text"`` = gloss, ``"definition"`` or ``"lemmas"``).
    tasks: Rotten Tomatoes task names and order.
    political: append the convention party task (``text_tasks`` only).
    pairs, validation: ``wordnet_living`` options (see above).
    data_dir, asset_cache: as in :func:`load_text_dataset`.

  Returns:
    A :class:`TextStream`; within a task, examples keep dataset order.
  """
  if name not in TEXT_STREAMS:
    raise KeyError(f"unknown text stream {name!r}; known: {sorted(TEXT_STREAMS)}")
  default_caps = {"rotten_tomatoes": (None, None),
                  "wordnet_living": (128, 200 if validation else 500)}.get(name, (600, 150))
  per_class_train = _check_cap(default_caps[0] if per_class_train == -1 else per_class_train,
                               "per_class_train")
  per_class_test = _check_cap(default_caps[1] if per_class_test == -1 else per_class_test,
                              "per_class_test")
  if name == "wordnet_living":
    if (scenario or "domain") != "domain":
      raise ValueError(f"wordnet_living: scenario must be 'domain' (labels mean living / "
                       f"non-living in every task), got {scenario!r}")
    scenario = "domain"
  else:
    scenario = _check_scenario(scenario or ("class" if name == "wordnet_supersense" else "task"),
                               name)
  if name != "wordnet_living" and (pairs is not None or validation):
    raise ValueError(f"{name}: pairs= and validation= are 'wordnet_living' options")
  if text_field not in ClxWordnetSupersense.TEXT_FIELDS:
    raise ValueError(f"{name}: text_field must be one of {ClxWordnetSupersense.TEXT_FIELDS}, got "
                     f"{text_field!r}")
  if political and name != "text_tasks":
    raise ValueError(f"{name}: political=True is only available in 'text_tasks'")
  if tasks is not None and name != "rotten_tomatoes":
    raise ValueError(f"{name}: tasks= selects Rotten Tomatoes tasks; it is only available in "
                     f"'rotten_tomatoes'")
  if name == "rotten_tomatoes":
    wordnet_only = {"classes_per_task": classes_per_task, "class_order": class_order,
                    "pos": None if tuple(pos) == ("noun", "verb") else pos,
                    "text_field": None if text_field == "text" else text_field}
    given = sorted(k for k, v in wordnet_only.items() if v is not None)
    if given:
      raise ValueError(f"rotten_tomatoes: {given} are WordNet options; this stream does not "
                       f"use them")
  load = lambda dataset: load_text_dataset(dataset, data_dir, asset_cache=asset_cache)  # noqa: E731
  caps = {"per_class_train": per_class_train, "per_class_test": per_class_test, "seed": seed}
  if name == "wordnet_living":
    wordnet_only = {"num_tasks": num_tasks, "classes_per_task": classes_per_task,
                    "class_order": class_order,
                    "pos": None if tuple(pos) == ("noun", "verb") else pos}
    given = sorted(k for k, v in wordnet_only.items() if v is not None)
    if given:
      raise ValueError(f"wordnet_living: {given} are not options of this stream (its tasks are "
                       f"the supersense pairs of pairs=)")
    out = _wordnet_living_tasks(load("clx_wordnet_supersense"),
                                pairs=LIVING_PAIRS if pairs is None else pairs,
                                field=text_field, validation=bool(validation), **caps)
    names = list(LIVING_CLASS_NAMES)
  elif name == "wordnet_supersense":
    out, names = _wordnet_tasks(load("clx_wordnet_supersense"),
                                num_tasks=5 if num_tasks is None else num_tasks,
                                classes_per_task=classes_per_task, class_order=class_order,
                                pos=pos, field=text_field, offset=0, **caps)
  elif name == "rotten_tomatoes":
    names_of_tasks = tuple(RT_TASKS if tasks is None else tasks)
    if num_tasks is not None:
      if not 1 <= num_tasks <= len(names_of_tasks):
        raise ValueError(f"rotten_tomatoes: num_tasks must be in [1, {len(names_of_tasks)}], got "
                         f"{num_tasks}")
      names_of_tasks = names_of_tasks[:num_tasks]
    out, names = _rt_tasks(load("clx_rotten_tomatoes"), tasks=names_of_tasks, offset=0, **caps)
  else:
    num_tasks = 5 if num_tasks is None else num_tasks
    wordnet_count = num_tasks - 2 - int(bool(political))
    if isinstance(num_tasks, bool) or wordnet_count < 0:
      raise ValueError(f"text_tasks: num_tasks must be >= {2 + int(bool(political))} (two Rotten "
                       f"Tomatoes tasks{' and the party task' if political else ''}), got "
                       f"{num_tasks!r}")
    out, names = _rt_tasks(load("clx_rotten_tomatoes"), tasks=RT_TASKS, offset=0, **caps)
    if wordnet_count:
      more, more_names = _wordnet_tasks(
          load("clx_wordnet_supersense"), num_tasks=wordnet_count,
          classes_per_task=4 if classes_per_task is None else classes_per_task,
          class_order=class_order, pos=pos, field=text_field, offset=len(names), **caps)
      out, names = out + more, names + more_names
    if political:
      task, more_names = _political_task(load("clx_political_sentences"), offset=len(names),
                                         **caps)
      out, names = out + [task], names + more_names
  for task in out:
    for s in _SPLITS:
      if len(getattr(task, s)) == 0:
        raise ValueError(f"{name}: task {task.name} has an empty {s} split")
  return TextStream(name=name, tasks=tuple(out), scenario=scenario, num_classes=len(names),
                    class_names=tuple(names))


def tokenize_text_stream(stream: TextStream, *, tokenizer="all-MiniLM-L6-v2",
                         max_length: int = DEFAULT_MAX_LENGTH,
                         data_dir: str | os.PathLike | None = None,
                         asset_cache: str | os.PathLike | None = None) -> Stream:
  """Turns a :class:`TextStream` into a :class:`~clx.data.types.Stream` of token ids.

  ``x`` is int32 ``(n, max_length)`` (truncated, right-padded with the pad id,
  no bucketing, so every task has one shape), read from the on-disk token
  cache (:func:`token_ids`); ``y`` the global labels.

  Args:
    stream: from :func:`text_stream` (with the same ``data_dir``/``asset_cache``).
    tokenizer: see :func:`resolve_tokenizer`.
    max_length: tokens per example.
    data_dir, asset_cache: as in :func:`load_text_dataset`.
  """
  tasks = []
  for task in stream.tasks:
    parts = {}
    for s in _SPLITS:
      split = getattr(task, s)
      ids = token_ids(task.dataset, split.source or s, field=task.field, tokenizer=tokenizer,
                      max_length=max_length, data_dir=data_dir, asset_cache=asset_cache)
      parts[s] = ArraySplit({"x": ids[split.index], "y": split.y})
    tasks.append(Task(name=task.name, train=parts["train"], test=parts["test"],
                      classes=task.classes))
  return Stream(name=stream.name, tasks=tuple(tasks), scenario=stream.scenario,
                num_classes=stream.num_classes)


def _stream(name: str, *, tokenizer="all-MiniLM-L6-v2", max_length: int = DEFAULT_MAX_LENGTH,
            flatten: bool = True, data_dir=None, asset_cache=None, **options) -> Stream:
  del flatten  # accepted for get_stream's uniform interface; token ids are always (n, L)
  raw = text_stream(name, data_dir=data_dir, asset_cache=asset_cache, **options)
  return tokenize_text_stream(raw, tokenizer=tokenizer, max_length=max_length,
                              data_dir=data_dir, asset_cache=asset_cache)


def wordnet_supersense(**options) -> Stream:
  """WordNet supersense class-incremental stream of MiniLM token ids.

  Options: ``num_tasks`` (5), ``classes_per_task``, ``class_order``, ``pos``,
  ``text_field``, ``per_class_train`` (600), ``per_class_test`` (150),
  ``seed`` (0), ``scenario`` (``"class"``), ``max_length`` (64),
  ``tokenizer``, ``data_dir``, ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("wordnet_supersense", **options)


def rotten_tomatoes(**options) -> Stream:
  """Rotten Tomatoes sentiment (labels 0/1) then subjectivity (2/3) as token ids.

  Options: ``num_tasks`` (2), ``tasks``, ``per_class_train`` / ``per_class_test``
  (None: all), ``seed``, ``scenario`` (``"task"``), ``max_length`` (64),
  ``tokenizer``, ``data_dir``, ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("rotten_tomatoes", **options)


def wordnet_living(**options) -> Stream:
  """Domain-incremental WordNet "living vs non-living" over lexical domains, as token ids.

  Options: ``pairs`` (:data:`LIVING_PAIRS`), ``validation`` (False),
  ``per_class_train`` (128), ``per_class_test`` (500; 200 with validation),
  ``text_field``, ``seed``, ``max_length`` (64), ``tokenizer``, ``data_dir``,
  ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("wordnet_living", **options)


def text_tasks(**options) -> Stream:
  """RT sentiment, RT subjectivity, WordNet groups (, convention party) as token ids.

  Options: ``num_tasks`` (5), ``classes_per_task`` (4), ``class_order``,
  ``political`` (False), ``per_class_train`` (600), ``per_class_test`` (150),
  ``seed``, ``scenario`` (``"task"``), ``max_length`` (64), ``tokenizer``,
  ``data_dir``, ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("text_tasks", **options)


STREAM_FACTORIES: dict[str, Callable[..., Stream]] = {
    "wordnet_supersense": wordnet_supersense,
    "rotten_tomatoes": rotten_tomatoes,
    "text_tasks": text_tasks,
    "wordnet_living": wordnet_living,
}
TEXT_STREAMS = tuple(STREAM_FACTORIES)

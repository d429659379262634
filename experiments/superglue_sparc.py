"""SPARC on SuperGLUE with a decoder LM (pods): label-word scoring, task- and domain-incremental.

Command:   CLX_SUPERGLUE_MODEL=/models/Llama-3.2-1B clx run superglue_sparc
           (domain-incremental: add --set stream.scenario=domain --workdir runs/superglue_sparc_domain;
           instead of the variable, --set model.path=..., stream.model_path=... and
           method_args.<method>.tokenizer=... for the four methods; --set stream.tasks=boolq,cb)
Needs:     TFDS ``super_glue`` prepared as array_record under $TFDS_DATA_DIR (clx never downloads;
           on a machine with internet: ``tfds build super_glue/boolq --data_dir $TFDS_DATA_DIR
           --file_format=array_record`` and the same for cb, copa, rte, wic, multirc), and a
           Llama-family Hugging Face folder (config.json, safetensors, tokenizer.json).
           Offline the run stops at once with the catalog's DatasetNotPreparedError, which says
           exactly that.
Hardware:  one GPU with >= 40 GB (H100/A100 80 GB: Llama-3.2-1B in float32, batch 16 x
           (256 + 20) tokens, frozen weights; add model.dtype for bfloat16 compute).
Run time:  NOT MEASURED (no TFDS super_glue and no Llama weights on the development machine).
           Estimate for Llama-3.2-1B on one H100: ~6·1.2e9·276 ≈ 2 TFLOP per training example,
           ~50-60 examples/s at 30-40 % utilisation; task-IL (5 tasks, at most 4,000 training
           examples each, 2 epochs ≈ 25k example passes + evaluation on the validation sets
           after every task) ≈ 10-15 min per method, ≈ 45-60 min for the four methods;
           domain-IL similar.
Expected:  Metric: the paper reports per-task accuracies and a forgetting ratio, not one ACC;
           read the matrix rows (``acc`` and ``acc_samples`` differ here: unequal task sizes).
           NOT MEASURED; what the paper reports (SPARC, arXiv 2502.02909, base model not
           stated): no forgetting in the task-incremental setting (per-task prompts: the
           accuracy matrix is constant down each column, which clx guarantees bit for bit),
           about 97 % of prior accuracy retained (forgetting ratio ≈ 3 %) in the
           domain-incremental setting, 0.04 % trainable parameters for the prompt (≈ 1 % with
           LoRA). Rough per-task accuracies to expect from prompt tuning a 1B decoder on the
           validation sets (an estimate from the prompt-tuning literature, not a clx
           measurement): BoolQ 65-75, CB 70-85, COPA 55-70, RTE 55-70, WiC 50-60. Sequential
           prompt tuning and sequential LoRA should forget the earlier tasks (FR well above
           SPARC's) in both scenarios.

Methods: ``sparc``, ``sparc_lora`` (per-task rank-8 LoRA on q/v), ``prompt_tuning`` (one shared
prompt trained in turn) and ``prompt_lora`` (sequential rank-8 LoRA on q/v), all scoring label
words (no head).

Paper settings used where known: 20 soft prompt tokens (paper: 20 or 40), 100 PCA components
(paper: 100 or 300), LoRA rank 8 (the survey's reconstruction; the paper's rank is not given)
on q and v, frozen backbone, SuperGLUE. Not given by the paper and chosen here: the base model
(a Llama-family decoder; the paper may have used T5 or GPT-2), the task order (BoolQ, CB, COPA,
RTE, WiC; MultiRC instead of COPA for domain-IL: the SuperGLUE leaderboard's order), the prompt
templates and label words below, τ = 0.7 on the subspace overlap, Adam with lr 3e-2 for
prompts and 5e-4 for LoRA factors (SPARC+LoRA trains both at once: ``lora_lr_scale``), batch
16, 2 epochs per task, at most 2,000
training examples per class and task, validation sets as test sets (SuperGLUE test labels
are hidden).

Stream ``super_glue_sparc`` (registered by this file): one task per SuperGLUE dataset, texts
formatted with the templates in :data:`TEMPLATES`, tokenised with the model's
``tokenizer.json`` (BOS added, the passage truncated so that the question and the ``Answer:``
cue always survive), right-padded with the model's pad id (-1 when it has none). One shared
label space of label words :data:`LABEL_WORDS` (`` yes`` / `` no`` / `` maybe`` / `` 1`` /
`` 2``): BoolQ/WiC/MultiRC True → yes, False → no; CB entailment → yes, contradiction → no,
neutral → maybe; RTE entailment → yes, not_entailment → no; COPA choice 1 → " 1",
2 → " 2".
``scenario="task"``: the task id is given and the argmax runs over the task's own label words;
``scenario="domain"``: no task id, every seen label word competes (COPA is left out of the
domain-IL default task list because its labels are not yes/no).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

MODEL = os.environ.get("CLX_SUPERGLUE_MODEL", "/models/Llama-3.2-1B")
LABEL_WORDS = (" yes", " no", " maybe", " 1", " 2")
YES, NO, MAYBE, ONE, TWO = range(5)
TASK_IL_TASKS = ("boolq", "cb", "copa", "rte", "wic")
DOMAIN_IL_TASKS = ("boolq", "cb", "rte", "wic", "multirc")

# name -> (body template, question/cue template, TFDS label -> shared class). The body is what
# gets truncated when the example is too long; the cue always survives.
TEMPLATES = {
    "boolq": ("{passage}", "\nQuestion: {question}?\nAnswer (yes or no):", (NO, YES)),
    "cb": ("{premise}", "\nQuestion: {hypothesis} yes, no, or maybe?\nAnswer:", (YES, NO, MAYBE)),
    "copa": ("{premise}", "\nWhat was the {question}?\nOption 1: {choice1}\nOption 2: {choice2}"
             "\nAnswer (1 or 2):", (ONE, TWO)),
    "rte": ("{premise}", "\nQuestion: {hypothesis} yes or no?\nAnswer:", (YES, NO)),
    "wic": ("Sentence 1: {sentence1}\nSentence 2: {sentence2}",
            "\nQuestion: is the word '{word}' used in the same sense in both sentences? yes or "
            "no?\nAnswer:", (NO, YES)),
    "multirc": ("{paragraph}", "\nQuestion: {question}\nCandidate answer: {answer}\nIs the "
                "answer correct? yes or no?\nAnswer:", (NO, YES)),
}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def format_example(task: str, record: dict) -> tuple[str, str]:
  """``(body, cue)`` strings of one SuperGLUE record (fields by TFDS feature name)."""
  body, cue, _ = TEMPLATES[task]
  fields = {k: _text(v) for k, v in record.items() if k != "label"}
  if task == "copa":
    fields["question"] = {"cause": "cause", "effect": "effect"}.get(fields["question"],
                                                                  fields["question"])
  return body.format(**fields), cue.format(**fields)


def encode(tokenizer, body: str, cue: str, max_length: int) -> list[int]:
  """Token ids ``[BOS] body[:room] cue``: the body is cut so the cue always fits."""
  head = tokenizer.encode(body, add_special_tokens=True).ids
  tail = tokenizer.encode(cue, add_special_tokens=False).ids
  if len(tail) >= max_length:
    raise ValueError(f"the question/cue alone has {len(tail)} tokens, max_length is {max_length}")
  return head[:max_length - len(tail)] + tail


def _load_task(task: str, data_dir, max_per_class: int | None, seed: int):
  from clx.data import catalog  # raises DatasetNotPreparedError at once when not prepared
  first_field = {"boolq": "passage", "cb": "premise", "copa": "premise", "rte": "premise",
                 "wic": "sentence1", "multirc": "paragraph"}[task]
  splits = catalog.load_catalog(f"super_glue/{task}", data_dir, splits=["train", "validation"],
                                x_key=first_field, y_key="label")
  out = {}
  for name, split in (("train", splits["train"]), ("test", splits["validation"])):
    arrays = dict(split.arrays)
    arrays[first_field] = arrays.pop("x")
    y = np.asarray(arrays.pop("y"))
    keep = np.flatnonzero(y >= 0)
    if name == "train" and max_per_class:
      rng = np.random.default_rng([seed, len(task)])
      keep = np.concatenate([rng.permutation(keep[y[keep] == c])[:max_per_class]
                             for c in np.unique(y[keep])])
      keep.sort()
    records = [{k: v[i] for k, v in arrays.items()} for i in keep]
    out[name] = (records, y[keep])
  return out


def super_glue_stream(*, model_path: str = MODEL, tasks=None, scenario: str = "task",
                      max_length: int = 256, max_per_class: int | None = 2000, seed: int = 0,
                      data_dir=None, **unused):
  """The SuperGLUE tasks as token ids in the shared label-word space (see the module docstring)."""
  del unused
  from clx.data.types import ArraySplit, Stream, Task
  if scenario not in ("task", "domain"):
    raise ValueError(f"super_glue_sparc: scenario must be 'task' or 'domain', got {scenario!r}")
  if isinstance(tasks, str):  # --set stream.tasks=boolq,cb
    tasks = [t.strip() for t in tasks.split(",") if t.strip()]
  tasks = tuple(tasks or (TASK_IL_TASKS if scenario == "task" else DOMAIN_IL_TASKS))
  unknown = [t for t in tasks if t not in TEMPLATES]
  if unknown:
    raise ValueError(f"unknown SuperGLUE task(s) {unknown}; known: {sorted(TEMPLATES)}")
  raw = {t: _load_task(t, data_dir, max_per_class, seed) for t in tasks}  # data first: fail fast
  from tokenizers import Tokenizer
  from clx.models import llama
  folder = pathlib.Path(model_path).expanduser()
  pad = llama.default_pad_id(llama.LlamaConfig.from_file(folder / "config.json", strict=False))
  tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  out = []
  for task in tasks:
    mapping = np.asarray(TEMPLATES[task][2])
    parts = {}
    for name, (records, y) in raw[task].items():
      ids = [encode(tokenizer, *format_example(task, r), max_length) for r in records]
      x = np.full((len(ids), max_length), pad, np.int32)
      for i, seq in enumerate(ids):
        x[i, :len(seq)] = seq
      parts[name] = ArraySplit({"x": x, "y": mapping[y].astype(np.int32)})
    out.append(Task(task, parts["train"], parts["test"], tuple(sorted(set(mapping.tolist())))))
  return Stream(f"super_glue_{scenario}", tuple(out), scenario, len(LABEL_WORDS))


def _register():
  from clx.data import streams
  streams.register_stream(
      "super_glue_sparc", lambda flatten=True, data_dir=None, asset_cache=None, **kw:
      super_glue_stream(data_dir=data_dir, **kw), overwrite=True)


# Rehearsal shapes (clx.rehearse): examples per task after max_per_class, SuperGLUE's published
# train / validation sizes (BoolQ 9,427 / 3,270, CB 250 / 56, COPA 400 / 100, RTE 2,490 / 277,
# WiC 5,428 / 638, MultiRC 27,243 / 4,848); with 2 classes above 2,000 examples each the train
# split is capped at 4,000 (class balance from memory: BoolQ, WiC, MultiRC exceed 2,000 per class).
SYNTHETIC_SIZES = {"boolq": (9427, 3270), "cb": (250, 56), "copa": (400, 100), "rte": (2490, 277),
                   "wic": (5428, 638), "multirc": (27243, 4848)}


def synthetic_spec(args):
  """The :class:`clx.data.synthetic.SyntheticSpec` of ``super_glue_sparc`` for ``args``."""
  from clx.data import synthetic
  scenario = args.get("scenario", "task")
  tasks = args.get("tasks")
  if isinstance(tasks, str):
    tasks = [t.strip() for t in tasks.split(",") if t.strip()]
  tasks = tuple(tasks or (TASK_IL_TASKS if scenario == "task" else DOMAIN_IL_TASKS))
  unknown = [t for t in tasks if t not in TEMPLATES]
  if unknown:
    raise ValueError(f"unknown SuperGLUE task(s) {unknown}; known: {sorted(TEMPLATES)}")
  cap = args.get("max_per_class") or None
  classes = [tuple(sorted(set(TEMPLATES[t][2]))) for t in tasks]
  train = [min(SYNTHETIC_SIZES[t][0], cap * len(c)) if cap else SYNTHETIC_SIZES[t][0]
           for t, c in zip(tasks, classes)]
  return synthetic.SyntheticSpec(
      name=f"super_glue_{scenario}", scenario=scenario, num_classes=len(LABEL_WORDS),
      task_classes=tuple(classes), example_shape=(int(args.get("max_length", 256)),),
      kind="tokens", train_per_task=tuple(train),
      test_per_task=tuple(SYNTHETIC_SIZES[t][1] for t in tasks), vocab_size=128256,
      source="SuperGLUE train (capped by max_per_class) / validation sizes; token ids "
             "fill the whole max_length (the longest case)")


def _register_synthetic():
  from clx.data import synthetic
  synthetic.register_spec("super_glue_sparc", synthetic_spec)


_register()
_register_synthetic()


def get_config():
  label_args = {"label_words": list(LABEL_WORDS), "tokenizer": MODEL}
  sparc_args = {"num_prompt_tokens": 20, "num_components": 100, "overlap": "subspace",
                "overlap_threshold": 0.7, "aux_batch_size": 64, **label_args}
  return {
      "name": "superglue_sparc",
      "stream": {"name": "super_glue_sparc", "model_path": MODEL, "scenario": "task",
                 "tasks": None, "max_length": 256, "max_per_class": 2000, "seed": 0},
      "model": {"name": "llama_pretrained", "path": MODEL},
      "methods": ["sparc", "sparc_lora", "prompt_tuning", "prompt_lora"],
      "method_args": {
          "sparc": sparc_args,
          # the prompt at 3e-2, the LoRA factors at 5e-4 (lora_lr_scale = 5e-4 / 3e-2)
          "sparc_lora": {**sparc_args, "lora_rank": 8, "lora_lr_scale": 5e-4 / 3e-2},
          "prompt_tuning": {"num_prompt_tokens": 20, **label_args},
          "prompt_lora": {"lora_rank": 8, **label_args},  # sequential LoRA on q, v
      },
      "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "learning_rate": 3e-2,
                "eval_batch_size": 64},
      "train_overrides": {"prompt_lora": {"learning_rate": 5e-4}},
      "seed": 0,
  }

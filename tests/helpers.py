"""Shared test helpers (importable as ``tests.helpers``)."""

import numpy as np

from clx.data.types import ArraySplit, Stream, Task


def make_gaussian_stream(num_tasks=3, classes_per_task=2, dim=16, n_train=96, n_test=40,
                         scenario="class", seed=0, separation=3.0) -> Stream:
  """A small synthetic class-incremental stream of Gaussian blobs (fast to learn)."""
  rng = np.random.default_rng(seed)
  num_classes = num_tasks * classes_per_task
  means = rng.normal(size=(num_classes, dim)) * separation
  tasks = []
  for t in range(num_tasks):
    classes = tuple(range(t * classes_per_task, (t + 1) * classes_per_task))

    def split(n):
      y = rng.choice(np.array(classes), size=n).astype(np.int32)
      x = (means[y] + rng.normal(size=(n, dim))).astype(np.float32)
      return ArraySplit({"x": x, "y": y})

    tasks.append(Task(f"classes {classes[0]}-{classes[-1]}", split(n_train), split(n_test), classes))
  return Stream("gaussian", tuple(tasks), scenario, num_classes)

"""Learning-rate schedules of the official code that optax does not have.

A schedule here is a factory ``steps_per_epoch -> (step -> lr)``: the loop knows the number of
steps per epoch only once the task's data is batched, and calls the factory then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def epoch_cosine(learning_rate: float, epochs: int) -> Callable[[int], Callable[[Any], jax.Array]]:
  """The per-epoch ``CosineSchedule`` of InfLoRA and CODA-Prompt: ``lr_e = lr·cos(99π·e / (200(E−1)))``.

  ``liangyanshuo/InfLoRA`` and ``GT-RIPL/CODA-Prompt`` share ``utils/schedulers.py``
  ``CosineSchedule(optimizer, K=epochs)``, stepped once per epoch, so the rate is constant
  within an epoch and the last epoch runs at cos(99π/200) ≈ 0.0157 of ``lr``.

  Args:
    learning_rate: lr, the rate of epoch 0.
    epochs: E (E < 2 is taken as 2, so a single epoch keeps the full rate).

  Returns:
    A schedule factory ``steps_per_epoch -> (step -> lr)``: the step ``s`` (an int or () int
    array) lies in epoch ``e = s // steps_per_epoch``; the rate is a () float32 array,
    jit-able.
  """
  epochs = max(int(epochs), 2)

  def factory(steps_per_epoch: int) -> Callable[[Any], jax.Array]:
    def lr(step):
      epoch = step // max(steps_per_epoch, 1)
      return learning_rate * jnp.cos(99 * jnp.pi * epoch / (200 * (epochs - 1)))
    return lr
  return factory

"""The official per-epoch cosine (clx.ops.schedules) against a float64 reference."""

import jax
import numpy as np

from clx.ops.schedules import epoch_cosine


def test_epoch_cosine_is_the_official_formula():
  # float64 reference of the official CosineSchedule, stepped once per epoch, on fresh
  # random rates / epoch counts / epoch lengths.
  rng = np.random.default_rng(1234)
  for _ in range(5):
    lr, epochs, per_epoch = float(rng.uniform(1e-4, 1e-1)), int(rng.integers(2, 60)), \
        int(rng.integers(1, 40))
    schedule = jax.jit(epoch_cosine(lr, epochs)(per_epoch))
    steps = np.arange(epochs * per_epoch)
    got = np.array([float(schedule(s)) for s in steps[::max(1, len(steps) // 200)]])
    e = steps[::max(1, len(steps) // 200)] // per_epoch
    want = lr * np.cos(99 * np.pi * e.astype(np.float64) / (200 * (epochs - 1)))
    # float32: the cosine's argument is rounded, so the error is absolute (≈ eps·lr), which
    # is large relative to the last epochs' small rates (cos ≈ 0.0157 at the end).
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=4e-7 * lr)
  # One epoch keeps the full rate (E < 2 is taken as 2, as before the move).
  assert float(epoch_cosine(0.1, 1)(5)(4)) == np.float32(0.1)


def test_inflora_and_coda_prompt_use_the_one_schedule():
  """InfLoRA re-exports it; CODA-Prompt's ``official_lr_schedule`` is it at a phase's lr/epochs."""
  import types
  from clx.methods import coda_prompt, inflora
  from clx.ops import schedules
  assert inflora.epoch_cosine is schedules.epoch_cosine
  phase = types.SimpleNamespace(learning_rate=0.02, epochs=3)
  got = [float(coda_prompt.official_lr_schedule(phase)(4)(s)) for s in range(12)]
  want = [float(epoch_cosine(0.02, 3)(4)(s)) for s in range(12)]
  assert got == want and got[4] < got[0] == np.float32(0.02)

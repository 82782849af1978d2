"""The generic training loop (fat.loop): keep-best, patience, the NaN guard's
epoch check, logging and sharding, on a toy step (no model)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fat import loop, steps, variables
from fat.errors import CheckpointError


def toy_step(lr=0.1):
  """A guarded SGD step on ``loss = mean((w * x - target)^2)``."""
  tx = optax.sgd(lr)
  def loss_fn(trainable, frozen, x, target):
    pred = trainable["w"]["v"] * x + frozen["b"]["v"]
    return jnp.mean((pred - target) ** 2), {}
  return tx, steps._make_guarded_step(loss_fn, tx, project=False)


def toy_batches(n_steps, target=2.0, nan_at=()):
  for i in range(n_steps):
    x = np.ones((4, 3), np.float32)
    t = np.full((4, 3), np.nan if i in nan_at else target, np.float32)
    yield x, t


def part():
  return variables.Partition(trainable={"w": {"v": jnp.zeros(3)}},
                             frozen={"b": {"v": jnp.zeros(3)}})


def spec(**kw):
  base = dict(name="toy", tag="t", steps_per_epoch=2, epochs=4, train_images=8,
              knob="config.toy.learning_rate", log_every=100)
  return loop.LoopSpec(**{**base, **kw})


def test_without_score_returns_the_last_variables_and_stats():
  tx, step = toy_step()
  p = part()
  out = loop.train(step, p, tx.init(p.trainable), toy_batches(8), spec())
  # The mean over 4 rows x 3 weights gives dL/dw = (2/3) (w - 2): 8 SGD steps at
  # lr 0.1 from 0 leave w = 2 (1 - r^8), r = 1 - 0.1 * 2/3.
  r = 1 - 0.1 * 2 / 3
  np.testing.assert_allclose(out.variables["w"]["v"], 2 * (1 - r ** 8) * np.ones(3), rtol=1e-5)
  np.testing.assert_array_equal(out.variables["b"]["v"], np.zeros(3))
  assert out.stats["steps"] == 8 and out.stats["epochs"] == 4.0
  assert out.stats["train_images"] == 8 and out.stats["nonfinite_steps"] == 0
  assert "kept_step" not in out.stats
  assert [s for s, _ in out.losses] == [8]  # log_every 100: only the last step
  assert out.losses[0][1] == pytest.approx(4 * r ** 14, rel=1e-4)  # loss at step 8's start


def test_keep_best_and_patience():
  """Scores at steps 0, 1, 2, ...: a new best at step 2, then two worse ones
  stop training (patience 2); the variables scored best come back."""
  tx, step = toy_step()
  fake = iter([1.0, 0.9, 0.8, 0.85, 0.95, 0.5, 0.4, 0.3, 0.2])
  seen = []

  def score(v):
    seen.append(np.asarray(v["w"]["v"]))
    return next(fake)

  p = part()
  out = loop.train(step, p, tx.init(p.trainable), toy_batches(8),
                   spec(score=score, select_every=1, patience=2, log_every=1))
  assert out.stats["steps"] == 4 and out.stats["kept_step"] == 2
  assert out.stats["epochs"] == 2.0  # of the 4 configured: 2 steps an epoch
  assert [s for s, _ in out.stats["calibration_loss_by_step"]] == [0, 1, 2, 3, 4]
  assert out.losses[-1][0] == 4  # the curve ends where training stopped
  np.testing.assert_array_equal(out.variables["w"]["v"], seen[2])
  assert not np.array_equal(seen[2], seen[4])
  fake = iter([1.0, 0.9, 0.8, 0.85, 0.95, 0.5, 0.4, 0.3, 0.2])
  out = loop.train(step, p, tx.init(p.trainable), toy_batches(8),
                   spec(score=score, select_every=1, patience=0))
  assert out.stats["steps"] == 8 and out.stats["kept_step"] == 8
  # select_every 0 scores at epoch ends only.
  fake = iter([1.0, 0.5, 0.6, 0.7, 0.8])
  out = loop.train(step, p, tx.init(p.trainable), toy_batches(8), spec(score=score))
  assert [s for s, _ in out.stats["calibration_loss_by_step"]] == [0, 2, 4, 6, 8]
  assert out.stats["kept_step"] == 2


def test_nan_guard_counts_bad_steps_and_an_all_bad_epoch_is_an_error():
  tx, step = toy_step()
  p = part()
  out = loop.train(step, p, tx.init(p.trainable), toy_batches(8, nan_at=(3,)), spec())
  assert out.stats["nonfinite_steps"] == 1 and out.stats["steps"] == 8
  assert np.all(np.isfinite(out.variables["w"]["v"]))
  with pytest.raises(FloatingPointError,
                     match=r"TOY t: every step of epoch 2 gave a non-finite .* lower "
                           r"config\.toy\.learning_rate"):
    loop.train(step, p, tx.init(p.trainable), toy_batches(8, nan_at=(2, 3)), spec())


def test_returns_unreplicated_variables_that_reuse_compiled_functions():
  tx, step = toy_step()
  p = part()
  out = loop.train(step, p, tx.init(p.trainable), toy_batches(2), spec(epochs=1))
  f = jax.jit(lambda v: v["w"]["v"] * 2)
  f(p.merged())
  f(out.variables)
  assert f._cache_size() == 1


def test_spec_rejects_bad_values():
  with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
    spec(steps_per_epoch=0)
  with pytest.raises(ValueError, match="patience needs a score"):
    spec(patience=2)


def _varying_batches(n_steps):
  """Batches that differ step to step, so a resumed loop that skipped the wrong
  ones ends elsewhere."""
  for i in range(n_steps):
    yield np.full((4, 3), 1.0 + 0.1 * i, np.float32), np.full((4, 3), 2.0 - 0.05 * i, np.float32)


def _interrupted(batches, at):
  for i, b in enumerate(batches):
    if i == at:
      raise KeyboardInterrupt
    yield b


@pytest.mark.parametrize("kill_at", [1, 5, 8])
def test_a_killed_loop_resumes_to_the_uninterrupted_result(tmp_path, kill_at):
  """Step checkpoints every 3 steps (Adam, keep-best and patience on): a loop
  killed before step ``kill_at + 1`` and started again on its folder ends with
  the uninterrupted loop's variables, losses and stats, bit for bit."""
  tx = optax.adam(0.05)
  def loss_fn(trainable, frozen, x, target):
    return jnp.mean((trainable["w"]["v"] * x - target) ** 2), {}
  step = steps._make_guarded_step(loss_fn, tx, project=False)
  score = lambda v: float(jnp.sum((v["w"]["v"] - 1.7) ** 2))
  kw = dict(steps_per_epoch=3, epochs=4, score=score, select_every=2, patience=3, log_every=2,
            checkpoint_every=3)
  p = part()
  full = loop.train(step, p, tx.init(p.trainable), _varying_batches(12),
                    spec(checkpoint_dir=str(tmp_path / "a"), **kw))
  resumed_spec = spec(checkpoint_dir=str(tmp_path / "b"), **kw)
  with pytest.raises(KeyboardInterrupt):
    loop.train(step, p, tx.init(p.trainable), _interrupted(_varying_batches(12), kill_at),
               resumed_spec)
  out = loop.train(step, p, tx.init(p.trainable), _varying_batches(12), resumed_spec)
  jax.tree.map(np.testing.assert_array_equal, out.variables, full.variables)
  assert out.losses == full.losses and len(full.losses) > 3, (out.losses, full.losses, out.stats, full.stats)
  drop = lambda s: {k: v for k, v in s.items() if k != "train_seconds"}
  assert drop(out.stats) == drop(full.stats)
  assert full.stats["steps"] == 12 and full.stats["kept_step"] > 0
  # A finished loop's folder gives its result again without a step.
  again = loop.train(None, p, tx.init(p.trainable), iter(()), resumed_spec)
  jax.tree.map(np.testing.assert_array_equal, again.variables, full.variables)


def test_a_step_checkpoint_of_another_state_is_a_checkpoint_error(tmp_path):
  """A step checkpoint whose tree differs from the run's (saved by other code,
  e.g. an optimizer state of another structure) is refused with one message."""
  saver = loop.StepCheckpoints(str(tmp_path), 1)
  saver.save(1, {"t": {"a": np.ones(3, np.float32)}}, {"step": 1})
  saver.close()
  saver = loop.StepCheckpoints(str(tmp_path), 1)
  for other in ({"t": {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}},
                {"t": {"a": np.ones(4, np.float32)}}):
    with pytest.raises(CheckpointError, match="does not match this run's training state.*--fresh"):
      saver.restore(other)
  restored, counters = saver.restore({"t": {"a": np.zeros(3, np.float32)}})
  np.testing.assert_array_equal(restored["t"]["a"], np.ones(3))
  assert counters == {"step": 1}
  saver.close()

"""Float training of a base classifier (config.job == "float").

The job holds its workdir's lock and saves a step checkpoint (parameters, BN
statistics, optimizer state) every ``config.checkpoint_every`` steps; after a
kill, the same command resumes from the last one and ends with the weights
an uninterrupted run ends with (``experiments/run_dir.py``, ``fat.loop.StepCheckpoints``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from fat import checkpoints, data, evaluate, float_training, loop, models, parallel
from experiments import config_checks, run_dir


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  return dict(num_classes=config.num_classes, width=config.width,
              small_input=config.small_input, bn_momentum=config.bn_momentum)


def _check_finite(params, loss, where: str) -> None:
  """Refuses a diverged model (nothing is saved then)."""
  if not (np.isfinite(float(loss)) and all(np.all(np.isfinite(np.asarray(p)))
                                           for p in jax.tree.leaves(params))):
    raise FloatingPointError(f"float training diverged ({where}: loss {float(loss)}, or "
                             "non-finite weights); lower config.learning_rate.")


def train_float(config: ml_collections.ConfigDict, workdir: str, fresh: bool = False) -> dict:
  """Trains the float model, evaluates it and saves it to ``config.output``."""
  config_checks.validate_float(config)
  train = data.load(config.dataset, "train", config.data_dir or None)
  test = data.load(config.dataset, "test", config.data_dir or None)
  if config.train_examples > len(train):
    raise ValueError(f"config.train_examples is {config.train_examples}, more than the "
                     f"{len(train)} train images; lower it, or use 0 for all of them.")
  if config.train_examples:
    train = data.subset(train, config.train_examples / len(train), config.seed)
  model = models.create(config.model, **model_kwargs(config))
  steps_per_epoch = len(train) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size {config.batch_size} exceeds the {len(train)} train "
                     "examples; lower it.")
  config_checks.ensure_writable(os.path.dirname(os.path.abspath(config.output)))
  key = {"config": json.loads(config.to_json_best_effort())}
  with run_dir.job(workdir, key, fresh) as stage:  # the events file appears only on success
    if stage.resumed:
      logging.warning("resuming the unfinished float training in %s (--fresh starts over)",
                      workdir)
    return _train(config, stage, model, train, test, steps_per_epoch)


def _train(config, stage: run_dir.Stage, model, train, test, steps_per_epoch: int) -> dict:
  total = steps_per_epoch * config.epochs
  tx = float_training.optimizer(config.learning_rate, config.weight_decay, total,
                                int(config.warmup_epochs * steps_per_epoch),
                                config.get("optimizer", "adamw"))
  # One compiled init (the same values as eager init, op by op): eager, each
  # initializer and shape would compile on its own.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(config.seed), jnp.zeros((1,) + train.images.shape[1:]))
  mesh = parallel.data_mesh()
  params, stats = parallel.replicate((variables["params"], variables["batch_stats"]), mesh)
  opt_state = parallel.replicate(tx.init(params), mesh)  # as the step returns it: no recompile
  step = float_training.make_train_step(model, tx, config.label_smoothing)
  # TensorBoard's writer imports TensorFlow (3 s): here, not when the flags are checked.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(stage.path,
                                                just_logging=jax.process_index() > 0)
  predict = evaluate.make_predict(lambda v, x: model.apply(v, x, train=False))
  saver = loop.StepCheckpoints(stage.steps_dir("float"), config.checkpoint_every)
  state = lambda: jax.tree.map(np.asarray, parallel.unreplicate((params, stats, opt_state)))
  restored = saver.restore(state())
  start, top1 = 0, None
  if restored is not None:
    (params, stats, opt_state), counters = restored
    params, stats, opt_state = parallel.replicate((params, stats, opt_state), mesh)
    start, top1 = counters["step"], counters["top1_pct"]
  t0 = time.time()
  stream = data.batches(train, config.batch_size, seed=config.seed, epochs=config.epochs,
                        drop_remainder=True, augment_images=config.augment)
  bar = tqdm(itertools.islice(stream, start, None), total=total, initial=start,
             desc="float train")
  with contextlib.closing(saver):
    for i, (x, y) in enumerate(bar, start):
      params, stats, opt_state, top1 = _step(config, step, (params, stats, opt_state), x, y,
                                             i, mesh, steps_per_epoch, writer, predict, test,
                                             t0, top1)
      if saver.due(i + 1, i + 1 == total):
        saver.save(i + 1, state(), {"step": i + 1, "top1_pct": top1})
  writer.close()
  meta = {"model": config.model, "model_kwargs": model_kwargs(config),
          "dataset": config.dataset, "top1_pct": top1, "epochs": config.epochs,
          "train_seconds": time.time() - t0, "seed": config.seed}
  checkpoints.save(config.output, {"params": params, "batch_stats": stats}, meta)
  return meta


def _step(config, step, state, x, y, i, mesh, steps_per_epoch, writer, predict, test, t0, top1):
  """Step ``i`` (from 0); the loss is checked every 50 steps, the model at each
  epoch end, where it is also evaluated. Returns the new state and top-1."""
  params, stats, opt_state = state
  params, stats, opt_state, loss = step(params, stats, opt_state, parallel.shard_batch(x, mesh),
                                        parallel.shard_batch(y, mesh))
  if (i + 1) % 50 == 0:
    _check_finite((), loss, f"step {i + 1}")
    writer.write_scalars(i + 1, {"train_loss": float(loss)})
  if (i + 1) % steps_per_epoch == 0:
    _check_finite((params, stats), loss, f"epoch {(i + 1) // steps_per_epoch}")
    preds = evaluate.predict(predict, {"params": params, "batch_stats": stats}, test,
                             config.eval_batch_size, desc="eval")
    top1 = evaluate.top1_pct(preds, test.labels)
    epoch = (i + 1) // steps_per_epoch
    writer.write_scalars(i + 1, {"test_top1_pct": top1})
    logging.info("epoch %d: test top-1 %.2f%% (%.0f s)", epoch, top1, time.time() - t0)
    print(f"epoch {epoch}: test top-1 {top1:.2f}% ({time.time() - t0:.0f} s)", flush=True)
  return params, stats, opt_state, top1

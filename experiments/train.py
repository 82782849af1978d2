"""The FAT main job: float -> fold -> calibrate -> PTQ -> FAT (-> QAT) -> evaluate -> report.

``train_and_evaluate(config, workdir)`` runs every setting of ``config`` and
writes to ``workdir``: report.json, report.md, config.json, PNG plots,
TensorBoard event files and, per setting, an orbax checkpoint of the
quantized variables (``checkpoints/<setting>``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from tqdm import tqdm

from fat import (calibrate, checkpoints, data, evaluate, fold, methods, models, parallel,
                 quant, report, rules, schedules)
from fat.models import pretrained
from fat.layers import ACT_COLLECTION, TRAINABLE_COLLECTION
from experiments import config_checks, run_dir


def setting_rules(s, fat_cfg) -> tuple[rules.QuantRule, ...]:
  """The quantizer rules of one setting (see configs/default.py)."""
  ranges = dict(alpha_range=tuple(fat_cfg.alpha_range), beta_range=tuple(fat_cfg.beta_range))
  weight = quant.QuantSpec(bits=s.weight_bits, kind=s.weight_kind, per_channel=s.per_channel,
                           **ranges)
  act = quant.QuantSpec(bits=s.act_bits, kind=s.act_kind, **ranges)
  overrides = ()
  if s.act_kind == "asymmetric":
    # The network input has a fixed range, [-1, 1] for "keras" preprocessing. On
    # an asymmetric grid its zero point, round(-127.5), puts every pixel value on
    # a rounding tie (resolved differently by XLA, ONNX Runtime and the integer
    # reference); the symmetric grid has none.
    overrides = (rules.QuantRule(pattern=r"^input_q$",
                                 act=dataclasses.replace(act, kind="symmetric")),)
  if s.first_last_bits:
    first_last = quant.QuantSpec(bits=s.first_last_bits, kind=s.weight_kind,
                                 per_channel=s.per_channel, **ranges)
    overrides += (rules.QuantRule(pattern=r"^(stem|classifier)(/|$)", weight=first_last),)
  return rules.uniform_rules(weight=weight, act=act, overrides=overrides)


class Evaluator:
  """Predictions on the eval split, compiled once per model stage."""

  def __init__(self, test: data.Split, batch_size: int):
    self.test, self.batch_size, self.reference = test, batch_size, None

  def __call__(self, predict_fn, variables, desc):
    preds = evaluate.predict(predict_fn, variables, self.test, self.batch_size, desc=desc)
    out = {"top1_pct": evaluate.top1_pct(preds, self.test.labels)}
    if self.reference is not None:
      out["agreement_pct"] = evaluate.agreement_pct(preds, self.reference)
    return out, preds


def logits_of(fn, variables, split, batch_size: int) -> np.ndarray:
  """Logits of the jitted ``fn(variables, x)`` over ``split``, in its order."""
  return np.concatenate([np.asarray(fn(variables, x)) for x, _ in split.batches(batch_size)])


def check_finite_epoch(skipped: int, steps: int, what: str, epoch: int, knob: str) -> int:
  """The NaN guard reverts single bad steps; an epoch of only bad steps is an error."""
  if skipped == steps:
    raise FloatingPointError(
        f"{what}: every step of epoch {epoch + 1} gave a non-finite loss, variables or "
        f"optimizer state, so nothing was trained; lower {knob} or check the float "
        "checkpoint.")
  return skipped


@functools.lru_cache(maxsize=4)
def fat_update(qmodel, learning_rate: float, reset_steps: int, lr_decay: float, loss: str,
               project: bool):
  """(optimizer, jitted FAT step) for one quantized model and recipe, built once
  per process, so that repeated runs of one setting reuse the compiled step."""
  tx = schedules.fat_optimizer(learning_rate, reset_steps, lr_decay)
  return tx, methods.make_fat_step(qmodel, tx, loss, project)


@functools.lru_cache(maxsize=4)
def qat_update(qmodel, learning_rate: float):
  """(optimizer, jitted QAT step), built once per process like ``fat_update``."""
  tx = optax.adam(learning_rate)
  return tx, methods.make_qat_step(qmodel, tx)


def train_thresholds(qmodel, qvars, unlabeled, teacher: np.ndarray, cfg, seed, writer, tag,
                     log_every, score=None):
  """FAT: Adam with the cosine-and-reset schedule on alpha/beta only.

  With ``score`` (variables -> distillation loss on the calibration images, the
  first images of ``unlabeled``, so training images too; no labels) and
  ``cfg.keep_best``, the thresholds are scored at the start, every
  ``cfg.select_every`` steps (0: at each epoch end) and at the end, and those
  with the lowest score are returned; otherwise the last ones. With
  ``cfg.patience`` > 0, training stops early after that many scores in a row
  that do not beat the best one.
  """
  tx, step = fat_update(qmodel, cfg.learning_rate, cfg.reset_steps, cfg.lr_decay, cfg.loss,
                        cfg.project_thresholds)
  mesh = parallel.data_mesh()
  thresholds = qvars[TRAINABLE_COLLECTION]
  frozen = {k: v for k, v in qvars.items() if k != TRAINABLE_COLLECTION}
  thresholds, frozen = parallel.replicate((thresholds, frozen), mesh)
  opt_state = parallel.replicate(tx.init(thresholds), mesh)
  n = len(unlabeled)
  steps_per_epoch = max(1, n // cfg.batch_size)
  total = steps_per_epoch * cfg.epochs
  stream = unlabeled.batches(cfg.batch_size, seed=seed, epochs=cfg.epochs,
                             drop_remainder=n >= cfg.batch_size, with_index=True)
  losses, nonfinite, t0 = [], 0, time.time()
  skipped = jnp.zeros((), jnp.int32)  # stays on device: no sync per step
  select = score is not None and cfg.keep_best
  select_every = cfg.select_every or steps_per_epoch
  scores = [(0, score(qvars))] if select else []
  best, since_best, i = qvars[TRAINABLE_COLLECTION], 0, 0  # best: unreplicated
  for i, (x, _, idx) in enumerate(tqdm(stream, total=total, desc=f"FAT {tag}", leave=False), 1):
    thresholds, opt_state, m = step(thresholds, opt_state, frozen, parallel.shard_batch(x, mesh),
                                    parallel.shard_batch(teacher[idx], mesh))
    skipped = skipped + (~m["finite"]).astype(jnp.int32)
    scoring = select and (i % select_every == 0 or i == total)
    if i % log_every == 0 or i == total or scoring:
      losses.append((i, float(m["loss"])))
      writer.write_scalars(i, {f"{tag}/fat_loss": losses[-1][1]})
    if i % steps_per_epoch == 0:
      nonfinite += check_finite_epoch(int(skipped), steps_per_epoch, f"FAT {tag}",
                                      i // steps_per_epoch - 1, "config.fat.learning_rate")
      skipped = jnp.zeros((), jnp.int32)
    if scoring:
      current = parallel.unreplicate(thresholds)
      scores.append((i, score({**qvars, TRAINABLE_COLLECTION: current})))
      improved = scores[-1][1] < min(l for _, l in scores[:-1])
      best, since_best = (current, 0) if improved else (best, since_best + 1)
      if cfg.patience and since_best >= cfg.patience:
        break
  jax.block_until_ready(thresholds)
  nonfinite += int(skipped)  # steps of an epoch cut short by early stopping
  stats = {"train_seconds": time.time() - t0, "train_images": n,
           "epochs": round(i / steps_per_epoch, 2), "steps": i, "nonfinite_steps": nonfinite}
  if select:
    stats["calibration_loss_by_step"] = scores  # (step, loss); step 0: before training
    stats["kept_step"] = min(scores, key=lambda p: p[1])[0]
  trained = best if select else parallel.unreplicate(thresholds)
  return {**qvars, TRAINABLE_COLLECTION: trained}, losses, stats


def train_qat(qmodel, qvars, train, cfg, seed, writer, tag, log_every):
  """Full-QAT baseline: params and thresholds, labels, cross-entropy, Adam."""
  tx, step = qat_update(qmodel, cfg.learning_rate)
  mesh = parallel.data_mesh()
  trainable = {"params": qvars["params"], TRAINABLE_COLLECTION: qvars[TRAINABLE_COLLECTION]}
  frozen = {ACT_COLLECTION: qvars[ACT_COLLECTION]}
  trainable, frozen = parallel.replicate((trainable, frozen), mesh)
  opt_state = parallel.replicate(tx.init(trainable), mesh)
  t0, losses, nonfinite = time.time(), [], 0
  steps_per_epoch = data.num_batches(len(train), cfg.batch_size, True)
  total = steps_per_epoch * cfg.epochs
  stream = train.batches(cfg.batch_size, seed=seed, epochs=cfg.epochs, drop_remainder=True)
  skipped = jnp.zeros((), jnp.int32)
  for i, (x, y) in enumerate(tqdm(stream, total=total, desc=f"QAT {tag}", leave=False), 1):
    trainable, opt_state, m = step(trainable, opt_state, frozen, parallel.shard_batch(x, mesh),
                                   parallel.shard_batch(y, mesh))
    skipped = skipped + (~m["finite"]).astype(jnp.int32)
    if i % log_every == 0:
      losses.append((i, float(m["loss"])))
      writer.write_scalars(i, {f"{tag}/qat_loss": losses[-1][1]})
    if i % steps_per_epoch == 0:
      nonfinite += check_finite_epoch(int(skipped), steps_per_epoch, f"QAT {tag}",
                                      i // steps_per_epoch - 1, "config.qat.learning_rate")
      skipped = jnp.zeros((), jnp.int32)
  jax.block_until_ready(trainable)
  stats = {"train_seconds": time.time() - t0, "train_images": len(train), "epochs": cfg.epochs,
           "steps": total, "nonfinite_steps": nonfinite}
  return {**qvars, **parallel.unreplicate(trainable)}, losses, stats


def calibration_images(calib: data.Split, batch_size: int) -> dict:
  """Keyword arguments ``batches`` (a fresh generator) and ``num_batches`` for
  one pass over the calibration images."""
  return {"batches": (x for x, _ in calib.batches(batch_size)),
          "num_batches": data.num_batches(len(calib), batch_size)}


def range_finder(params, calib: data.Split, config):
  """``ranges(qmodel, method)``: activation ranges on the calibration images,
  computed once per method for all settings that quantize the same activations."""
  cache = {}

  def ranges(qmodel, method):
    key = (method, calibrate.observed_key(qmodel.mode.rules))
    if key not in cache:
      cache[key] = calibrate.activation_ranges(
          qmodel, params, method=method, percentile=config.percentile,
          **calibration_images(calib, config.calibration_batch_size))
    return cache[key]
  return ranges


def run_setting(s, config, model, folded, splits, teacher, evaluator, writer, workdir,
                model_meta, act_ranges):
  """PTQ baselines, FAT and optionally QAT for one setting; returns its report entry.

  ``model_meta`` ({"model", "model_kwargs"}) goes into the setting's checkpoint,
  so that export can rebuild the quantized model from it alone. ``act_ranges``
  is a ``range_finder``."""
  unlabeled, calib, train = splits
  qmodel = calibrate.quantized(model, setting_rules(s, config.fat))
  apply_q = jax.jit(qmodel.apply)
  predict_q = evaluate.make_predict(qmodel.apply)
  qvars = calibrate.init_quant_variables(qmodel, folded["params"],
                                         next(calib.batches(1))[0])
  candidates = {"ptq_minmax": calibrate.with_ranges(qvars, act_ranges(qmodel, "minmax"))}
  if "percentile" in config.ptq_methods:
    candidates["ptq_percentile"] = calibrate.with_ranges(qvars, act_ranges(qmodel, "percentile"))
  if "mse" in config.ptq_methods:
    candidates["ptq_mse"] = calibrate.mse_search(
        qmodel, candidates["ptq_minmax"],
        **calibration_images(calib, config.calibration_batch_size))
  entry = {k: s[k] for k in ("name", "weight_bits", "act_bits", "per_channel", "weight_kind",
                             "act_kind")}
  entry["methods"], preds = {}, {}
  for name, v in candidates.items():
    entry["methods"][name], preds[name] = evaluator(predict_q, v, f"{s.name} {name}")
  others = [k for k in candidates if k != "ptq_minmax"] or ["ptq_minmax"]
  entry["best_ptq"] = max(others, key=lambda k: entry["methods"][k]["top1_pct"])
  # FAT starts from the PTQ variant with the lowest distillation loss on the
  # unlabeled calibration images (no labels, no test data).
  cal_teacher = teacher[:len(calib)]
  def distill(v):
    q = logits_of(apply_q, v, calib, config.calibration_batch_size)
    return float(methods.distillation_loss(q, cal_teacher, config.fat.loss))
  init = min(candidates, key=lambda k: distill(candidates[k]))
  fat_vars, losses, stats = train_thresholds(qmodel, candidates[init], unlabeled, teacher,
                                             config.fat, config.seed, writer, s.name,
                                             config.log_every, score=distill)
  fat_metrics, preds["fat"] = evaluator(predict_q, fat_vars, f"{s.name} fat")
  entry["methods"]["fat"] = {**fat_metrics, **stats, "init": init}
  curves = {"fat": losses}
  if config.qat.enabled:
    qat_vars, qlosses, qstats = train_qat(qmodel, candidates["ptq_minmax"], train, config.qat,
                                          config.seed, writer, s.name, config.log_every)
    qat_metrics, preds["qat"] = evaluator(predict_q, qat_vars, f"{s.name} qat")
    entry["methods"]["qat"] = {**qat_metrics, **qstats}
    curves["qat"] = qlosses
  for name in (k for k in preds if k != "fat"):
    # Is FAT's top-1 difference from this method more than chance? (paired, exact)
    fat_only, method_only, p = evaluate.mcnemar(preds["fat"], preds[name],
                                                 evaluator.test.labels)
    entry["methods"][name]["vs_fat"] = {"fat_only_correct": fat_only,
                                        "method_only_correct": method_only, "p_value": p}
  checkpoints.save(os.path.join(workdir, "checkpoints", s.name), fat_vars,
                   {"setting": entry["name"], "config": s.to_dict(),
                    "fat": config.fat.to_dict(), **model_meta,
                    "dataset": config.dataset, "data_dir": config.data_dir,
                    "preprocess": config.preprocess, "image_size": config.image_size,
                    "fake_quant_top1_pct": entry["methods"]["fat"]["top1_pct"],
                    "eval_examples": len(evaluator.test)})
  return entry, fat_vars, curves


def load_float(config: ml_collections.ConfigDict) -> tuple[str, dict, dict]:
  """(model name, model kwargs, float variables): a pretrained file or our checkpoint."""
  src = config.pretrained
  if src.format:
    return pretrained.load(src.format, src.path, src.arch)
  variables, meta = checkpoints.load(config.model_checkpoint)
  checkpoints.require(meta, ("model", "model_kwargs"), config.model_checkpoint,
                      "point config.model_checkpoint at a float checkpoint of the float job")
  return meta["model"], meta["model_kwargs"], variables


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_checks.validate(config)
  name, model_kwargs, float_vars = load_float(config)
  model = models.create(name, **model_kwargs)
  load = lambda split: data.load(config.dataset, split, config.data_dir or None,
                                 preprocess=config.preprocess, image_size=config.image_size,
                                 manual_dir=config.manual_dir or None)
  train, test = load("train"), load("test")
  if config.eval_examples:
    test = test.head(config.eval_examples)
  unlabeled = train.sample(config.fat.train_fraction, config.seed)
  calib = unlabeled.head(config.calibration_images)
  if len(calib) == 0:
    raise ValueError("calibration set is empty: raise calibration_images or fat.train_fraction.")
  qat_train = train.sample(config.qat.train_fraction, config.seed) if config.qat.enabled else None
  if qat_train is not None and len(qat_train) < config.qat.batch_size:
    raise ValueError(f"config.qat.batch_size {config.qat.batch_size} exceeds the "
                     f"{len(qat_train)} QAT train images; lower it or raise "
                     "config.qat.train_fraction.")
  config_checks.ensure_writable(workdir)
  with run_dir.staged(workdir) as stage:
    return _run_settings(config, stage, (name, model_kwargs, model, float_vars),
                         (unlabeled, calib, qat_train, test))


def _run_settings(config, workdir: str, float_model, splits) -> dict:
  """Every setting of ``config`` on the loaded float model and data; writes the
  outputs into ``workdir`` (the staging folder of ``run_dir.staged``)."""
  name, model_kwargs, model, float_vars = float_model
  unlabeled, calib, qat_train, test = splits
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  folded = fold.fold_variables(float_vars, model.bn_eps)
  fmodel = calibrate.quantized(model, (), stage="folded")
  evaluator = Evaluator(test, config.eval_batch_size)
  fp32, evaluator.reference = evaluator(evaluate.make_predict(fmodel.apply), folded, "fp32")
  teacher = logits_of(jax.jit(fmodel.apply), folded, unlabeled, config.eval_batch_size)
  out = {"model": name, "width": model_kwargs["width"],
         "dataset": config.dataset, "eval_examples": len(test), "fp32": fp32,
         "calibration_images": len(calib), "seed": config.seed, "settings": []}
  if "paper" in config:
    out["paper"] = config.paper.to_dict()
  thresholds, curves = {}, {}
  act_ranges = range_finder(folded["params"], calib, config)
  for s in config.settings:
    entry, fat_vars, c = run_setting(s, config, model, folded, (unlabeled, calib, qat_train),
                                     teacher, evaluator, writer, workdir,
                                     {"model": name, "model_kwargs": model_kwargs}, act_ranges)
    out["settings"].append(entry)
    thresholds[s.name] = fat_vars[TRAINABLE_COLLECTION]
    curves.update({f"{s.name} {k}": [l for _, l in v] for k, v in c.items()})
  writer.close()
  report.validate_report(out)
  report.plot_thresholds(os.path.join(workdir, "thresholds.png"), thresholds)
  report.plot_weight_ranges(os.path.join(workdir, "weight_ranges.png"), folded["params"])
  report.plot_losses(os.path.join(workdir, "loss.png"), curves)
  report.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  report.write_report(workdir, out)
  return out

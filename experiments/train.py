"""The FAT main job: float -> fold -> calibrate -> methods -> evaluate -> report.

``train_and_evaluate(config, workdir)`` runs every method of
``config.methods`` (``fat.methods``) on every setting of ``config.settings``
and writes to ``workdir``: report.json, report.md, config.json, PNG plots,
TensorBoard event files and, per setting, an orbax checkpoint of FAT's
quantized variables (``checkpoints/<setting>``) and every method's eval-split
argmax (``predictions/<setting>.npz``).

The job holds the workdir's lock and resumes after a kill
(``experiments/run_dir.py``): a setting finished before the kill is read
back, not rerun, and a trained method resumes from its last step
checkpoint (every ``config.checkpoint_every`` steps). ``fresh=True``
discards that progress.

Its stages are functions a benchmark reuses to run a method exactly as the
job does (``benchmarks/adaround_onnx.py``): ``load_inputs`` (config, float
model, data), ``shared_float`` (what the settings share) and
``setting_context`` (the ``fat.methods.Context`` of one setting).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from fat import (atomic, checkpoints, data, equalize, evaluate, fold, methods, models, pipeline,
                 plots, report, steps)
from fat.calibrate import SharedRanges, quantized
from fat.layers import TRAINABLE_COLLECTION
from fat.models import pretrained
from experiments import config_checks, run_dir


def load_float(config: ml_collections.ConfigDict) -> tuple[str, dict, dict, str]:
  """(model name, model kwargs, float variables, source fingerprint): a pretrained
  file or our checkpoint, its tensors checked against the model's shapes."""
  src = config.pretrained
  if src.format:
    name, kwargs, variables = pretrained.load(src.format, src.path, src.arch)
    return name, kwargs, variables, _file_stamp(src.path)
  path = config.model_checkpoint
  variables, meta = checkpoints.load(path)
  checkpoints.require(meta, ("model", "model_kwargs"), path,
                      "point config.model_checkpoint at a float checkpoint of the float job")
  return meta["model"], meta["model_kwargs"], variables, checkpoints.fingerprint(meta)


def _file_stamp(path: str) -> str:
  """Names, sizes and modification times of the files of a pretrained source (a
  file, a folder, or a TF checkpoint prefix): a resumed run must read the same ones."""
  files = ([path] if os.path.isfile(path) else
           sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
           if os.path.isdir(path) else sorted(glob.glob(glob.escape(path) + "*")))
  return ";".join(f"{os.path.abspath(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}"
                  for f in files)


def _check_shapes(model, variables, sample, path: str) -> None:
  """The float tensors fit ``model`` on images shaped like ``sample``."""
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample[:1])
  checkpoints.check_shapes(expected, variables, path)


def effective_config(config: ml_collections.ConfigDict, unlabeled_images: int):
  """``config`` with what the data forces: a FAT batch larger than the
  unlabeled images is clamped to them, with a warning."""
  if config.fat.batch_size <= unlabeled_images:
    return config
  logging.warning("config.fat.batch_size %d is more than the %d unlabeled images; using %d "
                  "(raise config.fat.train_fraction for larger batches).",
                  config.fat.batch_size, unlabeled_images, unlabeled_images)
  config = config.copy_and_resolve_references()
  config.fat.batch_size = unlabeled_images
  return config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
  """A job's checked config (``effective_config``), float model and data splits
  (``unlabeled``, ``calib``, ``train``, ``test``); ``source`` fingerprints the
  float file for resuming."""

  config: ml_collections.ConfigDict
  name: str
  model_kwargs: dict
  float_vars: dict
  source: str
  splits: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shared:
  """What every setting of a job shares (``shared_float``)."""

  model: object
  folded: dict
  qfolded: dict
  fmodel: object
  teacher: np.ndarray
  ranges: SharedRanges


def load_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """``config`` checked, its float model and data loaded and checked against
  each other, nothing written: what the main job, and a benchmark that runs
  its methods, start from."""
  config_checks.validate(config)
  name, model_kwargs, float_vars, source = load_float(config)
  load = lambda split: data.load(config.dataset, split, config.data_dir or None,
                                 preprocess=config.preprocess, image_size=config.image_size,
                                 manual_dir=config.manual_dir or None)
  train, test = load("train"), load("test")
  if config.eval_examples:
    test = test.head(config.eval_examples)
  unlabeled, calib = data.distillation_splits(
      train, train_fraction=config.fat.train_fraction,
      calibration_images=config.calibration_images, seed=config.seed)
  if len(calib) == 0:
    raise ValueError("calibration set is empty: raise calibration_images or fat.train_fraction.")
  _check_shapes(models.create(name, **model_kwargs), float_vars, next(calib.batches(1))[0],
                config.pretrained.path or config.model_checkpoint)
  config = effective_config(config, len(unlabeled))
  for m in config.methods:
    methods.get(m).check_data(config, train)
  return Inputs(config=config, name=name, model_kwargs=model_kwargs, float_vars=float_vars,
                source=source, splits={"unlabeled": unlabeled, "calib": calib, "train": train,
                                       "test": test})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       fresh: bool = False) -> dict:
  inputs = load_inputs(config)
  key = {"config": json.loads(inputs.config.to_json_best_effort()), "float": inputs.source}
  with run_dir.job(workdir, key, fresh) as stage:
    if stage.resumed:
      logging.warning("resuming the unfinished run in %s (pass --fresh to start over)", workdir)
    return _run_settings(inputs, stage)


def shared_float(config: ml_collections.ConfigDict, inputs: Inputs) -> Shared:
  """The float side every setting shares: folded (and, with ``config.equalize``,
  rescaled) params, the float model, its logits on the unlabeled images and
  the activation ranges of the calibration images."""
  splits = inputs.splits
  model = models.create(inputs.name, **inputs.model_kwargs)
  folded = fold.fold_variables(inputs.float_vars, model.bn_eps)
  # Mutual rescaling (config.equalize) feeds the quantized models only; the fp32
  # row and the teacher keep the folded params (exact on the calibration images,
  # not on every image across ReLU6: fat/equalize.py).
  qfolded = (equalize.equalize_images(model, folded, splits["calib"],
                                      batch_size=config.calibration_batch_size,
                                      target=config.get("equalize_target", "weights"))
             if config.get("equalize", False) else folded)
  fmodel = quantized(model, (), stage="folded")
  teacher = evaluate.logits(jax.jit(fmodel.apply), folded, splits["unlabeled"],
                            config.eval_batch_size)
  ranges = SharedRanges(qfolded["params"], splits["calib"],
                        batch_size=config.calibration_batch_size, percentile=config.percentile)
  return Shared(model=model, folded=folded, qfolded=qfolded, fmodel=fmodel, teacher=teacher,
                ranges=ranges)


def _run_settings(inputs: Inputs, stage: run_dir.Stage) -> dict:
  """Every setting of ``inputs.config`` on its float model and data; writes the
  outputs into ``stage.path``, reading back the settings ``stage`` has as done."""
  workdir, config, splits = stage.path, inputs.config, inputs.splits
  name, model_kwargs = inputs.name, inputs.model_kwargs
  # TensorBoard's writer imports TensorFlow (3 s): here, not when the flags are checked.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  shared = shared_float(config, inputs)
  evaluator = evaluate.Evaluator(splits["test"], config.eval_batch_size)
  fp32, evaluator.reference = evaluator(evaluate.make_predict(shared.fmodel.apply),
                                        shared.folded, "fp32")
  out = {"model": name, "width": model_kwargs["width"], "dataset": config.dataset,
         "eval_examples": len(splits["test"]), "fp32": fp32,
         "calibration_images": len(splits["calib"]), "seed": config.seed, "settings": []}
  if "paper" in config:
    out["paper"] = config.paper.to_dict()
  meta = {"model": name, "model_kwargs": model_kwargs, "dataset": config.dataset,
          "data_dir": config.data_dir, "preprocess": config.preprocess,
          "image_size": config.image_size, "fat": config.fat.to_dict()}
  thresholds, curves = {}, {}
  for s in tqdm(config.settings, desc="settings", unit="setting", position=0):
    path = os.path.join(workdir, "checkpoints", s.name)
    done = stage.done(s.name)
    if done is not None:  # finished before an interruption
      entry, losses, variables = done["entry"], done["losses"], checkpoints.load(path)[0]
    else:
      entry, variables, losses, preds = run_setting(s, config, shared, splits, evaluator,
                                                    writer, stage.steps_dir(s.name))
      write_predictions(os.path.join(workdir, "predictions", f"{s.name}.npz"), preds,
                        evaluator)
      checkpoints.save(path, variables,
                       {**meta, "setting": s.name, "config": s.to_dict(),
                        "fake_quant_top1_pct": entry["methods"]["fat"]["top1_pct"],
                        "eval_examples": len(splits["test"])})
      stage.finish(s.name, {"entry": entry, "losses": losses})
    out["settings"].append(entry)
    thresholds[s.name] = variables[TRAINABLE_COLLECTION]
    curves.update({f"{s.name} {m}": [l for _, l in c] for m, c in losses.items() if c})
  writer.close()
  report.validate_report(out)
  plots.plot_thresholds(os.path.join(workdir, "thresholds.png"), thresholds)
  plots.plot_weight_ranges(os.path.join(workdir, "weight_ranges.png"),
                           shared.qfolded["params"])
  plots.plot_losses(os.path.join(workdir, "loss.png"), curves)
  atomic.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  report.write_report(workdir, out)
  return out


def setting_context(s, config, shared: Shared, splits: dict, writer=None,
                    checkpoint_dir=None) -> methods.Context:
  """The ``fat.methods.Context`` of setting ``s`` (a ``config.settings`` entry):
  what every method run on it sees."""
  qmodel, qvars = pipeline.quantize(shared.model, shared.qfolded,
                                    pipeline.config_rules(s, config.fat),
                                    next(splits["calib"].batches(1))[0])
  apply_q = jax.jit(qmodel.apply)
  # The distillation loss on the calibration images (training images; no labels).
  cal_teacher = shared.teacher[:len(splits["calib"])]
  distill = lambda v: float(steps.distillation_loss(
      evaluate.logits(apply_q, v, splits["calib"], config.calibration_batch_size),
      cal_teacher, config.fat.loss))
  return methods.Context(config=config, setting=pipeline.Setting(**s.to_dict()), qmodel=qmodel,
                         variables=qvars, calib=splits["calib"], unlabeled=splits["unlabeled"],
                         train=splits["train"], teacher=shared.teacher,
                         act_ranges=lambda statistic: shared.ranges(qmodel, statistic),
                         distill=distill, results={}, writer=writer,
                         checkpoint_dir=checkpoint_dir)


def run_setting(s, config, shared: Shared, splits: dict, evaluator, writer,
                checkpoint_dir=None):
  """Every selected method on setting ``s``; returns its report entry, FAT's
  variables, the loss curves and the eval-split argmax by method. Trained methods keep step
  checkpoints under ``checkpoint_dir`` (None: none)."""
  ctx = setting_context(s, config, shared, splits, writer, checkpoint_dir)
  predict_q = evaluate.make_predict(ctx.qmodel.apply)
  entry = {k: s[k] for k in ("name", "weight_bits", "act_bits", "per_channel", "weight_kind",
                             "act_kind")}
  entry["methods"], preds, losses = {}, {}, {}
  for name in methods.ordered(config.methods):
    t0 = time.time()
    result = methods.get(name).run(ctx)
    cost = methods.cost(ctx, result, time.time() - t0)
    ctx.results[name] = result.variables
    metrics, preds[name] = evaluator(predict_q, result.variables, f"{s.name} {name}")
    entry["methods"][name] = {**metrics, **cost, **result.stats}
    losses[name] = result.losses
  ptq = methods.of_kind(entry["methods"], methods.PTQ)
  others = [m for m in ptq if m != "ptq_minmax"] or ["ptq_minmax"]
  entry["best_ptq"] = max(others, key=lambda m: entry["methods"][m]["top1_pct"])
  for name in (m for m in preds if m != "fat"):
    # Is FAT's top-1 difference from this method more than chance? (paired, exact)
    fat_only, method_only, p = evaluate.mcnemar(preds["fat"], preds[name], evaluator.split.labels)
    entry["methods"][name]["vs_fat"] = {"fat_only_correct": fat_only,
                                        "method_only_correct": method_only, "p_value": p}
  return entry, ctx.results["fat"], losses, preds


def write_predictions(path: str, preds: dict, evaluator) -> None:
  """``path`` (.npz): each method's argmax on the eval split, with the labels and the
  float model's argmax (``labels``, ``fp32``), for paired tests between any two
  methods (``fat.evaluate.mcnemar``; report.json holds each against FAT only)."""
  arrays = {"labels": evaluator.split.labels, "fp32": evaluator.reference,
            **{f"method/{m}": p for m, p in preds.items()}}

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the name
      np.savez(f, **{k: np.asarray(v, np.int16) for k, v in arrays.items()})

  atomic.write_file(path, write)

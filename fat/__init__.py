"""fat: trainable quantization thresholds (FAT) for mobile CNNs in JAX/Flax.

The data path, one module per arrow:

  float params (models, checkpoints) -> fold BN (fold) -> optional mutual
  rescaling (equalize) -> quantized model and calibration (pipeline, calibrate;
  layers, quant, rules) -> methods: PTQ with optional bias correction
  (bias_correction), FAT, QAT (methods, steps, loop, schedules) -> evaluation
  (evaluate) -> report (report, plots) -> export (graph, export_onnx, integer).

The names a user calls are re-exported here (optax style)::

    import fat
    rules = fat.setting_rules(fat.Setting(name="w4a8", weight_bits=4, act_bits=8,
                                          per_channel=True))
    p = fat.prepare(model, float_vars, rules, calib_images)
"""

from fat import (atomic, bias_correction, calibrate, checkpoints, data, depthwise, equalize,
                 errors, evaluate, fold, layers, loop, methods, models, mse, pipeline, plots,
                 quant, report, rules, schedules, steps, variables)
from fat.bias_correction import correct_biases
from fat.equalize import channel_maxima, equalize_images
from fat.evaluate import agreement_pct, logits, make_predict, mcnemar, predict, top1_pct
from fat.fold import fold_variables
from fat.loop import LoopSpec, train
from fat.pipeline import Prepared, Setting, config_rules, prepare, quantize, setting_rules
from fat.quant import QuantParams, QuantSpec, fake_quant
from fat.rules import QuantRule, uniform_rules
from fat.schedules import fat_optimizer
from fat.steps import distillation_loss, make_fat_step, make_qat_step
from fat.variables import FAT_TRAINABLE, QAT_TRAINABLE, Partition, partition

__all__ = [
    # modules
    "atomic", "bias_correction", "calibrate", "checkpoints", "data", "depthwise", "equalize",
    "errors", "evaluate", "fold", "layers", "loop", "methods", "models", "mse", "pipeline",
    "plots", "quant", "report", "rules", "schedules", "steps", "variables",
    # quantizers and rules
    "QuantParams", "QuantSpec", "fake_quant", "QuantRule", "uniform_rules",
    # the pipeline
    "Prepared", "Setting", "config_rules", "fold_variables", "prepare", "quantize",
    "setting_rules",
    # mutual rescaling and bias correction
    "channel_maxima", "correct_biases", "equalize_images",
    # training
    "FAT_TRAINABLE", "QAT_TRAINABLE", "LoopSpec", "Partition", "distillation_loss",
    "fat_optimizer", "make_fat_step", "make_qat_step", "partition", "train",
    # evaluation
    "agreement_pct", "logits", "make_predict", "mcnemar", "predict", "top1_pct",
]

"""fat: trainable quantization thresholds (FAT) for mobile CNNs in JAX/Flax.

The data path, one module per arrow:
float params (models, checkpoints) -> fold BN (fold) -> calibrate (calibrate) ->
quantized apply (layers, quant, rules) -> threshold training (methods, schedules) ->
evaluation (evaluate) -> report (report).
"""

from fat import (calibrate, data, depthwise, evaluate, fold, layers, methods, models, quant,
                 rules, schedules)

__all__ = ["calibrate", "data", "depthwise", "evaluate", "fold", "layers", "methods",
           "models", "quant", "rules", "schedules"]

"""Quantization methods, each registered once in ``fat.methods.registry``.

Built in: ``ptq_minmax``, ``ptq_percentile``, ``ptq_mse`` (``ptq.py``), ``fat``
(``fat_training.py``), ``qat`` (``qat.py``), ``ptq_adaround`` and ``fat_adaround``
(``adaround.py``) and ``lsq`` (``lsq.py``). Every module of this package is
imported here, so a method added as a new file in ``fat/methods/`` registers
itself; one defined elsewhere registers when its module is imported.
"""

import importlib
import pkgutil

from fat.methods.registry import (PTQ, REQUIRED, TRAINED, Context, Method, Result, batches_fit,
                                  cost, get, names, of_kind, ordered, register, unregister,
                                  validate)

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "registry":
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PTQ", "REQUIRED", "TRAINED", "Context", "Method", "Result", "batches_fit", "cost",
           "get", "names", "of_kind", "ordered", "register", "unregister", "validate"]

"""The one exception family for bad user input: its message names the fix.

Defined here, importing nothing from the library, so that any module can raise
them without import cycles; ``fat.checkpoints.CheckpointError`` and
``fat.data.DataError`` are the same classes under their older names.
"""


class CheckpointError(ValueError):
  """A missing or unreadable checkpoint."""


class DataError(ValueError):
  """Data that is missing or malformed; the message says how to fix it."""


class ExportError(ValueError):
  """The quantized model has something the integer graph cannot represent, or an
  exported model is missing or unreadable."""


# What entry points report as ``error: <message>`` with exit status 2 (experiments/cli.py).
# ValueError covers bad config values, specs and rules raised across the library
# (and the three classes above, listed for the reader).
UserError = (ValueError, FloatingPointError, CheckpointError, DataError, ExportError, OSError)

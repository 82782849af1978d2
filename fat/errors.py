"""The one exception family for bad user input: its message names the fix."""

from fat.checkpoints import CheckpointError
from fat.data import DataError

# ValueError covers bad config values, specs and rules raised across the library.
UserError = (ValueError, FloatingPointError, CheckpointError, DataError, OSError)

"""What every entry point does with bad input: one message on stderr, exit status 2."""

from __future__ import annotations

import contextlib
import sys

from absl import logging

from fat.errors import UserError


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a ``fat.errors.UserError`` raised in the block into ``error: <message>`` and exit 2."""
  try:
    yield
  except UserError as e:
    logging.error("%s", e)
    # The family includes ValueError, so a library bug can land here too:
    # --verbosity=1 shows where it was raised.
    logging.debug("raised at:", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

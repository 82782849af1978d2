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
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

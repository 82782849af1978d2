"""What every entry point does with bad input and with the console.

Bad input gets one line on stderr, ``error: <what is wrong and how to fix it>``,
and exit status 2, before anything is written:

- ``run(main)`` replaces ``absl.app.run(main)``. It parses the flags itself
  (``parse_flags``): an unknown flag, a bad value, a mistyped config field
  (``--config.fat.learnig_rate``, answered with the valid fields at that level),
  an index out of range (``--config.settings[5].weight_bits``) or a config
  argument its ``get_config`` rejects (``--config=configs/default.py:smok``).
  ``--help`` and ``--helpfull`` print the flags and exit 0.
- ``flag_errors`` does the same around a ``config_flags.DEFINE_config_file``
  with a default: ml_collections parses the default config and its
  ``--config.*`` overrides when the flag is defined, at import.
- ``exit_on_user_error`` turns a ``fat.errors.UserError`` raised in ``main``
  into the same line.

The console shows warnings, errors and progress bars only: absl (and so orbax
and clu) INFO lines and TensorFlow's native INFO and WARNING lines are hidden
(``quiet_console``; TF_CPP_MIN_LOG_LEVEL=2, set when this module is imported;
``quiet_native_import`` around the imports that load TensorFlow) unless the
command line sets ``--verbosity`` (``-v``): ``--verbosity=0`` brings INFO back,
``--verbosity=1`` also prints where an error was raised.
"""

from __future__ import annotations

import _thread
import contextlib
import difflib
import importlib.util
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging
from ml_collections import config_dict
from ml_collections.config_flags import config_path

from experiments import huge_pages
from fat.errors import UserError

FLAGS = flags.FLAGS
CONFIG_FLAG = "config"
# Python loggers quieted to WARNING by default (absl's own follows --verbosity).
QUIET_LOGGERS = ("absl", "orbax", "tensorflow")
_LOAD_NOISE = re.compile(r"All log messages before absl::InitializeLog\(\)|"
                         r"\] oneDNN custom operations are on")
_VERBOSITY_ARG = re.compile(r"^--?(?:verbosity|v)(?:=(.*))?$")
_OVERRIDE_ARG = re.compile(rf"^--?(?:no)?{CONFIG_FLAG}\.([^=]+)")
_CONFIG_ARG = re.compile(rf"^--?{CONFIG_FLAG}(?:=(.*))?$")
# Raised while absl and ml_collections parse the flags and load the config file.
_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, IndexError, ValueError, TypeError,
                OSError)


def fail(message: str) -> NoReturn:
  """Prints ``error: <message>`` (one line) on stderr and exits with status 2."""
  print(f"error: {_one_line(message)}", file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def exit_on_user_error():
  """Turns a ``fat.errors.UserError`` raised in the block into ``error: <message>`` and exit 2."""
  try:
    yield
  except UserError as e:
    # The family includes ValueError, so a library bug can land here too:
    # --verbosity=1 shows where it was raised.
    logging.debug("raised at:", exc_info=True)
    fail(str(e))


INTERRUPTED = 130  # the shell's status for a job stopped by Ctrl-C (128 + SIGINT)


def _redeliver_interrupts(previous: Callable[[Any], Any]) -> Callable[[Any], None]:
  """A ``sys.unraisablehook`` that delivers a dropped KeyboardInterrupt again.

  Python runs a signal's handler in the main thread between two bytecodes. When
  those are in a garbage-collector callback or a ``__del__`` (JAX registers
  one, ``_xla_gc_callback``), the KeyboardInterrupt the handler raises cannot
  propagate: Python prints "Exception ignored" and the job goes on. This hook
  interrupts the main thread again through a Python handler (SIGINT's, or
  SIGTERM's while a job holds its workdir) a moment later, from another thread,
  once the callback has returned; one dropped again comes back here. Every
  other unraisable exception goes to ``previous``."""
  def hook(unraisable):
    if unraisable.exc_type is KeyboardInterrupt:
      for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):
          threading.Timer(0.05, _thread.interrupt_main, (signum,)).start()
          return
    previous(unraisable)
  return hook


def run(main: Callable[[list[str]], Any], interrupted: str = "interrupted.") -> None:
  """``absl.app.run(main)`` with one-line flag errors and a quiet console.

  Ctrl-C (or SIGTERM, in jobs that hold a workdir) stops the job with one line
  (``interrupted``) and exit status 130, after the job's own cleanup, also when
  the signal lands in a garbage-collector callback (``_redeliver_interrupts``).
  The process then ends without the interpreter's teardown, which could crash
  in a compile that XLA was still running on another thread.

  First it starts the process again with transparent huge pages for XLA:CPU's
  per-call buffers, where the system has them (``experiments.huge_pages``).
  """
  huge_pages.reexec()
  sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    print(interrupted, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)  # pylint: disable=protected-access


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with bad flags as one ``error:`` line (exit 2) and
  ``--help``/``--helpfull`` exiting 0; then quiets the console (``quiet_console``)."""
  argv = list(argv)
  try:
    with flag_errors(argv):
      rest = FLAGS(argv)
      _check_config_loaded()
  except SystemExit as e:
    # absl's help flags print the usage and exit 1 before main; a help request succeeded.
    sys.exit(0 if e.code == 1 else e.code)
  if len(rest) > 1:
    fail(f"unexpected argument(s) {' '.join(rest[1:])!r}: flags take the form --name=value "
         "(--helpfull lists them).")
  quiet_console()
  return rest


@contextlib.contextmanager
def flag_errors(argv: Sequence[str] | None = None, default_config: str | None = None):
  """Turns an error raised in the block while parsing flags or loading the config into
  ``error: <message>`` and exit 2.

  ``default_config``: the config flag's default, for a block that defines the flag
  (diagnosing a bad ``--config.*`` override needs the config it applies to).
  """
  argv = list(sys.argv if argv is None else argv)
  try:
    yield
  except _FLAG_ERRORS as e:
    verbosity = _argv_verbosity(argv)
    if verbosity is not None and verbosity >= 1:
      traceback.print_exc()
    fail(describe_flag_error(e, argv, default_config))


def describe_flag_error(error: BaseException, argv: Sequence[str],
                        default_config: str | None = None) -> str:
  """One line on what is wrong with the command line, naming the flag and the fix."""
  value = _config_value(argv, default_config)
  raised = _config_file_error(error)
  if raised is not None:  # get_config (or the file) raised while loading
    return f"--{CONFIG_FLAG}={value}: {_one_line(str(raised)) or type(raised).__name__}"
  overrides = [m.group(1) for m in map(_OVERRIDE_ARG.match, argv[1:]) if m]
  if overrides and value is not None and not isinstance(error, flags.Error):
    config = _load_config(value)
    if config is None:
      return _unloadable(value)
    for path in overrides:
      problem = override_problem(config, path)
      if problem:
        return f"--{CONFIG_FLAG}.{path}: {problem}"
  if _is_unloadable(error) and value is not None:
    return _unloadable(value)
  message = _one_line(str(error)) if isinstance(error, flags.Error) else _one_line(
      f"{type(error).__name__}: {error}")
  missing = re.findall(r"Flag (--\w+) must have a value other than None", message)
  if missing:
    return f"missing required flag(s) {', '.join(missing)} (--help lists the flags)"
  if isinstance(error, flags.UnrecognizedFlagError):
    message += " (--helpfull lists the flags)"
  return message


def override_problem(config: Any, path: str) -> str | None:
  """What is wrong with the field path of ``--config.<path>=...`` in ``config``, or None."""
  try:
    parts = config_path.split(path)
  except ValueError:
    return f"cannot read {path!r} as a field path (e.g. fat.epochs or settings[0].weight_bits)"
  node, where = config, CONFIG_FLAG
  for part in parts:
    if isinstance(node, (list, tuple)):
      if not isinstance(part, int):
        return (f"{where} is a list of {len(node)}: index it as {where}[i], "
                f"i from 0 to {len(node) - 1}" if node else f"{where} is an empty list")
      if not node:
        return f"{where} is an empty list: it has no index {part}"
      if not -len(node) <= part < len(node):
        return (f"{where} has {len(node)} items: index {part} is out of range; "
                f"valid indices: 0 to {len(node) - 1}")
      node, where = node[part], f"{where}[{part}]"
    elif isinstance(node, (config_dict.ConfigDict, dict)):
      names = sorted(str(k) for k in node.keys())
      if part not in names:
        close = difflib.get_close_matches(str(part), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where} has no field {part!r}{hint}; valid fields: {', '.join(names)}"
      node, where = node[part], f"{where}.{part}"
    else:
      return f"{where} is a value ({node!r}), not a group of fields: it has no field {part!r}"
  return None


def quiet_console() -> None:
  """Unless the command line set --verbosity: warnings and errors only from absl
  (which orbax and clu log through) and the Python loggers in ``QUIET_LOGGERS``."""
  if not FLAGS["verbosity"].using_default_value:
    return
  logging.set_verbosity(logging.WARNING)
  for name in QUIET_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


@contextlib.contextmanager
def quiet_native_import():
  """Around an import that loads TensorFlow: drops from stderr the lines its native
  libraries print while they load, before TF_CPP_MIN_LOG_LEVEL applies (TensorFlow
  2.21: "oneDNN custom operations are on", twice, each after absl's "All log
  messages before absl::InitializeLog()" warning); the rest of stderr is kept. Does
  nothing when the command line sets --verbosity or TensorFlow is already loaded."""
  if _argv_verbosity(sys.argv) is not None or "tensorflow" in sys.modules:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(l for l in lines if not _LOAD_NOISE.search(l)))
      sys.stderr.flush()


def _quiet_native_logs(argv: Sequence[str]) -> None:
  """Hides TensorFlow's (and XLA's) native INFO and WARNING lines unless argv sets
  --verbosity. TensorFlow reads TF_CPP_MIN_LOG_LEVEL when it loads, which some entry
  points do at import, before their flags are parsed: so this runs when this module
  is imported, from argv, and leaves a value set in the environment alone."""
  if _argv_verbosity(argv) is None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _argv_verbosity(argv: Sequence[str]) -> int | None:
  """The --verbosity (-v) that argv sets (0 for a value that is not an integer), or None."""
  found = None
  for i, arg in enumerate(argv[1:], 1):
    m = _VERBOSITY_ARG.match(arg)
    if m:
      value = m.group(1) if m.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else "")
      try:
        found = int(value)
      except ValueError:
        found = 0
  return found


def _config_value(argv: Sequence[str], default: str | None) -> str | None:
  """The last --config value on argv (``--config=X`` or ``--config X``), else ``default``."""
  value = default
  for i, arg in enumerate(argv[1:], 1):
    m = _CONFIG_ARG.match(arg)
    if m:
      value = m.group(1) if m.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _load_config(value: str) -> Any:
  """``get_config(arg)`` of the file that ``--config=<file>[:arg]`` names, as
  ml_collections loads it, or None if that fails."""
  path, *arg = value.split(":", 1)
  try:
    spec = importlib.util.spec_from_file_location("_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*arg)
  except Exception:  # pylint: disable=broad-except  (the flag's own error is reported)
    return None
  return config if isinstance(config, (config_dict.ConfigDict, dict)) else None


def _check_config_loaded() -> None:
  """Raises the OSError of a config file that failed to load (ml_collections defers it
  to the config's first use, in main)."""
  if CONFIG_FLAG in FLAGS and FLAGS[CONFIG_FLAG].value is not None:
    FLAGS[CONFIG_FLAG].value.keys()  # pylint: disable=expression-not-assigned


def _config_file_error(error: BaseException) -> BaseException | None:
  """The exception ``get_config`` (or the config file) raised, if ``error`` wraps one:
  ml_collections re-raises it as 'Error whilst parsing config file' with a traceback
  in the message, and absl wraps that again."""
  seen = error
  while seen is not None:
    if str(seen).startswith("Error whilst parsing config file"):
      return seen.__context__ or seen
    seen = seen.__cause__ or seen.__context__
  return None


def _is_unloadable(error: BaseException) -> bool:
  return isinstance(error, OSError) and ("Failed loading config file" in str(error)
                                         or "earlier failure to load" in str(error))


def _unloadable(value: str) -> str:
  path = value.split(":", 1)[0]
  if not os.path.isfile(path):
    return (f"--{CONFIG_FLAG}={value}: no config file at {path!r} (a path relative to the "
            "working directory, e.g. configs/default.py)")
  return f"--{CONFIG_FLAG}={value}: cannot load {path!r} (--verbosity=1 shows why)"


def _one_line(message: str) -> str:
  return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


_quiet_native_logs(sys.argv)

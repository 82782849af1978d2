"""Runs entry points as ``python -m module args`` does, each in a fork of this
process, which imports the libraries they all share once, before any fork.

A bare ``python -m <entry point> --help`` spends about three quarters of its
time importing JAX, Flax and optax; the tests that run every entry point's
``--help`` or bad flags pay that once here instead of once per command.
Nothing here starts a JAX backend, so each child starts its own, as a fresh
process would.

stdin: a JSON list of ``[module, *args]``; stdout: a JSON list of
``{"returncode", "stdout", "stderr"}`` in the same order
(``conftest.run_parallel``). The children run at the same time.
"""

import atexit
import importlib
import json
import os
import runpy
import shutil
import sys
import tempfile
import traceback

# The imports every entry point makes; each child finds them loaded.
SHARED = ("absl.app", "absl.flags", "flax.linen", "jax", "ml_collections", "numpy", "optax")
for _name in SHARED:
  importlib.import_module(_name)


def _exit_code(code) -> int:
  """The exit status ``sys.exit(code)`` gives a Python process."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _child(module: str, args: list, out_path: str, err_path: str) -> None:
  """Runs ``module`` as ``__main__`` with ``args``, its output in the two files; never returns."""
  code = 1
  try:
    for fd, path in ((1, out_path), (2, err_path)):
      f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(f, fd)
      os.close(f)
    sys.argv = [module, *args]
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = _exit_code(e.code)
    except BaseException:  # as the interpreter does: the traceback, status 1
      traceback.print_exc()
      code = 1
    atexit._run_exitfuncs()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
  commands = json.load(sys.stdin)
  sys.path[0] = os.getcwd()  # as ``python -m`` has it: the working directory, not tests/
  # mkdtemp, not TemporaryDirectory: a child's exit functions would remove the latter.
  tmp = tempfile.mkdtemp()
  try:
    children = []
    for i, (module, *args) in enumerate(commands):
      out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
      for path in (out, err):
        open(path, "w").close()
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(module, args, out, err)
      children.append((pid, out, err))
    results = []
    for pid, out, err in children:
      _, status = os.waitpid(pid, 0)
      with open(out) as o, open(err) as e:
        results.append({"returncode": os.waitstatus_to_exitcode(status),
                        "stdout": o.read(), "stderr": e.read()})
  finally:
    shutil.rmtree(tmp)
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()

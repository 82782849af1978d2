"""Transparent huge pages for the large buffers XLA:CPU allocates at every call.

XLA's CPU client allocates each execution's temporary buffer with
``posix_memalign`` and frees it after the call: 320 MB for one W4A4 eval
batch of 500 images of the shipped MobileNet-v2, on an Eigen worker thread.
glibc serves a request that large with a fresh ``mmap`` (a thread's arena
cannot hold it) and unmaps it on ``free``, so every call faults in and zeroes
the whole buffer again, 4 KiB at a time: about 78,000 page faults per eval
batch and 144,000 per FAT step, which spent 22% and 43% of their CPU time in
the kernel.
glibc's ``glibc.malloc.hugetlb=1`` tunable advises transparent huge pages on
the memory it maps (2 MiB pages: 512 times fewer faults). Tunables are read
when the process starts, so ``reexec`` starts the entry point again with it
set; ``benchmarks.host_memory`` measures both side by side (docs/speed.md).

A ``GLIBC_TUNABLES`` that already names ``glibc.malloc.hugetlb`` is kept as
it is (``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` opts out), as is a process
that is not Linux with glibc 2.35 or later, or whose kernel has transparent
huge pages off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
  """Linux with glibc >= 2.35 (the first with the tunable) and transparent
  huge pages not switched off in the kernel."""
  libc, version = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc":
    return False
  try:
    if tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
      return False
    with open(THP_ENABLED, encoding="ascii") as f:
      return "[never]" not in f.read()
  except (OSError, ValueError):
    return False


def wanted(environ: Mapping[str, str]) -> bool:
  """Whether a process with ``environ`` should set the tunable: supported, and
  not already named in ``GLIBC_TUNABLES``."""
  return TUNABLE not in environ.get("GLIBC_TUNABLES", "") and supported()


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of ``environ`` whose ``GLIBC_TUNABLES`` also sets ``glibc.malloc.hugetlb=1``."""
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, f"{TUNABLE}=1"])}


def reexec() -> None:
  """Replaces this process by the same command line with the tunable set,
  when ``wanted``; otherwise returns. The new process sees the tunable, so
  it does not start again."""
  if wanted(os.environ):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_tunable(os.environ))

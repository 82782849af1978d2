"""experiments/huge_pages.py: entry points start again with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from experiments import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNABLE_ON = f"{huge_pages.TUNABLE}=1"


def test_with_tunable_keeps_other_tunables():
  env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  out = huge_pages.with_tunable(env)
  assert out["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE_ON}"
  assert out["PATH"] == "/bin" and env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
  assert huge_pages.with_tunable({})["GLIBC_TUNABLES"] == TUNABLE_ON


def test_a_tunable_already_named_is_kept(monkeypatch):
  monkeypatch.setattr(huge_pages, "supported", lambda: True)
  assert huge_pages.wanted({})
  assert huge_pages.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert not huge_pages.wanted({"GLIBC_TUNABLES": f"{huge_pages.TUNABLE}=0"})
  monkeypatch.setattr(huge_pages, "supported", lambda: False)
  assert not huge_pages.wanted({})


@pytest.mark.parametrize("libc, version, thp, expected", [
    ("glibc", "2.36", "always [madvise] never\n", True),
    ("glibc", "2.35", "[always] madvise never\n", True),
    ("glibc", "2.34", "always [madvise] never\n", False),
    ("glibc", "2.36", "always madvise [never]\n", False),
    ("", "", "always [madvise] never\n", False),
])
def test_supported(monkeypatch, tmp_path, libc, version, thp, expected):
  (tmp_path / "enabled").write_text(thp)
  monkeypatch.setattr(huge_pages, "THP_ENABLED", str(tmp_path / "enabled"))
  monkeypatch.setattr(huge_pages.platform, "libc_ver", lambda: (libc, version))
  monkeypatch.setattr(huge_pages.sys, "platform", "linux")
  assert huge_pages.supported() is expected
  monkeypatch.setattr(huge_pages, "THP_ENABLED", str(tmp_path / "missing"))
  assert huge_pages.supported() is False


def test_reexec_starts_the_command_again_once():
  """The same command line runs again with the tunable set, and only once."""
  if not huge_pages.supported():
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  code = ("import os, sys; print('start', sys.argv[1:], flush=True); "
          "from experiments import huge_pages; huge_pages.reexec(); "
          "print('tunables', os.environ['GLIBC_TUNABLES'])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
  r = subprocess.run([sys.executable, "-c", code, "--flag=1"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
      "start ['--flag=1']", "start ['--flag=1']",
      f"tunables glibc.malloc.arena_max=4:{TUNABLE_ON}"]


def test_test_workers_start_with_the_tunable():
  """conftest.py sets it before pytest-xdist starts its workers, so a worker's
  environment at its start (/proc/self/environ) has it."""
  if not huge_pages.supported() or "PYTEST_XDIST_WORKER" not in os.environ:
    pytest.skip("no glibc >= 2.35 with transparent huge pages here, or not an xdist worker")
  with open("/proc/self/environ", "rb") as f:
    start = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
  assert huge_pages.TUNABLE.encode() in start.get(b"GLIBC_TUNABLES", b"")

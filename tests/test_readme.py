"""README's "Use it as a library" block runs as written and trains the thresholds."""

import os
import re

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_block() -> str:
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_library_example_trains_thresholds(monkeypatch, optimized):
  monkeypatch.chdir(REPO)  # the block names the shipped checkpoint by a relative path
  ns = {}
  exec(compile(library_block(), "README.md", "exec"), ns)  # pylint: disable=exec-used
  out, p = ns["out"], ns["p"]
  assert out.stats["steps"] == 6 and out.stats["nonfinite_steps"] == 0
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       out.variables["thresholds"], p.variables["thresholds"])
  assert any(jax.tree.leaves(moved))
  assert ns["logits"].shape == (8, 10)
  # The frozen weights are the folded ones, untouched.
  jax.tree.map(np.testing.assert_array_equal, out.variables["params"], p.variables["params"])

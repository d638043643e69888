"""Every tutorial runs top to bottom, as a reader would run it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tutorials").glob("*.py")))
def test_the_tutorial_runs_top_to_bottom(script):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, ROOT / "tutorials" / script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) > 10  # it printed what it explains

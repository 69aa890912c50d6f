"""The README's minimal example runs as written, with 4 CPU processes, and the loss falls."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launching import launch_env
from paths import ROOT

pytestmark = pytest.mark.multiprocess

README = ROOT / "README.md"


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "trainer.fit" in b and "__main__" in b]
    script = tmp_path / "example.py"
    script.write_text(example)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=launch_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (final,) = re.findall(r"final train_loss=([0-9.]+)", proc.stdout)
    assert float(final) < 0.75 * math.log(512)  # started at ~ln(vocab) = 6.24

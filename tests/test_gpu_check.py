"""scripts/gpu_check.sh, the GPU path in one prepared run, checked on the CPU (--cpu):
every step runs and the three numbers come out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_its_steps_at_tiny_sizes_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    numbers = dict(re.findall(r"^(train img/s|embed img/s|search ms/query): ([0-9.]+)", result.stdout, re.M))
    assert set(numbers) == {"train img/s", "embed img/s", "search ms/query"}
    assert all(float(value) > 0 for value in numbers.values())
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["faiss"] == "faiss-cpu" and summary["processes"] == 2 and summary["embedded"] == 12
    assert (tmp_path / "finetune" / "final.pt").is_file()
    assert not list(tmp_path.glob("gallery.part-*"))  # rank 0 joined the two parts

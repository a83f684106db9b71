"""The notebooks' Jupyter kernel runs the interpreter that launches it (papermill's), so
two checkouts on one machine never point each other's pipelines at the wrong venv."""

from __future__ import annotations

import json
import sys

from jupyter_client.manager import KernelManager

from mtl.runtime import install_kernel


def test_the_kernel_runs_the_launching_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))
    spec_dir = install_kernel("mtl-test")
    assert spec_dir.is_relative_to(tmp_path)
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][0] == "python"
    assert spec["env"]["MALLOC_MMAP_MAX_"] == "0"
    command = KernelManager(kernel_name="mtl-test").format_kernel_cmd()
    assert command[0] == sys.executable
    assert install_kernel("mtl-test") == spec_dir  # idempotent

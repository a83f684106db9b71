"""Process-level plumbing shared by every entry point: device choice, seeding,
in-process malloc tuning, progress reports, the Jupyter kernel, and the git revision.

torch and Jupyter are imported by the functions that need them, so that the corpus
build and `mtl --help` never load them."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
from tqdm import tqdm

from mtl.io import atomic_write_text

T = TypeVar("T")

# glibc's default malloc hands freed tensor buffers back to the kernel after
# every step; on a 2-core machine that made torch 2-3.7x slower.  The Makefile
# and the Jupyter kernel set these variables, which glibc reads at process
# start; `mtl` sets the same two knobs in-process with tune_malloc().
FAST_MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
}
# mallopt() parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# mallopt takes an int: its largest value (2 GiB) stands in for the variable's 100 GB.
TRIM_THRESHOLD = 2**31 - 1


def tune_malloc() -> bool:
    """Keep freed memory in the process, as FAST_MALLOC_ENV does (glibc's mallopt,
    through ctypes).  In-process, so a host script calling `mtl.cli.main` is not
    restarted.  False where the C library has no mallopt (macOS, musl's stub)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resolve_device(device: str = "auto") -> "torch.device":
    """'auto' → CUDA when present, else CPU; anything else is passed to torch."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_revision(cwd: str | Path | None = None) -> str:
    """Short SHA of HEAD (with '-dirty' when the tree has changes), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def stopwatch() -> Iterator[dict]:
    """`with stopwatch() as t: ...` then t["seconds"] (and t["started"], a perf_counter)."""
    timing = {"started": time.perf_counter()}
    yield timing
    timing["seconds"] = round(time.perf_counter() - timing["started"], 2)


def is_interactive() -> bool:
    """True for a terminal session; False under papermill, CI or a pipe, where
    progress is printed as one line per epoch instead of a live bar."""
    if os.environ.get("CI") or os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("MTL_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it", lines: int = 4,
             leave: bool = True) -> Iterator[T]:
    """Progress over a long loop, the one way the package reports it: a live tqdm bar when
    a person watches; otherwise `lines` lines (at 25, 50, 75 and 100 % by default; none
    with 0) with the elapsed time and the rate (papermill, CI, pipes)."""
    if is_interactive():
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=leave)
        return
    marks = {max(1, -(-total * q // lines)) for q in range(1, lines + 1)} if lines and total else set()
    started = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if done in marks:
            seconds = time.perf_counter() - started
            print(f"{desc}: {done}/{total} {unit}, {seconds:.0f} s ({done / max(seconds, 1e-9):.1f} {unit}/s)",
                  flush=True)


# The kernel's interpreter: jupyter_client replaces a bare "python" by the interpreter
# that launches the kernel (papermill's, i.e. the project's .venv).  An absolute path
# would tie the user-wide kernel to one checkout: a second clone's `make setup` would
# repoint the first clone's pipeline at its venv, and deleting that clone breaks both.
KERNEL_PYTHON = "python"


def install_kernel(name: str = "mtl") -> Path:
    """Register Jupyter kernel `name` (user scope) running the launching interpreter, with
    the fast-malloc variables in the kernel's environment.  Idempotent."""
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    spec_dir = None
    try:
        spec_dir = Path(ksm.get_kernel_spec(name).resource_dir)
    except Exception:  # noqa: BLE001 - jupyter raises NoSuchKernel, a plain KeyError subclass
        pass
    wanted_env = {**FAST_MALLOC_ENV, "PAPERMILL_EXECUTION": "1"}
    if spec_dir is not None:
        spec = json.loads((spec_dir / "kernel.json").read_text())
        if spec.get("argv", [""])[0] == KERNEL_PYTHON and spec.get("env") == wanted_env:
            return spec_dir
    from ipykernel.kernelspec import install

    spec_dir = Path(install(user=True, kernel_name=name, display_name=f"Python ({name})"))
    spec = json.loads((spec_dir / "kernel.json").read_text())
    spec["argv"][0] = KERNEL_PYTHON
    spec["env"] = wanted_env
    atomic_write_text(spec_dir / "kernel.json", json.dumps(spec, indent=1))
    print(f"registered Jupyter kernel '{name}' (runs the interpreter that launches it: papermill's)")
    return spec_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtl.runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("install-kernel", help="register the Jupyter kernel used by the notebooks")
    k.add_argument("--name", default="mtl")
    args = parser.parse_args(argv)
    if args.cmd == "install-kernel":
        install_kernel(args.name)


if __name__ == "__main__":
    main()

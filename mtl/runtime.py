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


def _quiet() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("MTL_NO_PROGRESS"))


def is_interactive() -> bool:
    """True for a terminal session; False under papermill, CI or a pipe, where
    progress is printed as one line per epoch instead of a live bar."""
    return not _quiet() and sys.stderr.isatty()


def in_notebook() -> bool:
    """True inside a Jupyter kernel a person uses (JupyterLab, Notebook), not under papermill."""
    if _quiet() or "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it", lines: int = 4,
             leave: bool = True) -> Iterator[T]:
    """Progress over a long loop, the one way the package reports it: a live tqdm bar when
    a person watches (in a terminal; in JupyterLab a widget bar, tqdm.auto); otherwise
    `lines` lines (at 25, 50, 75 and 100 % by default; none with 0) with the elapsed time
    and the rate (papermill, CI, pipes)."""
    if in_notebook():
        from tqdm.auto import tqdm as notebook_tqdm

        yield from notebook_tqdm(items, total=total, desc=desc, unit=unit, leave=leave)
        return
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
    # papermill runs set PAPERMILL_EXECUTION themselves (scripts/stage, mtl.sweep): a person
    # using the kernel in JupyterLab gets live progress bars
    wanted_env = dict(FAST_MALLOC_ENV)
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


def timed_run(name: str, command: list[str], out_dir: Path) -> int:
    """Run `command`, then write out_dir/<name>.json: its wall time (the interpreter's and a
    notebook kernel's start included) and exit status.  Returns the exit status."""
    started, clock = time.time(), time.perf_counter()
    status = subprocess.run(command).returncode
    record = {"stage": name, "wall_seconds": round(time.perf_counter() - clock, 2),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "status": status}
    if status == 0:  # a failed stage leaves the last good record
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / f"{name}.json", json.dumps(record, indent=1) + "\n")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("install-kernel", help="register the Jupyter kernel used by the notebooks")
    k.add_argument("--name", default="mtl")
    t = sub.add_parser("timed", help="run a command and record its wall time (a pipeline stage)")
    t.add_argument("--name", required=True)
    t.add_argument("--out", type=Path, default=Path("results/timing"))
    t.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    if args.cmd == "install-kernel":
        install_kernel(args.name)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("timed needs a command after --")
    return timed_run(args.name, command, args.out)


if __name__ == "__main__":
    raise SystemExit(main())

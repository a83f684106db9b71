"""The `mtl` command.  Each sub-command lives in the module that does the job;
this file maps names to those modules' `main(argv)` functions, and turns their
errors into one line: `mtl COMMAND: error: ...` and exit status 2 for a problem
with the user's input, exit status 1 for anything else.  `--debug` anywhere on
the command line (or MTL_DEBUG=1) shows the traceback as well."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from mtl.runtime import tune_malloc

COMMANDS = {
    "corpus": ("mtl.data.corpus", "build the image corpus (Debian packages or your own folder)"),
    "evalset": ("mtl.data.evalset", "build the fixed evaluation set (references, queries, ground truth)"),
    "gallery": ("mtl.data.gallery", "render every copy transformation on one image"),
    "train": ("mtl.train", "train one stage (frozen backbone, or full fine-tuning)"),
    "embed": ("mtl.eval.embed", "write embeddings + class probabilities of images to .npz"),
    "index": ("mtl.eval.index", "an on-disk index of references (flat or IVF-PQ): build, add, info"),
    "search": ("mtl.eval.search", "find the nearest references of query embeddings (or in an index)"),
    "dedup": ("mtl.dedup.cli", "find the duplicates in a folder; review them; move them aside safely"),
}
# What a user can cause and fix: a bad path, file, setting or parameter.
USER_ERRORS = (ValueError, OSError, KeyError)


def usage() -> str:
    lines = ["usage: mtl COMMAND [options]   (mtl COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "--debug (anywhere, or MTL_DEBUG=1) shows the traceback of an error"]
    return "\n".join(lines)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MTL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mtl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    tune_malloc()
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"mtl {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns errors into a message
        if debug:
            traceback.print_exc()
        if isinstance(error, USER_ERRORS):
            print(f"mtl {name}: error: {one_line(error)}", file=sys.stderr)
            return 2
        print(f"mtl {name}: error: {type(error).__name__}: {one_line(error)} (a bug; --debug shows where)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

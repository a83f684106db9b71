"""The `mtl` command.  Each sub-command lives in the module that does the job;
this file only maps names to those modules' `main(argv)` functions."""

from __future__ import annotations

import importlib
import sys

from mtl.runtime import ensure_fast_malloc

COMMANDS = {
    "corpus": ("mtl.data.corpus", "build the image corpus (Debian packages or your own folder)"),
    "evalset": ("mtl.data.evalset", "build the fixed evaluation set (references, queries, ground truth)"),
    "gallery": ("mtl.data.transforms", "render every copy transformation on one image"),
    "train": ("mtl.train", "train one stage (frozen backbone, or full fine-tuning)"),
    "embed": ("mtl.eval.embed", "write embeddings + class probabilities of images to .npz"),
    "index": ("mtl.eval.index", "an on-disk index of references (flat or IVF-PQ): build, add, info"),
    "search": ("mtl.eval.search", "find the nearest references of query embeddings (or in an index)"),
    "dedup": ("mtl.dedup", "find the duplicates in a folder; review them; move them aside safely"),
}


def usage() -> str:
    lines = ["usage: mtl COMMAND [options]   (mtl COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mtl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    ensure_fast_malloc()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

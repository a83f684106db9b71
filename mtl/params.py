"""params.yaml: the study's single source of parameters.

Profiles (`profiles/<name>.yaml`) are partial YAML files overlaid on params.yaml;
`dvc exp run -S` and papermill overrides use dotted keys (`loss.memory_size=0`).
"""

from __future__ import annotations

import argparse
import copy
import shlex
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from mtl.io import atomic_write_text

Config = TypeVar("Config")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, overlay: dict) -> dict:
    """A copy of `base` with `overlay` written over it, recursing into mappings."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_value(raw: str):
    """YAML, except that '1e-4' is a number (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(params: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key.path=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = params
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise KeyError(f"override {assignment!r}: {key!r} is not a section of the parameters")
        node = node[key]
    if keys[-1] not in node:
        known = ", ".join(sorted(node)) or "(none)"
        raise KeyError(f"override {assignment!r}: unknown key {keys[-1]!r}; known here: {known}")
    node[keys[-1]] = parse_value(raw)


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = (),
                profile: str | Path | None = None) -> dict:
    """params.yaml, then a profile overlay, then dotted overrides, in that order."""
    params = read_yaml(path)
    if profile:
        params = deep_merge(params, read_yaml(profile))
    for assignment in overrides:
        set_dotted(params, assignment)
    return params


def section_config(cls: type[Config], section: Mapping[str, Any] | None, name: str, **given: Any) -> Config:
    """Dataclass `cls` made from the parameters' section `name`.  Every field without a
    default in code comes from the section (params.yaml holds the study's values; code
    holds none), no other key may be there, and `given` fills the fields the section
    does not hold."""
    section = dict(section or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"unknown key(s) in the {name} section: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names - set(given)))}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(section) - set(given))
    if missing:
        raise ValueError(f"the {name} section lacks {', '.join(missing)} (params.yaml names every one)")
    return cls(**section, **given)


# Where each key of a recipe lands in the parameters.
RECIPE_SECTIONS = {"loss": ("loss",), "model": ("model",), "train": ("train",),
                   "frozen": ("train", "frozen"), "finetune": ("train", "finetune")}


def recipe_params(params: dict, recipe: str) -> dict:
    """The parameters with recipe `recipe` of ``params["recipes"]`` written over them.

    A recipe overlays only what it changes (``loss``, ``model``, ``train``, ``frozen``
    = ``train.frozen``, ``finetune`` = ``train.finetune``), optionally on top of another
    recipe (``based_on``); the sections outside ``recipes`` are the default recipe."""
    recipes = params.get("recipes") or {}
    chain, name = [], recipe
    while name:
        if name not in recipes:
            raise KeyError(f"unknown recipe {name!r}; recipes in the parameters: {', '.join(recipes) or '(none)'}")
        if any(entry is recipes[name] for entry in chain):
            raise ValueError(f"recipe {recipe!r}: 'based_on' goes round in a circle")
        chain.append(recipes[name] or {})
        name = chain[-1].get("based_on")
    merged = copy.deepcopy(params)
    for entry in reversed(chain):
        for key, value in entry.items():
            if key == "based_on":
                continue
            if key not in RECIPE_SECTIONS:
                raise KeyError(f"recipe {recipe!r}: unknown key {key!r}; known: {', '.join(RECIPE_SECTIONS)}")
            *parents, leaf = RECIPE_SECTIONS[key]
            node = merged
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = deep_merge(node.get(leaf) or {}, value or {})
    return merged


def flatten(tree: dict, prefix: str = "", base: dict | None = None) -> list[tuple[str, Any]]:
    """Leaves of a nested mapping as (dotted key, value), in file order.  With `base`, a
    mapping whose key is not a mapping in `base` (null there, say), or that adds keys the
    mapping in `base` lacks (a recipe's section naming a setting the recipe did not), stays
    one leaf: `dvc exp run -S` and set_dotted set existing keys only."""
    leaves: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        below = base.get(key) if isinstance(base, dict) else None
        only_known_keys = isinstance(value, dict) and isinstance(below, dict) and set(value) <= set(below)
        if isinstance(value, dict) and value and (base is None or only_known_keys):
            leaves.extend(flatten(value, dotted + ".", below if base is not None else None))
        else:
            leaves.append((dotted, value))
    return leaves


def dvc_set_args(profile: str | Path, base: str | Path = "params.yaml") -> list[str]:
    """`-S key=value` arguments for `dvc exp run` that apply a profile overlay to `base`."""
    args: list[str] = []
    for key, value in flatten(read_yaml(profile), base=read_yaml(base) if Path(base).is_file() else None):
        rendered = yaml.safe_dump(value, default_flow_style=True).strip()
        rendered = rendered.removesuffix("...").strip()
        args += ["-S", f"{key}={rendered}"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl.params", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("set-args", help="print `dvc exp run -S` arguments for a profile")
    s.add_argument("profile")
    w = sub.add_parser("write", help="write params.yaml merged with a profile to OUT")
    w.add_argument("profile")
    w.add_argument("--base", default="params.yaml")
    w.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "set-args":
        print(" ".join(shlex.quote(a) for a in dvc_set_args(args.profile)))
    else:
        merged = load_params(args.base, profile=args.profile)
        atomic_write_text(args.out, yaml.safe_dump(merged, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

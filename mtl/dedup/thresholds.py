"""Which method and decision a `mtl dedup` run uses: a named method (best, imagenet,
phash, dhash) or a checkpoint, its operating point (mtl.eval.operating_points) or
--threshold, the score's scale (normalized with the folder as background by default,
`--raw` for plain cosine), the combined decision (pHash within a radius, or the
embedding's score), the class gate, and the input size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mtl.eval.baselines import score_from_hamming
from mtl.eval.normalize import Normalization
from mtl.eval.operating_points import DEFAULT_OPERATING_POINTS, OperatingPoint, load_operating_points
from mtl.io import file_digest
from mtl.model import load_checkpoint, trained_image_size
from mtl.release import load_release

DEFAULT_IMAGE_SIZE = 112  # the untrained ImageNet backbone's input, when no operating point names one
# imagededup's default max_distance_threshold: the radius its users already trust.
DEFAULT_HAMMING_RADIUS = 10
NAMED_METHODS = ("best", "imagenet", "phash", "dhash")
NO_TRAINED_MODEL = ("no trained model: {reason}. Train one with `make repro`, or pass "
                    "--method imagenet|phash|dhash|CKPT (with --threshold for imagenet or a checkpoint)")


class DedupSetupError(Exception):
    """What the user must change before a run can start; the message is one line."""


@dataclass(frozen=True)
class DedupMethod:
    """A descriptor with its threshold: everything that decides which pairs are duplicates."""

    name: str               # as asked: best, imagenet, phash, dhash or a checkpoint path
    descriptor: str         # mtl | gap1280 | phash | dhash
    threshold: float
    threshold_source: str   # where the threshold came from, said in every output
    gate: bool              # the class gate (MTL descriptors only)
    checkpoint: Path | None = None  # None: a hash, or the untrained ImageNet backbone
    checkpoint_digest: str | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    normalization: Normalization | None = None  # the scale of `threshold`: None = raw cosine
    hamming_radius: int | None = None  # the combined decision: also pairs within this pHash radius
    model_note: str = ""    # `best`: the pipeline's trained model, or the released one

    @property
    def cache_key(self) -> str:
        """Names the cache folder: descriptors of different models never mix."""
        if self.descriptor in ("phash", "dhash"):
            return self.descriptor
        model = self.checkpoint_digest or "imagenet"
        return f"{self.descriptor}-{model}-{self.image_size}px"

    @property
    def scale(self) -> str:
        if self.normalization is not None:
            return f"normalized (β={self.normalization.beta:g}, k={self.normalization.k}, the folder as background)"
        return "hash (1 - 2 Hamming/64)" if self.descriptor in ("phash", "dhash") else "raw cosine"

    def hashes(self) -> "DedupMethod":
        """The pHash side of the combined decision."""
        return replace(self, descriptor="phash", gate=False, checkpoint=None, checkpoint_digest=None,
                       normalization=None, hamming_radius=None)

    def describe(self) -> str:
        gate = ", class gate on" if self.gate else ""
        name = self.checkpoint.name if self.checkpoint is not None else self.name
        combined = f", or pHash within {self.hamming_radius} bits" if self.hamming_radius is not None else ""
        model = f"; {self.model_note}" if self.model_note else ""
        return (f"{name} ({self.descriptor}, {self.scale} score >= {self.threshold:.4g}{combined}, "
                f"from {self.threshold_source}{gate}{model})")


DECISIONS = ("auto", "threshold", "combined")


def resolve_method(method: str = "best", operating_points: str | Path = DEFAULT_OPERATING_POINTS,
                   threshold: float | None = None, gate: bool = True,
                   image_size: int | None = None, raw: bool = False, decision: str = "auto") -> DedupMethod:
    """The method, decision and gate a run uses; DedupSetupError says what is missing.
    `raw` decides on plain cosine scores; `decision` is the operating point's own (auto),
    the embedding's threshold alone, or the combined decision."""
    if decision not in DECISIONS:
        raise DedupSetupError(f"decision must be one of {DECISIONS}, got {decision!r}")
    points = _operating_points_or_none(operating_points)
    if method == "best" and (points is None or "best" not in points or _checkpoint_missing(points["best"],
                                                                                        operating_points)):
        release = load_release()
        if release is not None:  # no pipeline model: the released one decides
            chosen = resolve_method("best", release.operating_points_path, threshold, gate, image_size, raw, decision)
            return replace(chosen, model_note=release.describe())
    if method in NAMED_METHODS:
        entry = (points or {}).get(method)
        if entry is None:
            if decision == "combined":
                raise DedupSetupError(f"the combined decision needs the operating points of {method} "
                                      f"({operating_points} has none)")
            return _without_entry(method, operating_points, points, threshold, image_size)
        name = method
    else:
        checkpoint = Path(method)
        if not checkpoint.is_file():
            raise DedupSetupError(f"unknown method {method!r}: give {', '.join(NAMED_METHODS)} or a checkpoint file")
        digest = file_digest(checkpoint)
        entry = next((e for e in (points or {}).values()
                      if e.checkpoint_digest == digest and e.descriptor == "mtl"), None)
        if entry is None:
            if threshold is None:
                raise DedupSetupError(f"no operating point in {operating_points} for {checkpoint} "
                                      f"(digest {digest}): pass --threshold")
            return DedupMethod(method, "mtl", threshold, "--threshold", gate,
                               checkpoint, digest, image_size or _trained_image_size(checkpoint))
        entry, name = OperatingPoint(**{**asdict(entry), "checkpoint": str(checkpoint)}), method
    chosen = _from_entry(name, entry, operating_points, threshold, gate, image_size)
    if name == "best" and chosen.checkpoint is not None and not chosen.model_note:
        chosen = replace(chosen, model_note=f"the trained model {chosen.checkpoint}")
    return _with_scale(chosen, entry, threshold, raw, decision)


def _checkpoint_missing(entry: OperatingPoint, points_path) -> bool:
    """Whether the file an entry names is nowhere to be found (as written, or beside the points)."""
    if not entry.checkpoint:
        return False
    written, points_path = Path(entry.checkpoint), Path(points_path)
    return not any(c.is_file() for c in (written, points_path.parent / written, points_path.parent.parent / written))


def _with_scale(chosen: DedupMethod, entry: OperatingPoint, threshold: float | None, raw: bool,
                decision: str) -> DedupMethod:
    """The entry's scale and decision: normalized unless `raw`, combined when the entry
    (or `decision`) says so; a --threshold is read on the scale in use."""
    if decision == "auto":
        decision = entry.decision
    if raw:
        if decision == "combined" and entry.decision == "combined" and threshold is None:
            decision = "threshold"  # the combined threshold is a normalized one
        elif decision == "combined":
            raise DedupSetupError("the combined decision's threshold is on the normalized scale: drop --raw")
        value = entry.raw_threshold if entry.raw_threshold is not None else entry.threshold
        return replace(chosen, threshold=value if threshold is None else threshold, normalization=None)
    normalization = entry.folder_normalization
    if decision == "combined":
        if entry.combined is None:
            raise DedupSetupError(f"the operating point of {chosen.name} has no combined decision "
                                  "(it is chosen for the trained model only)")
        value = entry.combined["threshold"] if threshold is None else threshold
        return replace(chosen, threshold=value, normalization=normalization,
                       hamming_radius=int(entry.combined["hamming_radius"]))
    return replace(chosen, normalization=normalization)


def _operating_points_or_none(path: str | Path) -> dict[str, OperatingPoint] | None:
    """Absent file: None (each method has its fallback).  A malformed one is an error."""
    try:
        return load_operating_points(path)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise DedupSetupError(str(error)) from None


def _without_entry(method: str, path, points, threshold: float | None, image_size: int | None) -> DedupMethod:
    size = image_size or DEFAULT_IMAGE_SIZE
    if method == "best":
        reason = f"{path} is missing" if points is None else f"{path} has no 'best' entry"
        raise DedupSetupError(NO_TRAINED_MODEL.format(reason=reason))
    if method in ("phash", "dhash"):
        if threshold is not None:
            return DedupMethod(method, method, threshold, "--threshold", False)
        radius = DEFAULT_HAMMING_RADIUS
        return DedupMethod(method, method, float(score_from_hamming(radius)),
                           f"the default Hamming radius of {radius} bits", False)
    if threshold is None:  # imagenet: cosine scores have no threshold that fits every folder
        raise DedupSetupError(f"--method imagenet needs --threshold ({path} has no 'imagenet' entry)")
    return DedupMethod(method, "gap1280", threshold, "--threshold", False, image_size=size)


def _from_entry(name: str, entry: OperatingPoint, path, threshold: float | None, gate: bool,
                image_size: int | None) -> DedupMethod:
    checkpoint, digest = None, None
    if entry.descriptor in ("mtl", "gap1280") and name != "imagenet":
        checkpoint = _find_checkpoint(entry, Path(path))
        digest = _checked_digest(checkpoint, entry, threshold)
    source = "--threshold" if threshold is not None else \
        f"{Path(path).name} ({entry.split} split, precision {entry.target_precision:g})"
    if image_size is None:  # the size the threshold was chosen at, else the checkpoint's own
        image_size = entry.image_size or (_trained_image_size(checkpoint) if checkpoint else DEFAULT_IMAGE_SIZE)
    return DedupMethod(name, entry.descriptor, entry.threshold if threshold is None else threshold, source,
                       gate and entry.descriptor == "mtl", checkpoint, digest, image_size)


def _trained_image_size(checkpoint: Path) -> int:
    size = trained_image_size(load_checkpoint(checkpoint))
    if size is None:
        raise DedupSetupError(f"{checkpoint} records no training image size: pass --image-size")
    return size


def _find_checkpoint(entry: OperatingPoint, points_path: Path) -> Path:
    """The entry's checkpoint, as written or relative to the project (models/..)."""
    if not entry.checkpoint:
        raise DedupSetupError(f"{points_path}: the {entry.descriptor} entry names no checkpoint")
    written = Path(entry.checkpoint)
    for candidate in (written, points_path.parent / written, points_path.parent.parent / written):
        if candidate.is_file():
            return candidate
    raise DedupSetupError(NO_TRAINED_MODEL.format(reason=f"checkpoint {written} (named in {points_path}) "
                                                         "is missing"))


def _checked_digest(checkpoint: Path, entry: OperatingPoint, threshold: float | None) -> str:
    """A threshold belongs to the weights it was chosen for: refuse a changed checkpoint."""
    digest = file_digest(checkpoint)
    if entry.checkpoint_digest and digest != entry.checkpoint_digest and threshold is None:
        raise DedupSetupError(f"{checkpoint} changed since its threshold was chosen (digest {digest}, "
                              f"expected {entry.checkpoint_digest}): rerun `make repro` or pass --threshold")
    return digest

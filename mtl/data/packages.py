"""Which Debian packages the corpus takes pictures from: one table, one row per image folder.

Each row says which files of a package are pictures, their content class, whether they
are cut into tiles (large photographs, wallpapers, maps, painted backgrounds) or used
whole (icons, sprites, clip art), what counts as one picture (`grouping`: all files of a
group are one picture and share a split), which file of a group is used, and why the
class is right (checked by eye on the contact sheet of every row, `results/corpus_full/`).

Package sets (`data.packages`): ``default`` is what the default profile has always used
(six wallpaper packages and openclipart-png); ``full`` adds icon themes and game art.
Reserved for an independent evaluation and refused here: tuxpaint-*, stellarium*, and the
sample images of scikit-image and scikit-learn.

Groupings (functions of a file's path below the row's `root`, returning (picture, group)):

  wallpaper  every size and the light/dark colourings of one wallpaper (scene_picture)
  family     the file name without its numbers: numbered variants of one drawing
  icon       the icon name: every size (``NNxNN``, ``NNxNN@2x``, ``scalable`` folders) and
             context folder of one icon; ``-symbolic`` icons are left out (monochrome
             glyphs, near blank at any size)
  sprite     folder + the first word of the name: every frame, pose and facing of one
             character (``spearman-ne-attack-2`` -> ``spearman``)
  folder     the file's folder: a folder holds one object (its frames, angles, parts)
  file       the file itself
  listed     a list of the row's files with each one's picture (`listing`, a file in
             mtl/data/photos/): for rows whose pictures were picked one by one on a
             contact sheet, as the real photographs were (no glob tells a photograph
             from a render or a screenshot in the same folder)

Real photographs (`photo`) are scenes used whole, never tiled: a photograph is a picture
a user would upload, and the eval set gives them a part of their own.  Packages whose
photographs ship inside Qt resource files (gcompris-qt-data) name them as
``FILE.rcc:/resource/path``; the build extracts those entries (mtl.data.rcc).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Packages whose pictures are kept for an independent evaluation: never a training source.
RESERVED_PACKAGES = ("tuxpaint*", "stellarium*", "*skimage*", "*scikit-image*", "*sklearn*", "*scikit-learn*")
GROUPINGS = ("wallpaper", "family", "icon", "sprite", "folder", "file", "listed")
LISTINGS = Path(__file__).parent / "photos"
PICKS = ("seeded", "largest")
PACKAGE_SETS = ("default", "full")


def is_reserved(package: str) -> bool:
    return any(fnmatch.fnmatch(package, pattern) for pattern in RESERVED_PACKAGES)


def refuse_reserved(package: str) -> None:
    if is_reserved(package):
        raise ValueError(f"{package} is reserved for an independent evaluation ({', '.join(RESERVED_PACKAGES)}) "
                         "and is never a corpus source")


@dataclass(frozen=True)
class PackageSource:
    """One folder of pictures in one Debian package (see the module docstring)."""

    package: str
    class_name: str              # scene | clipart
    globs: tuple[str, ...]       # below root
    grouping: str
    reason: str                  # why this class: what the contact sheet shows
    tiled: bool = False
    root: str = ""               # ids and groups are relative to this folder of the package
    pick: str = "seeded"         # whole images: which file of a group (tiled rows: the largest)
    exclude: tuple[str, ...] = ()  # globs (below root) left out
    id_prefix: str | None = None   # None: the package name; "" for the rows the default set always had
    vector: bool = False           # SVG files are sources (rendered with rsvg-convert), not skipped
    sets: tuple[str, ...] = ("full",)
    photo: bool = False            # real photographs (camera pictures of the world): the eval set's photo part
    listing: str | None = None     # grouping "listed": the list in mtl/data/photos/ naming the files

    def __post_init__(self) -> None:
        refuse_reserved(self.package)
        if (self.grouping == "listed") != (self.listing is not None):
            raise ValueError(f"{self.package}: grouping 'listed' and a listing go together")
        if self.photo and self.tiled:
            raise ValueError(f"{self.package}: photographs are used whole, not tiled")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"{self.package}: grouping {self.grouping!r} is not one of {GROUPINGS}")
        if self.pick not in PICKS:
            raise ValueError(f"{self.package}: pick {self.pick!r} is not one of {PICKS}")
        if not set(self.sets) <= set(PACKAGE_SETS):
            raise ValueError(f"{self.package}: sets {self.sets} must be among {PACKAGE_SETS}")

    @property
    def prefix(self) -> str:
        return self.package if self.id_prefix is None else self.id_prefix

    def matches(self, relative: str) -> bool:
        """Whether a path below `root` (POSIX, relative) is one of this row's files."""
        return (any(glob_regex(g).match(relative) for g in self.globs)
                and not any(glob_regex(g).match(relative) for g in self.exclude))


@lru_cache(maxsize=None)
def read_listing(name: str) -> dict[str, str]:
    """{path in the package: picture} of a list in mtl/data/photos/ ('#' lines are notes)."""
    path = LISTINGS / name
    if not path.is_file():
        raise FileNotFoundError(f"package listing {path} is missing")
    listed: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}:{number}: expected '<path><TAB><picture>', got {line!r}")
        listed[parts[0]] = parts[1]
    return listed


@lru_cache(maxsize=None)
def glob_regex(pattern: str) -> re.Pattern:
    """A path glob as a regex: `*` stays within a folder, `**/` is any number of folders."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] in "*?":
            parts.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z")


_WALLPAPER = "desktop wallpaper: photographs and painted or rendered landscapes, full frame"
_ICONS = "icon theme: one drawn object on a transparent canvas"


def _wallpapers(package: str) -> PackageSource:
    return PackageSource(package, "scene", ("**/*",), "wallpaper", _WALLPAPER, tiled=True, id_prefix="",
                         sets=("default", "full"))


def _icon_theme(package: str, theme: str, reason: str = _ICONS, exclude: tuple[str, ...] = (),
                globs: tuple[str, ...] = ("**/*.png",)) -> PackageSource:
    return PackageSource(package, "clipart", globs, "icon", reason, root=f"usr/share/icons/{theme}",
                         pick="largest", exclude=("**/*symbolic*", "**/*symbolic*/**", *exclude),
                         vector=any(g.endswith(".svg") for g in globs))


_PHOTO_REASON = "real photographs, picked one by one on a contact sheet (renders, screenshots, composites left out)"


def _photos(package: str, what: str, sets: tuple[str, ...]) -> PackageSource:
    return PackageSource(package, "scene", (), "listed", f"{what}: {_PHOTO_REASON}", pick="largest", sets=sets,
                         photo=True, listing=f"{package}.txt")


# (package, what its photographs show, package sets): the default profile takes the most
# photographs per MB of download (about 450 in 120 MB), the full profile every one found.
BOTH = ("default", "full")
PHOTOGRAPHS = (
    ("endless-sky-data", "Endless Sky landing images: landscapes, cities, facilities", BOTH),
    ("gcompris-qt-data", "GCompris activities: animals, monuments, farms, the sea floor", BOTH),
    ("scribus-template", "Scribus template photographs", BOTH),
    ("palapeli-data", "Palapeli puzzle photographs", BOTH),
    ("opencv-doc", "OpenCV sample and tutorial photographs", ("full",)),
    ("tuxtype-data", "Tux Typing animal and space photographs", ("full",)),
    ("lxqt-themes", "LXQt wallpaper photographs", ("full",)),
    ("hugin-data", "Hugin manual photographs", ("full",)),
    ("forensics-samples-files", "phone photographs of forensics samples", ("full",)),
    ("digikam-data", "digiKam's landscape photograph", ("full",)),
    ("moon-lander-data", "Moon Lander space photographs (Hubble, Apollo)", ("full",)),
    ("labelme-examples", "labelme example photographs (PASCAL VOC, APC)", ("full",)),
    ("puzzle-jigsaw", "jigsaw sample photographs (Pexels, CC0)", ("full",)),
    ("gimp-help-en", "GIMP manual photographs (originals only)", ("full",)),
    ("gnome-control-center-data", "GNOME avatar photographs", ("full",)),
    ("kphotoalbum", "KPhotoAlbum demo photographs", ("full",)),
    ("mate-screensaver-common", "MATE screensaver space photographs", ("full",)),
)

WESNOTH = "usr/share/games/wesnoth/1.16/data/core/images"
HEDGEWARS = "usr/share/games/hedgewars/Data"
SUPERTUX = "usr/share/games/supertux2/images"
FLARE = "usr/share/games/flare/mods"
FREEDROID = "usr/share/freedroidrpg/data/graphics"
NAEV = "usr/share/naev/dat/gfx"
ETR = "usr/share/games/etr"

PACKAGES: tuple[PackageSource, ...] = (
    # --- the default set (unchanged since the first corpus) -----------------------------
    *(_wallpapers(p) for p in ("plasma-workspace-wallpapers", "mate-backgrounds", "lomiri-wallpapers-16.04",
                               "lomiri-wallpapers-20.04", "ukui-wallpapers", "gnome-backgrounds")),
    PackageSource("openclipart-png", "clipart", ("**/*.png",), "family",
                  "public-domain clip art: drawings on a transparent page", root="usr/share/openclipart/png",
                  id_prefix="", sets=("default", "full")),
    # --- icon themes (PNG sizes; themes shipped only as SVG are not rendered) -------------
    _icon_theme("oxygen-icon-theme", "oxygen/base", "KDE's Oxygen icons: shaded objects, 64-256 px"),
    _icon_theme("adwaita-icon-theme", "Adwaita", "GNOME's Adwaita full-colour icons (legacy sizes)"),
    _icon_theme("gnome-icon-theme", "gnome", "GNOME 2 icons, 256 px"),
    _icon_theme("faenza-icon-theme", "Faenza", "Faenza icons, 64-96 px"),
    _icon_theme("mate-icon-theme", "mate", "MATE icons, 256 px"),
    _icon_theme("elementary-xfce-icon-theme", "elementary-xfce", "elementary icons, 64-128 px"),
    _icon_theme("lxde-icon-theme", "nuoveXT2", "LXDE's nuoveXT icons, 64-128 px"),
    _icon_theme("moka-icon-theme", "Moka", "Moka flat icons, up to 512 px"),
    _icon_theme("paper-icon-theme", "Paper", "Paper flat icons, up to 1024 px"),
    _icon_theme("yaru-theme-icon", "Yaru", "Ubuntu's Yaru icons, up to 512 px"),
    _icon_theme("mint-y-icons", "Mint-Y", "Linux Mint's Mint-Y icons (the colour variants are left out)"),
    _icon_theme("obsidian-icon-theme", "Obsidian", "Obsidian icons, 64-96 px"),
    # SVG-only themes, rendered at 256 px (one size folder: each size is the same drawing)
    _icon_theme("papirus-icon-theme", "Papirus", "Papirus flat icons (SVG, the 64 px drawings)",
                globs=("64x64/**/*.svg",)),
    _icon_theme("numix-icon-theme-circle", "Numix-Circle", "Numix Circle app icons (SVG)", globs=("**/*.svg",)),
    _icon_theme("suru-icon-theme", "suru", "Lomiri's Suru icons (SVG)", globs=("**/*.svg",)),
    _icon_theme("breeze-icon-theme", "breeze", "KDE's Breeze colour icons (SVG; apps, places, devices, "
                "file types: the monochrome action glyphs are left out)",
                globs=("apps/48/*.svg", "places/64/*.svg", "devices/64/*.svg", "mimetypes/64/*.svg")),
    # --- game art: sprites and objects are clip art; painted full-frame backgrounds are scenes
    PackageSource("wesnoth-1.16-data", "clipart", ("units/**/*.png",), "sprite",
                  "Wesnoth unit sprites: one painted figure per file on a transparent hex", root=WESNOTH),
    PackageSource("wesnoth-1.16-data", "clipart", ("portraits/**/*.png",), "sprite",
                  "Wesnoth portraits: painted busts on a transparent background", root=WESNOTH, pick="largest"),
    PackageSource("wesnoth-1.16-data", "clipart", ("items/*.png", "scenery/**/*.png", "projectiles/*.png"),
                  "sprite", "Wesnoth items and scenery: single objects", root=WESNOTH),
    PackageSource("wesnoth-1.16-data", "clipart", ("terrain/**/*.png",), "sprite",
                  "Wesnoth terrain: painted hexagon tiles on a transparent canvas", root=WESNOTH),
    PackageSource("wesnoth-1.16-data", "scene", ("maps/*.*", "story/*.*"), "file",
                  "Wesnoth campaign maps and story paintings: full-frame landscapes", root=WESNOTH, tiled=True),
    PackageSource("freedroidrpg-data", "clipart", ("items/**/*.png", "droids/**/*.*", "obstacles/**/*.png"),
                  "folder", "FreedroidRPG items and droids: rendered objects, one folder per object",
                  root=FREEDROID),
    PackageSource("freedroidrpg-data", "scene", ("backgrounds/*.*",), "file",
                  "FreedroidRPG backgrounds: full-frame rendered scenes", root=FREEDROID, tiled=True),
    PackageSource("hedgewars-data", "clipart", ("Graphics/**/*.png", "Themes/*/*.png", "Forts/*.png"), "sprite",
                  "Hedgewars sprites, hats, theme objects and forts: cartoon objects",
                  root=HEDGEWARS, exclude=("Themes/*/Sky*.png", "Themes/*/horizont*.png", "Themes/*/*Tex*.png")),
    PackageSource("hedgewars-data", "scene", ("Themes/*/Sky*.png", "Themes/*/horizont*.png"), "file",
                  "Hedgewars sky and horizon layers: full-frame painted landscapes", root=HEDGEWARS, tiled=True),
    PackageSource("supertux-data", "clipart", ("creatures/**/*.png", "objects/**/*.png", "worldmap/**/*.png",
                                               "tiles/**/*.png", "decal/**/*.png"), "folder",
                  "SuperTux creatures, objects and tiles: cartoon sprites", root=SUPERTUX),
    PackageSource("supertux-data", "scene", ("background/**/*.*",), "file",
                  "SuperTux backgrounds: painted full-frame landscapes", root=SUPERTUX),
    PackageSource("flare-game", "clipart", ("*/images/avatar/**/*.png", "*/images/enemies/**/*.png",
                                            "*/images/loot/**/*.png", "*/images/portraits/**/*.png",
                                            "*/images/npcs/**/*.png", "*/images/powers/**/*.png"), "sprite",
                  "Flare characters, loot and portraits: painted figures on transparency", root=FLARE),
    PackageSource("flare-game", "scene", ("*/images/cutscenes/**/*.*", "*/images/parallax/**/*.*",
                                          "*/images/menus/backgrounds/**/*.*"), "file",
                  "Flare cutscenes and backdrops: full-frame paintings", root=FLARE, tiled=True),
    PackageSource("naev-data", "clipart", ("ship/**/*.png", "outfit/**/*.png", "commodity/**/*.png",
                                           "portraits/**/*.png", "planet/**/*.png"), "sprite",
                  "Naev ships, outfits, goods, portraits and planets: one rendered object each", root=NAEV),
    PackageSource("naev-data", "scene", ("bkg/*.*", "loading/*.*"), "file",
                  "Naev nebulae and loading screens: full-frame space paintings", root=NAEV, tiled=True),
    PackageSource("extremetuxracer-data", "scene", ("terrains/*.png", "env/**/*.png"), "file",
                  "Extreme Tux Racer terrain textures and sky boxes: full-frame snow, rock and sky",
                  root=ETR),
    PackageSource("mypaint-data-extras", "scene", ("usr/share/mypaint/backgrounds/**/*.*",), "file",
                  "MyPaint paper and canvas textures (the content test drops the flat ones)", tiled=True),
    # --- real photographs, listed one by one (mtl/data/photos/<package>.txt) -------------
    *(_photos(package, reason, sets) for package, reason, sets in PHOTOGRAPHS),
    # --- photo textures: photographs of surfaces, not scenes (scene class, not the photo part)
    PackageSource("torcs-data", "scene", (), "listed",
                  "TORCS track textures: photographs of facades, walls, trees, crowds and ground",
                  listing="torcs-data.textures.txt"),
    PackageSource("scorched3d-data", "scene", (), "listed",
                  "Scorched 3D landscape textures: photographs of ground and surfaces",
                  listing="scorched3d-data.textures.txt"),
)


def package_rows(package_set: str) -> list[PackageSource]:
    """The rows of a package set, in table order."""
    if package_set not in PACKAGE_SETS:
        raise ValueError(f"data.packages must be one of {PACKAGE_SETS}, not {package_set!r}")
    return [row for row in PACKAGES if package_set in row.sets]


def package_names(package_set: str) -> list[str]:
    return list(dict.fromkeys(row.package for row in package_rows(package_set)))


def photo_packages(rows: tuple[PackageSource, ...] = PACKAGES) -> set[str]:
    """The packages whose rows are real photographs.  A package is all photographs or none:
    the manifest knows an image's package (its `source`), not its row."""
    photo = {row.package for row in rows if row.photo}
    mixed = sorted({row.package for row in rows if not row.photo} & photo)
    if mixed:
        raise ValueError(f"packages {mixed} have photograph rows and other rows: a package is one or the other")
    return photo


def is_photo_source(source: str) -> bool:
    """Whether a manifest `source` ('debian:<package>') is a package of real photographs."""
    return source.startswith("debian:") and source.split(":", 1)[1] in photo_packages()


# ---------------------------------------------------------------------------
# What counts as one picture


def clipart_family(stem: str) -> str:
    """The drawing a clip-art file is a variant of: its name without digits.

    Numbered variants (``jigsaw_red_05``, ``jigsaw_red_11``) are recolourings or
    re-cuts of one drawing, and openclipart also ships 1,375 generated
    ``star_<N>pt<M>step`` spirographs that differ only in their numbers and look
    alike far beyond any pHash radius.  One family = one group.
    """
    family = re.sub(r"\d+", "", stem).lower().strip("_- ")
    return family or stem.lower()


def scene_picture(relative: Path) -> tuple[str, str]:
    """(picture, group) of a wallpaper file.

    KDE ships ``<Name>/contents/images[_dark]/<W>x<H>.<ext>`` plus a
    ``screenshot``: all sizes are one picture, the dark variant a recoloured
    copy of it (same group).  Elsewhere a ``_<W>x<H>`` suffix marks another size
    (``Elephants_3840x2160.jpg``) and GNOME's ``-l`` / ``-d`` suffixes mark the
    light and dark colourings of one design (``adwaita-l`` vs ``adwaita-d``:
    6-10 pHash bits apart, tile for tile).
    """
    parts = relative.parts
    if "contents" in parts[:-1]:
        at = parts.index("contents")
        name = parts[at - 1] if at else relative.stem
        dark = any(part.startswith("images_dark") for part in parts[at + 1:-1])
        return name + ("-dark" if dark else ""), name.lower()
    picture = re.sub(r"[_-]\d{3,5}x\d{3,5}$", "", relative.stem)
    return picture, re.sub(r"-[ld]$", "", picture).lower()



def icon_name(relative: Path) -> str:
    """The icon a themed PNG draws: its name, whatever size or context folder holds it
    (``64x64/apps/firefox.png`` and ``apps/256/firefox.png`` are one icon)."""
    return re.sub(r"(@\dx)$", "", relative.stem).lower()


def sprite_name(relative: Path) -> str:
    """folder/first word: the frames, poses and facings of one character or object."""
    word = re.split(r"[-_.\s\d]+", relative.stem.lower())[0] or relative.stem.lower()
    return f"{relative.parent.as_posix().lower()}/{word}"


def picture_of(grouping: str, relative: Path) -> tuple[str, str]:
    """(picture, group) of a file below a row's root, by the row's grouping (a listed
    row's groups come from its listing)."""
    name = relative.with_suffix("").as_posix()
    if grouping == "wallpaper":
        return scene_picture(relative)
    if grouping == "family":
        return name, clipart_family(relative.stem)
    if grouping == "icon":
        return name, icon_name(relative)
    if grouping == "sprite":
        return name, sprite_name(relative)
    if grouping == "folder":
        return name, relative.parent.as_posix().lower()
    return name, name.lower()

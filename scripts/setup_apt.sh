#!/usr/bin/env bash
# Debian prerequisites of the study:
#  - package lists, so that `apt-get download openclipart-png ...` (the corpus
#    source, no root needed for the download itself) can find the packages;
#  - libmagic1, which AugLy's file-type detection needs;
#  - chromium and chromium-driver, the headless browser that tests `mtl dedup`'s report.html;
#  - librsvg2-bin (rsvg-convert), which renders the SVG icon themes of the full package set.
# Runs `apt-get update` only when the lists do not know the corpus packages.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

if ! command -v apt-get >/dev/null; then
    echo "setup_apt: apt-get not found; the 'debian' corpus source needs a Debian/Ubuntu system." >&2
    echo "setup_apt: use the 'folder' source (see README) or install libmagic yourself." >&2
    exit 0
fi
if ! apt-cache show openclipart-png >/dev/null 2>&1 || ! apt-cache show mate-backgrounds >/dev/null 2>&1; then
    echo "setup_apt: refreshing apt package lists (apt-get update)"
    $SUDO apt-get update -qq
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1'; then
    echo "setup_apt: installing libmagic1"
    $SUDO apt-get install -y -qq libmagic1
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "setup_apt: installing chromium chromium-driver (browser test of the dedup report)"
    $SUDO apt-get install -y -qq chromium chromium-driver
fi
if ! command -v rsvg-convert >/dev/null; then
    echo "setup_apt: installing librsvg2-bin (renders the SVG icons of the full corpus)"
    $SUDO apt-get install -y -qq librsvg2-bin
fi

#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian/Ubuntu machine: Debian's
# Fashion-MNIST (the main job's data; no download at run time) and the
# package with its test extras. Used by the README's first command and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    >/dev/null 2>&1 || echo "dataset-fashion-mnist not installed; see README (Data)"
fi
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet -e ".[test]"

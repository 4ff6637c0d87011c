#!/usr/bin/env bash
# Everything Graft needs on a fresh Debian/Ubuntu machine, idempotent (a second call takes seconds):
# the Fashion-MNIST Debian package, a virtual environment in .venv with Graft and its pinned stack,
# and the embedded default data in data/raw (tracked by DVC).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
command -v git >/dev/null || missing+=(git)
command -v chromium-headless-shell >/dev/null || missing+=(chromium-headless-shell)  # the page test's browser
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)  # the PostgreSQL-backed stack's tests
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
echo "setup: installing Graft and its pinned stack into .venv"
if ! .venv/bin/python -m pip install --disable-pip-version-check -e ".[dev]" >.venv/pip-install.log 2>&1; then
  tail -n 30 .venv/pip-install.log
  echo "setup: pip install failed; the whole log is .venv/pip-install.log" >&2
  exit 1
fi
.venv/bin/python -m pip check >/dev/null

if [ ! -d data/raw/fashion-mnist ] || [ ! -d data/raw/animal-mnist ]; then
  echo "setup: writing the embedded default data to data/raw"
  .venv/bin/graft fetch-data
fi
echo "setup: done"

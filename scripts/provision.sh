#!/usr/bin/env bash
# Provision libtorch 2.13.0 (and the Python packages the test suite uses) without the internet:
# only the package registry is needed. Idempotent: a second run takes seconds.
#
# Where things go:
#   TCH_FABRIC_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/tch-fabric)
#   <cache>/venv-torch-2.13.0   a virtual environment holding torch, lightning, safetensors
#   .venv, .libtorch   repo-local links into it; .cargo/config.toml points LIBTORCH at .libtorch
#
# A libtorch the user already has is respected and nothing is installed:
#   LIBTORCH=<dir with include/ and lib/>            (used as is)
#   LIBTORCH_USE_PYTORCH=1 with a python that has torch 2.13  (used as is)
set -euo pipefail

TORCH_VERSION=2.13.0
PY_PACKAGES=("torch==${TORCH_VERSION}" "lightning==2.6.*" "safetensors" "numpy")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TCH_FABRIC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-fabric}
venv="$cache/venv-torch-${TORCH_VERSION}"
stamp="$venv/.tch-fabric-complete"

say() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${LIBTORCH:-}" ]]; then
  [[ -d "$LIBTORCH/lib" && -d "$LIBTORCH/include" ]] ||
    die "LIBTORCH=$LIBTORCH has no lib/ and include/ below it. Point it at a libtorch ${TORCH_VERSION} folder (e.g. <site-packages>/torch), or unset it to let this script install one."
  say "using your libtorch at LIBTORCH=$LIBTORCH; nothing installed"
  exit 0
fi
if [[ -n "${LIBTORCH_USE_PYTORCH:-}" ]]; then
  py=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}
  py=${py:-python3}
  have=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null) ||
    die "LIBTORCH_USE_PYTORCH is set but '$py' cannot import torch. Install torch==${TORCH_VERSION} there, or unset LIBTORCH_USE_PYTORCH."
  [[ "$have" == "$TORCH_VERSION" ]] ||
    die "LIBTORCH_USE_PYTORCH is set but '$py' has torch $have; tch 0.26 needs ${TORCH_VERSION}."
  say "using the torch $have of $py (LIBTORCH_USE_PYTORCH); nothing installed"
  exit 0
fi

link() { # link NAME TARGET: a repo-local symlink, replaced only when it points elsewhere
  local name="$repo/$1" target=$2
  if [[ "$(readlink "$name" 2>/dev/null)" != "$target" ]]; then
    rm -rf "$name"
    ln -s "$target" "$name"
  fi
}

if [[ -f "$stamp" ]]; then
  say "found torch ${TORCH_VERSION} in $venv"
else
  command -v python3 >/dev/null || die "python3 is missing; install Python 3.9+ (e.g. apt-get install python3 python3-venv)."
  say "installing torch ${TORCH_VERSION} and the test packages into $venv"
  say "(about 4.7 GB from the package registry; this takes a few minutes, once)"
  mkdir -p "$cache"
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv" ||
      die "could not create a virtual environment; install python3-venv (apt-get install python3-venv)."
  fi
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on "${PY_PACKAGES[@]}" ||
    die "pip could not install ${PY_PACKAGES[*]}; check that the package registry is reachable and there are ~6 GB free in $cache (or set TCH_FABRIC_CACHE)."
  "$venv/bin/python" - <<PY || die "the installed torch is not usable"
import torch
assert torch.__version__.split("+")[0] == "${TORCH_VERSION}", torch.__version__
assert torch._C._GLIBCXX_USE_CXX11_ABI
PY
  touch "$stamp"
  say "installed torch ${TORCH_VERSION}"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
link .venv "$venv"
link .libtorch "$site/torch"
say "libtorch: $repo/.libtorch -> $site/torch"

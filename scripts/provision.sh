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
#
# --cuda additionally installs the CUDA compiler matching torch's CUDA (nvcc and its headers,
# about 200 MB, into the same venv) for `cargo build --features cuda`. No GPU is needed to build.
set -euo pipefail

with_cuda=0
for arg in "$@"; do
  case "$arg" in
    --cuda) with_cuda=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) printf '[provision] error: unknown argument %s (try --help)\n' "$arg" >&2; exit 2 ;;
  esac
done

TORCH_VERSION=2.13.0
TORCHAO_VERSION=0.18.0
PY_PACKAGES=("torch==${TORCH_VERSION}" "lightning==2.6.*" "safetensors" "numpy")
# torch 2.13.0 is built with CUDA 13.0. The unsuffixed names hold the files (the `-cu13`
# names are empty stubs); the runtime headers (cuda_runtime.h) come with torch itself, in
# nvidia-cuda-runtime.
CUDA_VERSION=13.0
CUDA_PACKAGES=("nvidia-cuda-nvcc==${CUDA_VERSION}.*" "nvidia-nvvm==${CUDA_VERSION}.*"
  "nvidia-cuda-crt==${CUDA_VERSION}.*" "nvidia-cuda-cccl==${CUDA_VERSION}.*")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TCH_FABRIC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-fabric}
venv="$cache/venv-torch-${TORCH_VERSION}"
stamp="$venv/.tch-fabric-complete"
cuda_stamp="$venv/.tch-fabric-cuda-complete"

say() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }

# Gloo's headers (not in the torch wheels) for multi-process data parallelism: build.rs compiles
# against libtorch's ProcessGroupGloo.hpp with them and checks the layout. Debian's libgloo-dev,
# installed here when this runs as root with apt-get; otherwise a hint (the crate then builds
# without multi-process support).
gloo_headers() {
  [[ -n "${TCH_FABRIC_NO_GLOO:-}" ]] && return 0
  [[ -n "${GLOO_INCLUDE_DIR:-}" && -f "$GLOO_INCLUDE_DIR/gloo/context.h" ]] && return 0
  [[ -f /usr/include/gloo/context.h || -f /usr/local/include/gloo/context.h ]] && return 0
  local sudo=()
  if [[ $(id -u) != 0 ]] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  fi
  if [[ ($(id -u) == 0 || ${#sudo[@]} -gt 0) ]] && command -v apt-get >/dev/null; then
    say "installing Gloo's headers (libgloo-dev) for multi-process data parallelism"
    local install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev)
    "${install[@]}" >/dev/null ||
      { "${sudo[@]}" apt-get update -q >/dev/null && "${install[@]}" >/dev/null; } ||
      die "apt-get could not install libgloo-dev; install it, set GLOO_INCLUDE_DIR, or set TCH_FABRIC_NO_GLOO=1 to build without multi-process support"
  else
    say "warning: no Gloo headers; install libgloo-dev (or set GLOO_INCLUDE_DIR) for multi-process data parallelism"
  fi
}

# A user's own libtorch gets no installs; with --cuda it must come with a usable nvcc.
check_user_nvcc() {
  ((with_cuda)) || return 0
  local nvcc=${NVCC:-}
  if [[ -z "$nvcc" ]]; then
    nvcc=$(ls "$(readlink -f "$1")"/../nvidia/cu*/bin/nvcc 2>/dev/null | head -n1) || true
  fi
  [[ -n "$nvcc" && -x "$nvcc" ]] ||
    die "--cuda: no nvcc for your libtorch. Set NVCC=/path/to/nvcc (the CUDA version torch was built with), or install it into the python that owns $1: pip install ${CUDA_PACKAGES[*]}"
  say "nvcc: $nvcc"
}

# LIBTORCH pointing into this script's own venv (or its .libtorch link) is not a user's libtorch.
if [[ -n "${LIBTORCH:-}" && -d "$venv" && "$(readlink -f "$LIBTORCH")" == "$(readlink -f "$venv")"/* ]]; then
  unset LIBTORCH
fi
if [[ -n "${LIBTORCH:-}" ]]; then
  [[ -d "$LIBTORCH/lib" && -d "$LIBTORCH/include" ]] ||
    die "LIBTORCH=$LIBTORCH has no lib/ and include/ below it. Point it at a libtorch ${TORCH_VERSION} folder (e.g. <site-packages>/torch), or unset it to let this script install one."
  say "using your libtorch at LIBTORCH=$LIBTORCH; nothing installed"
  check_user_nvcc "$LIBTORCH"
  gloo_headers
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
  check_user_nvcc "$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  gloo_headers
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

# torchao, for the stochastic-rounding comparison (scripts/bench_rounding.py): without its
# dependencies, which would replace this torch.
if ! "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('torchao') == '${TORCHAO_VERSION}'" 2>/dev/null; then
  say "installing torchao ${TORCHAO_VERSION} (no dependencies: torch stays ${TORCH_VERSION})"
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-deps "torchao==${TORCHAO_VERSION}" ||
    die "pip could not install torchao==${TORCHAO_VERSION}"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Separate stamp: an already provisioned cache gains the compiler without reinstalling torch.
if ((with_cuda)); then
  cu="$site/nvidia/cu${CUDA_VERSION%%.*}"
  if [[ -f "$cuda_stamp" ]]; then
    say "found nvcc in $cu/bin"
  else
    say "installing the CUDA ${CUDA_VERSION} compiler into $venv (about 200 MB, once)"
    "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on "${CUDA_PACKAGES[@]}" ||
      die "pip could not install ${CUDA_PACKAGES[*]}; check that the package registry is reachable."
    # What nvcc needs to compile csrc/ops_cuda.cu against ATen's CUDA headers.
    for f in bin/nvcc nvvm/bin/cicc include/cuda_runtime.h include/crt/host_config.h \
      include/cuda_fp16.h include/cuda_bf16.h include/cccl/cuda/std/type_traits "lib/libcudart.so.${CUDA_VERSION%%.*}"; do
      [[ -e "$cu/$f" ]] || die "the CUDA packages are incomplete: $cu/$f is missing"
    done
    "$cu/bin/nvcc" --version | grep -q "release ${CUDA_VERSION}" ||
      die "$cu/bin/nvcc is not CUDA ${CUDA_VERSION}"
    touch "$cuda_stamp"
    say "installed nvcc: $cu/bin/nvcc"
  fi
fi
link .venv "$venv"
link .libtorch "$site/torch"
say "libtorch: $repo/.libtorch -> $site/torch"
gloo_headers

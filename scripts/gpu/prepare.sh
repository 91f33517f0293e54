#!/usr/bin/env bash
# Builds the GPU check's bundle: tch_fabric's ops library (csrc/ops.cpp, rounding.cpp and their .cu; no
# Rust, no tch) against a given PyTorch, plus scripts/gpu/check.py, in one small folder to
# carry to a GPU machine that has that PyTorch but no Rust and no package registry.
#
#   scripts/gpu/prepare.sh [TORCH_VENV [OUT_DIR]]
#
# TORCH_VENV  a virtual environment (or any prefix with bin/python) whose torch the library is
#             built against; nvcc comes from NVCC, else from that venv's
#             site-packages/nvidia/cu*/bin/nvcc. Default: <cache>/venv-torch-2.11.0, created
#             with torch==2.11.0 and CUDA 13.0's nvcc from the registry when missing (~5 GB),
#             the PyTorch of the GPU machine this check was written for.
# OUT_DIR     default target/gpu-bundle
# CUDA_COMPUTE_CAP  device code to build, default 90 (H100/H200); e.g. 80,90
#
# On the GPU machine: python3 <OUT_DIR>/check.py   (see the README's "GPU check")
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${TCH_FABRIC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tch-fabric}
DEFAULT_TORCH=2.11.0
CUDA_VERSION=13.0
CUDA_PACKAGES=("nvidia-cuda-nvcc==${CUDA_VERSION}.*" "nvidia-nvvm==${CUDA_VERSION}.*"
  "nvidia-cuda-crt==${CUDA_VERSION}.*" "nvidia-cuda-cccl==${CUDA_VERSION}.*")

say() { printf '[gpu/prepare] %s\n' "$*" >&2; }
die() { printf '[gpu/prepare] error: %s\n' "$*" >&2; exit 1; }

venv=${1:-$cache/venv-torch-${DEFAULT_TORCH}}
out=${2:-$repo/target/gpu-bundle}
py="$venv/bin/python"

if [[ -z "${1:-}" && ! -f "$venv/.tch-fabric-gpu-complete" ]]; then
  say "installing torch==${DEFAULT_TORCH} and CUDA ${CUDA_VERSION}'s nvcc into $venv (about 5 GB, once)"
  [[ -x "$py" ]] || python3 -m venv "$venv" || die "could not create $venv (python3-venv missing?)"
  "$py" -m pip install --disable-pip-version-check "torch==${DEFAULT_TORCH}" numpy "${CUDA_PACKAGES[@]}" ||
    die "pip could not install torch==${DEFAULT_TORCH} and ${CUDA_PACKAGES[*]}"
  touch "$venv/.tch-fabric-gpu-complete"
fi
[[ -x "$py" ]] || die "$py not found: TORCH_VENV must hold bin/python with torch installed"

# What to build against, from the venv's own torch.
probe='import os, sysconfig, torch
print(torch.__version__, os.path.dirname(torch.__file__), int(torch._C._GLIBCXX_USE_CXX11_ABI),
      torch.version.cuda, sysconfig.get_paths()["purelib"])'
info=$("$py" -c "$probe") || die "$py cannot import torch"
read -r torch_version torch_dir abi torch_cuda site <<<"$info"
[[ "$torch_cuda" != None ]] || die "torch $torch_version in $venv is a CPU-only build: the CUDA kernels need a CUDA torch"
nvcc=${NVCC:-$(ls "$site"/nvidia/cu*/bin/nvcc 2>/dev/null | head -n1 || true)}
[[ -n "$nvcc" && -x "$nvcc" ]] ||
  die "no nvcc: set NVCC, or install CUDA ${torch_cuda}'s compiler into $venv: $py -m pip install ${CUDA_PACKAGES[*]//${CUDA_VERSION}/${torch_cuda}}"
cudart=$(ls "$site"/nvidia/cu*/lib/libcudart.so.[0-9]* "$(dirname "$nvcc")"/../lib*/libcudart.so.[0-9]* 2>/dev/null |
  grep -E 'libcudart\.so\.[0-9]+$' | head -n1 || true)
[[ -n "$cudart" ]] || die "no libcudart.so.<major> next to torch or nvcc"

caps=${CUDA_COMPUTE_CAP:-90}
gencode=()
for c in ${caps//,/ }; do gencode+=("-gencode=arch=compute_${c},code=sm_${c}"); done
max=$(tr ', ' '\n\n' <<<"$caps" | sort -n | tail -n1)
gencode+=("-gencode=arch=compute_${max},code=compute_${max}")

mapfile -t nvcc_flags < <(grep -vE '^\s*(#|$)' "$repo/csrc/nvcc.flags")
includes=("-I$torch_dir/include" "-I$torch_dir/include/torch/csrc/api/include")
# -fopenmp and -fno-math-errno as in build.rs: at::parallel_for in ops.cpp is OpenMP underneath,
# and the AdamW kernel's sqrt vectorises only without errno.
common=(-std=c++17 -O3 -fPIC -fopenmp -fno-math-errno "-D_GLIBCXX_USE_CXX11_ABI=$abi" -DGLOG_USE_GLOG_EXPORT)
obj=$(mktemp -d)
trap 'rm -rf "$obj"' EXIT

say "torch $torch_version (CUDA $torch_cuda) at $torch_dir"
say "nvcc $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'): $nvcc; device code: ${gencode[*]}"
t0=$SECONDS
# The C++ and CUDA compiles run side by side (nvcc takes about a minute a file on 2 cores).
# The same sources as build.rs and build_cuda.rs.
( for f in ops rounding; do
    "${CXX:-g++}" "${common[@]}" -w "${includes[@]}" -c "$repo/csrc/$f.cpp" -o "$obj/$f.o" || exit 1
  done ) &
cxx_pid=$!
for f in ops_cuda rounding_cuda; do
  "$nvcc" "${nvcc_flags[@]}" "-D_GLIBCXX_USE_CXX11_ABI=$abi" "${includes[@]}" "${gencode[@]}" \
    -c "$repo/csrc/$f.cu" -o "$obj/$f.o" || die "nvcc failed on csrc/$f.cu"
done
wait "$cxx_pid" || die "compiling csrc/ops.cpp or csrc/rounding.cpp failed"

# No rpath: on the GPU machine `import torch` has already loaded libtorch, c10 and the CUDA
# runtime (the same sonames) before check.py loads the library.
mkdir -p "$out"
rm -f "$out/libtch_fabric_ops.so"
"${CXX:-g++}" -shared -fopenmp -o "$out/libtch_fabric_ops.so" "$obj"/ops.o "$obj"/rounding.o \
  "$obj"/ops_cuda.o "$obj"/rounding_cuda.o \
  -L"$torch_dir/lib" -ltorch_cpu -lc10 -lc10_cuda -L"$(dirname "$cudart")" "-l:$(basename "$cudart")" ||
  die "linking the ops library failed"
strip --strip-unneeded "$out/libtch_fabric_ops.so"
cp "$repo/scripts/gpu/check.py" "$out/check.py"
cat >"$out/BUILD_INFO" <<EOF
bundle: tch-fabric $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ -z "$(git -C "$repo" status --porcelain -- csrc scripts/gpu 2>/dev/null)" ]] || echo '+changes'), built $(date -u +%FT%TZ)
built against: torch $torch_version (CUDA $torch_cuda), nvcc $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), ${gencode[*]}
EOF
say "built in $((SECONDS - t0)) s: $out ($(du -sh "$out" | cut -f1)):"
ls -l "$out" >&2

#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a result:
#   ./setup-and-run.sh demo   installs what is missing, builds, runs the main job (a layer built,
#                             planned, run, checked against the reference, timed; DOT and trace written to out/)
#   ./setup-and-run.sh test   installs what is missing, builds, runs every test (CTest)
# Environment: BUILD_DIR (default build), MOEFLOW_REQUIRE_CUDA=1 (fail unless the CUDA backend is built).
set -euo pipefail
mode=${1:-}
[[ $mode == demo || $mode == test ]] || { echo "usage: $0 demo|test" >&2; exit 2; }
cd "$(dirname "$0")"
build=${BUILD_DIR:-build}

packages=(build-essential cmake ninja-build pkg-config libtbb-dev libopenblas-dev libgraphviz-dev graphviz
          libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev libopenmpi-dev openmpi-bin)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CUTLASS / CuTe headers for the CUDA backend's grouped GEMMs: NVIDIA's nvidia-cutlass wheel from
# PyPI (pure Python plus the C++ headers), unpacked into cutlass/ (ignored by git). Skipped where
# there is no nvcc or the headers are already there; CMake finds them there (or at CUTLASS_DIR).
cutlass_version=4.2.0.0
if { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; } && [[ ! -f cutlass/include/cutlass/cutlass.h ]]; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$wheel_dir" "nvidia-cutlass==$cutlass_version"
  python3 - "$wheel_dir" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("nvidia_cutlass-*.whl"))
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = pathlib.Path("cutlass/include") / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PY
  rm -rf "$wheel_dir"
  echo "CUTLASS $cutlass_version headers unpacked into cutlass/include"
fi

cuda_flag=()
if [[ ${MOEFLOW_REQUIRE_CUDA:-0} == 1 ]]; then cuda_flag=(-DMOEFLOW_CUDA=ON); fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" >/dev/null
if [[ ${MOEFLOW_REQUIRE_CUDA:-0} == 1 ]] && ! grep -q '^MOEFLOW_CUDA:BOOL=ON' "$build/CMakeCache.txt"; then
  echo "error: MOEFLOW_REQUIRE_CUDA=1 but the CUDA backend is not enabled in $build" >&2; exit 1
fi
grep -E '^MOEFLOW_(CUDA|MPI):BOOL' "$build/CMakeCache.txt"
jobs=$(nproc)
cmake --build "$build" -j"$jobs"

if [[ $mode == test ]]; then
  ctest --test-dir "$build" --output-on-failure -j"$jobs"
  exit
fi

model=qwen1.5-moe-a2.7b
mkdir -p out
"$build/moeflow" run --model $model --tokens 64 --plan concurrent --check --trace out/run.json
"$build/moeflow" dot --model $model --max-tokens 64 -o out/graph.dot
"$build/moeflow" plan --model $model --max-tokens 64 --plan concurrent -o out/plan.dot
dot -Tsvg out/graph.dot -o out/graph.svg
dot -Tsvg out/plan.dot -o out/plan.svg
"$build/moeflow" trace out/run.json --svg out/timeline.svg
echo "written: out/graph.dot out/graph.svg out/plan.dot out/plan.svg out/run.json out/timeline.svg"

#!/usr/bin/env bash
# Create .venv with the exact, pinned stack. Idempotent: a second run with nothing changed
# returns in well under a second and rebuilds nothing.
#
#   scripts/bootstrap.sh            # create or refresh .venv
#   scripts/bootstrap.sh --dry-run  # preflight only: say what a run would do (and which CUDA
#                                   # compiler would build TE), change nothing
#
# Environment:
#   HARNESS_PYTHON      python3.12 to use (default: python3.12 on PATH, then pyenv's 3.12.*)
#   HARNESS_WHEELHOUSE  every wheel of the lock, plus the locally built Transformer Engine wheel
#                       (default: ~/.cache/harness/wheels; cache this folder in CI: with it a
#                       fresh .venv needs no network and no TE build)
#   HARNESS_MIN_FREE_GIB  free space a new .venv needs on its disk (default 14: the torch CUDA
#                       wheels unpacked); the repo's own tests set it to 0 to run anywhere
#   CUDA_HOME           CUDA toolkit used to build TE's torch extension. Default: the toolkit of the
#                       nvcc on PATH, then /usr/local/cuda. With no toolkit at all, the CUDA compiler
#                       packages of requirements/cuda-build.lock.txt (nvcc and its headers, from the
#                       package index, cached in the wheelhouse) go into a temporary build-only venv
#                       that is CUDA_HOME for that one build.
#
# Why this is not a plain `pip install -r`: megatron-bridge's declared dependencies include
# CUDA-only packages that do not build here (fast-hadamard-transform, flashinfer, ...), so the
# whole lock is installed with --no-deps; and transformer-engine-torch ships only as an sdist,
# built once with a CUDA compiler (no GPU needed) and kept in the wheelhouse.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOCK="$ROOT/requirements/lock.txt"
CUDA_LOCK="$ROOT/requirements/cuda-build.lock.txt"  # the CUDA compiler where there is no toolkit
TE_VERSION="$(sed -n 's/^transformer_engine==//p' "$LOCK")"
TORCH_VERSION="$(sed -n 's/^torch==//p' "$LOCK")"  # the TE torch extension is built against exactly this torch
WHEELHOUSE="${HARNESS_WHEELHOUSE:-$HOME/.cache/harness/wheels}"
TE_HOUSE="$WHEELHOUSE/te-${TE_VERSION}-torch${TORCH_VERSION}-cp312"  # built here, keyed by what it links
STAMP="$VENV/.bootstrap-stamp"
NEED_GIB="${HARNESS_MIN_FREE_GIB:-14}"

die() { echo "bootstrap: error: $*" >&2; exit 1; }
say() { echo "bootstrap: $*" >&2; }

DRY_RUN=0
case "$*" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) die "unknown arguments '$*' (usage: scripts/bootstrap.sh [--dry-run])" ;;
esac

fingerprint() {
  cat "$LOCK" "$CUDA_LOCK" "$ROOT/scripts/bootstrap.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" && -x "$VENV/bin/python" ]]; then
  if (( DRY_RUN )); then say "$VENV is up to date: nothing to do"; fi
  exit 0  # up to date
fi

# --- preflight: each failure is one actionable line ------------------------------------------
find_python() {
  local c
  for c in "${HARNESS_PYTHON:-}" "$(command -v python3.12 || true)" \
           "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -n1)"; do
    if [[ -n "$c" && -x "$c" ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
PY="$(find_python)" || die "Python 3.12 not found: install it (e.g. 'pyenv install 3.12') or set HARNESS_PYTHON=/path/to/python3.12"

if [[ ! -d "$VENV" ]]; then
  avail_kib=$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')
  if (( avail_kib < NEED_GIB * 1024 * 1024 )); then
    die "need ${NEED_GIB} GiB free on $(df -P "$ROOT" | awk 'NR==2 {print $6}') for .venv (torch CUDA wheels), have $((avail_kib / 1024 / 1024)) GiB: free space and rerun"
  fi
fi

te_wheel() { ls "$TE_HOUSE"/transformer_engine_torch-"$TE_VERSION"-*.whl 2>/dev/null | head -n1; }

# The CUDA compiler for the one-time TE build (none when the wheelhouse has the TE wheel): a CUDA
# toolkit where there is one ($CUDA_HOME, else the nvcc on PATH, else /usr/local/cuda when CUDA_HOME
# is unset); else the pinned compiler packages of requirements/cuda-build.lock.txt, installed into a
# temporary build-only venv (never into .venv) whose nvidia/cu<major> folder is CUDA_HOME for the
# build, removed when this script exits.
toolkit_of() {  # the toolkit root of an nvcc; a wrapper script (/usr/local/bin/nvcc) is asked where it runs from
  local here
  here="$("$1" --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)" || true
  [[ -n "$here" && -x "$here/nvcc" ]] || here="$(dirname "$(readlink -f "$1")")"
  (cd "$here/.." && pwd)
}
wheel_in_house() {  # a "name==version" pin -> its wheel in the wheelhouse, if there
  ls "$WHEELHOUSE/$(echo "${1%%==*}" | tr 'A-Z-' 'a-z_')-${1#*==}-"*.whl 2>/dev/null | head -n1
}
build_pip() { "$BUILD_ENV/bin/python" -m pip --disable-pip-version-check "$@" >>"$BUILD_ENV/pip.log" 2>&1; }
pip_error() { grep -m1 '^ERROR' "$BUILD_ENV/pip.log" | cut -c1-240; }

TE_CUDA=""      # CUDA_HOME for the TE build
BUILD_ENV=""    # the build-only venv, when TE_CUDA is in it
trap '[[ -z "$BUILD_ENV" ]] || rm -rf "$BUILD_ENV"' EXIT
build="$( ((DRY_RUN)) && echo "would build" || echo "will build") transformer-engine-torch $TE_VERSION with"
if [[ -n "$(te_wheel)" ]]; then
  if (( DRY_RUN )); then say "would install the prebuilt transformer-engine-torch wheel $(te_wheel) (no CUDA compiler needed)"; fi
elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  TE_CUDA="$CUDA_HOME"
  say "$build the CUDA toolkit at $TE_CUDA (CUDA_HOME)"
elif nvcc_bin="$(command -v nvcc)"; then
  TE_CUDA="$(toolkit_of "$nvcc_bin")"
  say "$build the CUDA toolkit at $TE_CUDA (nvcc on PATH: $nvcc_bin${CUDA_HOME:+; CUDA_HOME=$CUDA_HOME has no bin/nvcc})"
elif [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  TE_CUDA=/usr/local/cuda
  say "$build the CUDA toolkit at $TE_CUDA"
else
  no_toolkit="no CUDA toolkit (no nvcc in $([[ -n "${CUDA_HOME:-}" ]] && echo "CUDA_HOME=$CUDA_HOME/bin" || echo /usr/local/cuda/bin) or on PATH)"
  mapfile -t pins < <(grep -E '^[A-Za-z0-9_.-]+==' "$CUDA_LOCK")
  missing=()
  for pin in "${pins[@]}"; do [[ -n "$(wheel_in_house "$pin")" ]] || missing+=("$pin"); done
  if (( DRY_RUN )); then
    say "$build the pinned CUDA compiler packages in a build-only venv: $no_toolkit; requirements/cuda-build.lock.txt: ${pins[*]} (${#missing[@]} to fetch into $WHEELHOUSE)"
  else
    say "$build the pinned CUDA compiler packages (requirements/cuda-build.lock.txt) in a build-only venv: $no_toolkit"
    BUILD_ENV="$(mktemp -d "${TMPDIR:-/tmp}/harness-cuda-build.XXXXXX")"
    "$PY" -m venv "$BUILD_ENV" >"$BUILD_ENV.log" 2>&1 && rm -f "$BUILD_ENV.log" \
      || die "$PY -m venv $BUILD_ENV failed (see $BUILD_ENV.log): install Python's venv module (e.g. apt-get install python3.12-venv)"
    if (( ${#missing[@]} )); then
      say "fetching ${missing[*]} into $WHEELHOUSE"
      mkdir -p "$WHEELHOUSE"
      build_pip download --no-deps --only-binary :all: -d "$WHEELHOUSE" "${missing[@]}" \
        || die "$no_toolkit, and pip cannot fetch the CUDA compiler packages of requirements/cuda-build.lock.txt ($(pip_error)): set CUDA_HOME to a CUDA toolkit, let pip reach the package index, or put a prebuilt wheel in $TE_HOUSE"
    fi
    build_pip install --no-deps --no-index --find-links "$WHEELHOUSE" -r "$CUDA_LOCK" \
      || die "installing requirements/cuda-build.lock.txt into the build-only venv failed ($(pip_error)): delete its wheels from $WHEELHOUSE and rerun"
    TE_CUDA="$(ls -d "$BUILD_ENV"/lib/python3.12/site-packages/nvidia/cu[0-9]*/bin/nvcc 2>/dev/null | head -n1)"
    [[ -n "$TE_CUDA" ]] || die "requirements/cuda-build.lock.txt installed no nvidia/cu<major>/bin/nvcc: it must pin nvidia-cuda-nvcc"
    TE_CUDA="${TE_CUDA%/bin/nvcc}"
  fi
fi
if (( DRY_RUN )); then
  say "would $([[ -d "$VENV" ]] && echo refresh || echo create) $VENV with $("$PY" --version) and the $(grep -c '==' "$LOCK") pins of requirements/lock.txt"
  exit 0
fi

# --- install -----------------------------------------------------------------------------------
mkdir -p "$VENV"
LOG="$VENV/bootstrap.log"
say "setting up $VENV with $("$PY" --version) (log: $LOG)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
pip_q() { "$VPY" -m pip --disable-pip-version-check "$@" >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "pip $* failed (full log: $LOG)"; }; }

start=$(date +%s)
mkdir -p "$WHEELHOUSE"
say "fetching missing wheels of the lock into $WHEELHOUSE"
pip_q download --no-deps -d "$WHEELHOUSE" -r "$LOCK"
say "installing the locked stack ($(grep -c '==' "$LOCK") pinned packages)"
pip_q install --no-deps --no-index --find-links "$WHEELHOUSE" -r "$LOCK"

if [[ -z "$(te_wheel)" ]]; then
  # The extension must be built with the CUDA major torch was built with.
  torch_cuda="$("$VPY" -c 'import torch; print(torch.version.cuda)')"
  nvcc_cuda="$("$TE_CUDA/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
  if [[ "${torch_cuda%%.*}" != "${nvcc_cuda%%.*}" ]]; then
    if [[ -n "$BUILD_ENV" ]]; then
      die "torch $TORCH_VERSION was built with CUDA $torch_cuda but requirements/cuda-build.lock.txt pins nvcc $nvcc_cuda: repin it to CUDA ${torch_cuda%%.*}"
    fi
    die "torch $TORCH_VERSION was built with CUDA $torch_cuda but the toolkit at $TE_CUDA is CUDA $nvcc_cuda: set CUDA_HOME to a CUDA ${torch_cuda%%.*} toolkit"
  fi
  say "building transformer-engine-torch $TE_VERSION from source with nvcc $nvcc_cuda at $TE_CUDA (one time, 10-30 min on 2 cores)"
  SP="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$TE_HOUSE"
  NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE CUDA_HOME="$TE_CUDA" MAX_JOBS="${MAX_JOBS:-2}" \
  CPATH="$SP/nvidia/nccl/include:$SP/nvidia/cu13/include:$SP/nvidia/cudnn/include${CPATH:+:$CPATH}" \
    pip_q wheel --no-deps --no-build-isolation --no-cache-dir -w "$TE_HOUSE" "transformer-engine-torch==$TE_VERSION"
  if [[ -n "$BUILD_ENV" ]]; then rm -rf "$BUILD_ENV"; BUILD_ENV=""; say "removed the build-only CUDA venv"; fi
fi
pip_q install --no-deps "$(te_wheel)"
pip_q install --no-deps --no-build-isolation -e "$ROOT"

say "checking imports"
"$VPY" -c 'import torch, transformer_engine.pytorch, megatron.core, megatron.bridge, transformers, harness' >>"$LOG" 2>&1 \
  || { tail -n 30 "$LOG" >&2; die "the stack does not import (see $LOG)"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # A GPU machine (the nightly GPU lane): TE's torch extension must run on this machine's GPU with
  # this torch, not just import.
  say "checking Transformer Engine on $(nvidia-smi -L | head -n1)"
  "$VPY" -c 'import torch, transformer_engine.pytorch as te
assert torch.cuda.is_available(), "torch sees no GPU"
y = te.Linear(64, 64).cuda()(torch.randn(8, 64, device="cuda"))
torch.cuda.synchronize(); print("TE ok:", tuple(y.shape), torch.__version__, torch.version.cuda)' >>"$LOG" 2>&1 \
    || { tail -n 30 "$LOG" >&2; die "Transformer Engine does not run on this GPU with torch $TORCH_VERSION (see $LOG): delete $TE_HOUSE and rerun to rebuild it here"; }
fi

fingerprint >"$STAMP"
say "ready in $(( $(date +%s) - start ))s"

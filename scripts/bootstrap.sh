#!/usr/bin/env bash
# Create .venv with the exact, pinned stack. Idempotent: a second run with nothing changed
# returns in well under a second and rebuilds nothing.
#
#   scripts/bootstrap.sh            # create or refresh .venv
#
# Environment:
#   HARNESS_PYTHON      python3.12 to use (default: python3.12 on PATH, then pyenv's 3.12.*)
#   HARNESS_WHEELHOUSE  every wheel of the lock, plus the locally built Transformer Engine wheel
#                       (default: ~/.cache/harness/wheels; cache this folder in CI: with it a
#                       fresh .venv needs no network and no TE build)
#   CUDA_HOME           CUDA toolkit used to build TE's torch extension (default: /usr/local/cuda)
#
# Why this is not a plain `pip install -r`: megatron-bridge's declared dependencies include
# CUDA-only packages that do not build here (fast-hadamard-transform, flashinfer, ...), so the
# whole lock is installed with --no-deps; and transformer-engine-torch ships only as an sdist,
# built once with the CUDA toolkit (no GPU needed) and kept in the wheelhouse.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOCK="$ROOT/requirements/lock.txt"
TE_VERSION="$(sed -n 's/^transformer_engine==//p' "$LOCK")"
TORCH_VERSION="$(sed -n 's/^torch==//p' "$LOCK")"  # the TE torch extension is built against exactly this torch
WHEELHOUSE="${HARNESS_WHEELHOUSE:-$HOME/.cache/harness/wheels}"
TE_HOUSE="$WHEELHOUSE/te-${TE_VERSION}-torch${TORCH_VERSION}-cp312"  # built here, keyed by what it links
STAMP="$VENV/.bootstrap-stamp"
NEED_GIB=14

die() { echo "bootstrap: error: $*" >&2; exit 1; }
say() { echo "bootstrap: $*" >&2; }

fingerprint() {
  cat "$LOCK" "$ROOT/scripts/bootstrap.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" && -x "$VENV/bin/python" ]]; then
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

te_wheel() { ls "$TE_HOUSE"/transformer_engine_torch-"$TE_VERSION"-*.whl 2>/dev/null | head -n1; }

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [[ -z "$(te_wheel)" && ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  die "building transformer-engine-torch $TE_VERSION needs the CUDA toolkit (no GPU needed): install it and set CUDA_HOME (no nvcc at $CUDA_HOME/bin/nvcc), or put a prebuilt wheel in $TE_HOUSE"
fi

if [[ ! -d "$VENV" ]]; then
  avail_kib=$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')
  if (( avail_kib < NEED_GIB * 1024 * 1024 )); then
    die "need ${NEED_GIB} GiB free on $(df -P "$ROOT" | awk 'NR==2 {print $6}') for .venv (torch CUDA wheels), have $((avail_kib / 1024 / 1024)) GiB: free space and rerun"
  fi
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
  say "building transformer-engine-torch $TE_VERSION from source (one time, ~10 min on 2 cores)"
  SP="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$TE_HOUSE"
  NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE CUDA_HOME="$CUDA_HOME" MAX_JOBS="${MAX_JOBS:-2}" \
  CPATH="$SP/nvidia/nccl/include:$SP/nvidia/cu13/include:$SP/nvidia/cudnn/include${CPATH:+:$CPATH}" \
    pip_q wheel --no-deps --no-build-isolation --no-cache-dir -w "$TE_HOUSE" "transformer-engine-torch==$TE_VERSION"
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

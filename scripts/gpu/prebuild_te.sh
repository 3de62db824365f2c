#!/usr/bin/env bash
# Build Transformer Engine's torch extension HERE, for the lent GPU machine's torch, so the device
# does not spend ~104 s of its ~15 minutes compiling it (../shared/notes/gpu-lane-findings.md).
#
#   ../shared/gpu/stage.sh && scripts/gpu/prebuild_te.sh        # from the project root, after staging
#
# Writes .gpu/prebuilt/ (git-ignored with .gpu/): the extension's .so and BUILT_FOR, the torch
# version and git commit it was compiled against. scripts/gpu/install.sh uses it on the device
# only where that torch is exactly the one there, and builds from the sdist otherwise.
# Needs: the CUDA toolkit (nvcc) and .venv (its nvidia-* packages give the headers and libraries
# torch loads); torch itself is downloaded at the device's version (TORCH, default below).
set -euo pipefail
ROOT=$(pwd)
[[ -f $ROOT/.gpu/base/te-core.sha256 ]] || { echo "prebuild_te.sh: run ../shared/gpu/stage.sh from the project root first" >&2; exit 2; }
TORCH=${TORCH:-2.11.0}            # the offline GPU image's torch (2.11.0+cu130; ../shared/gpu/preinstalled.txt)
ARCHS=${NVTE_CUDA_ARCHS:-90}      # H100 / H200
PY=$ROOT/.venv/bin/python
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
WORK=$(mktemp -d /tmp/prebuild-te.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$WORK/dl" "torch==$TORCH"
"$PY" -m pip install -q --no-deps --no-compile --target "$WORK/torch" "$WORK"/dl/torch-*.whl
export PYTHONPATH=$WORK/torch   # ahead of .venv's own torch; .venv's nvidia-* libraries still load
"$PY" -c 'import torch; print("prebuild_te.sh: building against torch", torch.__version__, torch.version.git_version)'

t0=$(date +%s)
NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=$ARCHS MAX_JOBS=${MAX_JOBS:-2} \
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
CPATH="$SP/nvidia/nccl/include:$SP/nvidia/cu13/include:$SP/nvidia/cudnn/include${CPATH:+:$CPATH}" \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$WORK/wheel" \
  "$ROOT"/.gpu/base/transformer_engine_torch-*.tar.gz
echo "prebuild_te.sh: built in $(( $(date +%s) - t0 )) s"

rm -rf "$ROOT/.gpu/prebuilt" && mkdir -p "$ROOT/.gpu/prebuilt"
(cd "$WORK" && unzip -q -o wheel/*.whl 'transformer_engine/wheel_lib/transformer_engine_torch*.so' -d so)
cp "$WORK"/so/transformer_engine/wheel_lib/transformer_engine_torch*.so "$ROOT/.gpu/prebuilt/"
"$PY" -c 'import torch; print(torch.__version__, torch.version.git_version)' >"$ROOT/.gpu/prebuilt/BUILT_FOR"
echo "sm_$ARCHS" >>"$ROOT/.gpu/prebuilt/BUILT_FOR"
ls -la "$ROOT/.gpu/prebuilt"

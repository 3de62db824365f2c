#!/usr/bin/env bash
# On the lent GPU machine, from the project root: install the staged stack into /tmp/site.
#
# The same steps as ../shared/gpu/setup.sh (which stage.sh copies to .gpu/base/setup.sh), except
# that Transformer Engine's torch extension comes prebuilt (scripts/gpu/prebuild_te.sh, copied to
# /tmp/stage/prebuilt/) where it was compiled against exactly this machine's torch, which saves
# the ~104 s build. Anything else (no prebuilt, another torch, an import that fails) falls back
# to setup.sh, which builds the extension here. Idempotent, like setup.sh.
set -euo pipefail
shopt -s nullglob
B=$PWD/.gpu/base
S=/tmp/stage
P=$S/prebuilt
say() { echo "install.sh: $*"; }

if [[ -f /tmp/site/.ready ]]; then
  say "/tmp/site is ready"
elif [[ -f $P/BUILT_FOR && -n $(echo "$P"/transformer_engine_torch*.so) ]] \
     && [[ $(python3 -c 'import torch; print(torch.__version__, torch.version.git_version)') == "$(head -1 "$P/BUILT_FOR")" ]]; then
  CORE="$S/$(awk '{print $2}' "$B/te-core.sha256" | xargs basename)"
  [[ -f $CORE ]] || cat "$S"/tepart.* >"$CORE"
  sha256sum -c "$B/te-core.sha256" || { say "TE core wheel incomplete: copy all five .gpu/teN parts first" >&2; exit 2; }
  # One pip call for every wheel (they share transformer_engine/; see setup.sh).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$B"/wheels/*.whl "$S"/extra/*.whl "$CORE" 2>&1 | { grep -v 'already exists' || true; }
  cp "$P"/transformer_engine_torch*.so /tmp/site/transformer_engine/wheel_lib/
  if PYTHONPATH=/tmp/site python3 -c 'import torch, transformer_engine.pytorch as te
x = torch.randn(16, 16, device="cuda"); te.Linear(16, 16)(x); torch.cuda.synchronize()'; then
    touch /tmp/site/.ready
    say "prebuilt TE torch extension ($(tail -1 "$P/BUILT_FOR")) imports and runs a TE Linear"
  else
    say "the prebuilt extension failed here; building it (setup.sh)"
    rm -f /tmp/site/transformer_engine/wheel_lib/transformer_engine_torch*.so
  fi
else
  say "no prebuilt extension for this torch ($(python3 -c 'import torch; print(torch.__version__)')); setup.sh builds it"
fi
exec bash "$B/setup.sh"  # builds only where /tmp/site/.ready is missing; always checks the imports

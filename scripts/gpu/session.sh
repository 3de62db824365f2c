#!/usr/bin/env bash
# One prepared GPU session: what the GPU lane still needs measured, in priority order, inside one
# device call. Run from the project root on the lent machine, after the staging calls
# (README, "The GPU lane"):
#
#   bash scripts/gpu/session.sh [PHASE ...]        # default: setup probe ws1 selftest shared
#
# Phases:
#   setup     scripts/gpu/install.sh: the staged stack into /tmp/site, once (~1 min with the TE
#             extension prebuilt by scripts/gpu/prebuild_te.sh, ~3 min when setup.sh must build it)
#   probe     scripts/gpu/probe_collectives.py: NCCL and gloo with 2 ranks on one GPU, gloo with 4
#   ws1       python3 -m pytest -m gpu: every GPU case this machine can hold (world size 1)
#   selftest  python3 -m harness selftest --lane gpu
#   shared    the default set's 2- and 4-rank GPU cases with --ranks-per-gpu 2 / 4 (gloo transport)
#   golden    harness golden update from every run above (candidates for golden/gpu, to review)
#
# A phase that would start after DEADLINE_S seconds (default 540) is skipped, and a running one is
# stopped at its own limit, so the call returns inside the tool's 600 s and $OUT comes back. Set
# DEADLINE_S to the device time left minus a minute where that is less (device `status`):
#   $OUT/session.log         everything printed, phase by phase, with timings
#   $OUT/artifacts.tar.gz    probe JSON, each run folder (results.json, summary.md, junit.xml,
#                            cases/, provenance/, logs/; no checkpoints), and gpu/: the golden/gpu
#                            candidates (review them before committing any)
set -uo pipefail
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-540}
JOBS=${JOBS:-4}
PY=${PY:-python3}  # the device image's interpreter; the stack is on PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ART=${ART:-/tmp/gpu-session}  # run folders and probe results, packed into $OUT
mkdir -p "$ART/probe"
export HARNESS_REPORTS=$ART/reports HARNESS_GOLDEN=${HARNESS_GOLDEN:-$PWD/golden} PYTHONPATH=/tmp/site:$PWD NVIDIA_TF32_OVERRIDE=0 PYTHONUNBUFFERED=1
LOG=$OUT/session.log
PHASES=("$@")
[[ ${#PHASES[@]} -gt 0 ]] || PHASES=(setup probe ws1 selftest shared golden)

# pack: $OUT/artifacts.tar.gz, replaced atomically after every phase, so a call the device tool
# stops at its time limit still returns everything finished before (session.log is written as it goes).
pack() {
  local golden=()
  [[ -d $HARNESS_GOLDEN/gpu ]] && golden=(-C "$HARNESS_GOLDEN" gpu)
  tar -czf "$OUT/.artifacts.tmp" --exclude='*/scratch' -C / "${ART#/}" "${golden[@]}" 2>>"$LOG" \
    && mv "$OUT/.artifacts.tmp" "$OUT/artifacts.tar.gz"
}

say() { echo "[session +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run_phase NAME LIMIT_S COMMAND...: the command's output into the log, stopped at LIMIT_S or at the deadline.
run_phase() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  if (( left < 30 )); then say "$name: SKIPPED, ${left}s left before the deadline"; return 0; fi
  (( limit > left )) && limit=$left
  say "$name: start (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG"  # bash -c: phases may be functions
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc in $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (stopped at its limit)')"
  pack
}

probe() {  # probe NAME BACKEND RANKS RANKS_PER_GPU
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$3" scripts/gpu/probe_collectives.py \
    --backend "$2" --ranks-per-gpu "$4" --json "$ART/probe/$1.json"
}

shared() {  # shared WORLD_SIZE: the default set's GPU cases of that world size, all on one GPU
  local ids
  ids=$("$PY" -c "import sys; from harness.matrix.cases import load_cases
print(' '.join(c.id for c in load_cases().select(lane='gpu', set_name='default') if c.world_size == int(sys.argv[1]) and not c.invalid_reason))" "$1") || return 2
  [[ -n $ids ]] || { echo "no default GPU case of world size $1"; return 0; }
  # shellcheck disable=SC2086  # one word per case ID
  "$PY" -m harness run --lane gpu --ranks-per-gpu "$1" --jobs "$(( JOBS / $1 > 0 ? JOBS / $1 : 1 ))" --label "shared-ws$1" $ids
}
export -f probe shared
export ART JOBS PY

say "phases: ${PHASES[*]}; deadline ${DEADLINE_S}s; jobs $JOBS; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
for phase in "${PHASES[@]}"; do
  case $phase in
    setup) run_phase setup 300 bash scripts/gpu/install.sh ;;
    probe)
      run_phase probe-nccl-2-on-1 60 probe nccl-2-on-1 nccl 2 2
      run_phase probe-gloo-2-on-1 60 probe gloo-2-on-1 gloo 2 2
      run_phase probe-gloo-4-on-1 60 probe gloo-4-on-1 gloo 4 4 ;;
    ws1) run_phase ws1 330 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rfEsx --harness-jobs "$JOBS" \
           --junitxml "$ART/pytest-gpu-junit.xml" ;;
    selftest) run_phase selftest 240 "$PY" -m harness selftest --lane gpu --jobs "$JOBS" ;;
    shared)
      run_phase shared-ws2 240 shared 2
      run_phase shared-ws4 120 shared 4 ;;
    golden)
      for run in "$HARNESS_REPORTS"/*/; do
        [[ -L ${run%/} ]] && continue  # reports/latest
        [[ -f $run/results.json ]] && run_phase "golden $(basename "$run")" 30 "$PY" -m harness golden update --run "$run"
      done ;;
    *) say "unknown phase $phase (setup probe ws1 selftest shared golden)" ;;
  esac
done

pack  # once more, with everything
say "artifacts: $(du -h "$OUT/artifacts.tar.gz" | cut -f1) in $OUT/artifacts.tar.gz"

#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keep a run going on a Spot/preemptible TPU VM: poll the VM's state and, when it is PREEMPTED, TERMINATED or gone,
# delete and recreate it, rerun setup + sync, and rerun launch/run.sh --detach with the same --config and
# --workdir. pal_jax resumes from the last checkpoint in the workdir, so the rerun continues the run.
#
#   launch/babysit.sh --name=NAME --zone=ZONE --accelerator_type=TYPE --runtime_version=VERSION
#                     --config=configs/MODE.py[:PRESET] --workdir=gs://BUCKET/PATH [--project=PROJECT]
#                     [--spot | --preemptible] [--queued] [--python=python3.11] [--config.KEY=VALUE ...]
#                     [--poll_interval=300] [--max_restarts=10] [--dry_run [--simulate_state=PREEMPTED]]
#                     [-- EXTRA pal_jax.main FLAGS]
#
# Each poll (every --poll_interval seconds):
#   state PREEMPTED, TERMINATED or missing (with --queued: the queued resource SUSPENDED, FAILED or missing)
#       -> stop.sh (delete; skipped when missing), create.sh, setup.sh, sync.sh, run.sh --detach
#   state READY -> ask worker 0 about the run (launch/common.sh RUN_STATUS_CMD):
#       running -> wait; finished with status 0 and the VM still READY a little later (up to 60 s: a SIGTERM
#       before a preemption also ends a run with 0) -> exit 0 (done);
#       never started, exited non-zero, or exited after a SIGTERM checkpoint ("preempted: True") -> run.sh --detach
#   any other state (CREATING, STARTING, REPAIRING, a queued resource still WAITING_FOR_RESOURCES, ...) -> wait
# --max_restarts bounds the recreations plus reruns (the first start of the run is not counted); past it the
# babysitter exits 1. A failed recreation (say, no capacity) is retried at the next poll and counts too.
# --dry_run prints one poll's commands and exits; --simulate_state (default READY) is the state it pretends to
# read, e.g. --simulate_state=PREEMPTED shows the whole recreate sequence.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args babysit "$@"
require name zone accelerator_type runtime_version config workdir
check_workdir
default poll_interval 300
default max_restarts 10
require_int poll_interval
require_int max_restarts
if [[ -n ${ARG[simulate_state]:-} ]] && ! is_dry_run; then die "--simulate_state needs --dry_run"; fi
default simulate_state READY
ARG[simulate_state]=${ARG[simulate_state]^^}
tpu_flags
name=${ARG[name]}
restarts=0
launched=0

log() {
  if is_dry_run; then note "$*"; else note "$(date -u +%FT%TZ) $*"; fi
}

# query SIMULATED CMD...: runs a gcloud command and sets QUERY to the last line it printed, MISSING when gcloud
# says NOT_FOUND, UNKNOWN on any other failure; with --dry_run prints the command and sets QUERY=SIMULATED.
query() {
  local simulated=$1 out err
  shift
  if is_dry_run; then
    run_cmd "$@"
    QUERY=$simulated
    return 0
  fi
  err=$(mktemp)
  if out=$(run_cmd "$@" 2>"$err"); then
    QUERY=$(printf '%s\n' "$out" | tail -n 1)
    QUERY=${QUERY:-UNKNOWN}
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    QUERY=MISSING
  else
    QUERY=UNKNOWN
    log "query failed: $(tail -n 1 "$err")"
  fi
  rm -f "$err"
}

vm_state() {  # -> STATE
  local sim=${ARG[simulate_state]} qr_sim=ACTIVE
  if [[ -n ${ARG[queued]:-} ]]; then
    case $sim in
      SUSPENDED | SUSPENDING | FAILED | WAITING_FOR_RESOURCES | PROVISIONING | ACCEPTED | MISSING) qr_sim=$sim ;;
    esac
    query "$qr_sim" gcloud compute tpus queued-resources describe "$name" "${TPU_FLAGS[@]}" \
      '--format=value(state.state)'
    if [[ $QUERY != ACTIVE ]]; then
      STATE=$QUERY
      if [[ $STATE != UNKNOWN && $STATE != MISSING ]]; then STATE=QUEUED_$STATE; fi
      return 0
    fi
  fi
  query "$sim" gcloud compute tpus tpu-vm describe "$name" "${TPU_FLAGS[@]}" '--format=value(state)'
  STATE=$QUERY
}

count_restart() {
  local max=${ARG[max_restarts]}
  restarts=$((restarts + 1))
  if ((restarts > max)); then
    log "giving up: $restarts restarts needed, --max_restarts=${ARG[max_restarts]}"
    exit 1
  fi
  log "restart $restarts of ${ARG[max_restarts]}: $*"
}

launch() {  # run.sh --detach with this babysitter's --config, --workdir and overrides
  forward_args run
  "$LAUNCH_DIR/run.sh" "${FORWARD[@]}" --detach || return 1
  launched=1
}

recreate() {
  if [[ $STATE != MISSING ]]; then
    forward_args stop
    "$LAUNCH_DIR/stop.sh" "${FORWARD[@]}" || return 1
  fi
  local step
  for step in create setup sync; do
    forward_args "$step"
    "$LAUNCH_DIR/$step.sh" "${FORWARD[@]}" || return 1
  done
  launch
}

poll_once() {
  vm_state
  log "state of $name: $STATE$(is_dry_run && echo ' (simulated by --simulate_state)')"
  case $STATE in
    PREEMPTED | TERMINATED | MISSING | QUEUED_SUSPENDED | QUEUED_SUSPENDING | QUEUED_FAILED)
      count_restart "recreating $name (state $STATE)"
      recreate || log "recreating $name failed; trying again at the next poll"
      ;;
    READY)
      local run
      query RUNNING gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" --worker=0 --command "$RUN_STATUS_CMD"
      run=$QUERY
      if is_dry_run; then run="RUNNING (simulated)"; fi
      log "run on worker 0: $run"
      case $run in
        RUNNING*) ;;
        "EXIT 0")
          # A preemption's SIGTERM can also end a run with status 0 just before the VM turns PREEMPTED: look
          # at the VM once more before calling the run done.
          sleep "$((ARG[poll_interval] < 60 ? ARG[poll_interval] : 60))"
          vm_state
          if [[ $STATE != READY ]]; then
            log "worker 0's run exited 0 but $name is now $STATE"
            return 0
          fi
          log "the run finished (exit status 0 on worker 0): done"
          exit 0
          ;;
        NONE | PREEMPTED | EXIT*)
          if [[ $run != NONE || $launched == 1 ]]; then count_restart "rerunning ($run)"; fi
          launch || log "starting the run failed; trying again at the next poll"
          ;;
        *) log "could not read the run's status; asking again at the next poll" ;;
      esac
      ;;
    *) log "waiting" ;;
  esac
}

while true; do
  poll_once
  if is_dry_run; then
    log "dry run: one poll shown; the babysitter would poll again in ${ARG[poll_interval]} s"
    exit 0
  fi
  sleep "${ARG[poll_interval]}"
done

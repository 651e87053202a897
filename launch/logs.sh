#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy every worker's run log (~/pal_logs/run-$(hostname).log and .exit) back from a TPU VM, or print their tails.
#
#   launch/logs.sh --name=NAME --zone=ZONE [--project=PROJECT] [--log_dir=pal_logs/NAME] [--tail=N] [--dry_run]
#
#   --log_dir  the local folder the logs are copied to (default pal_logs/NAME); the files keep their per-host
#              names, e.g. run-t1v-n-0123abcd-w-0.log, so workers never overwrite each other
#   --tail=N   instead of copying, print the last N lines of every worker's log, each block headed
#              "== HOSTNAME"
#   --dry_run  print the commands (one per line, "+ ...") instead of running them
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args logs "$@"
require name zone
tpu_flags
name=${ARG[name]}

if [[ -n ${ARG[tail]:-} ]]; then
  require_int tail
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" --worker=all --command \
    "echo \"== \$(hostname)\" && tail -n ${ARG[tail]} $HOST_LOG"
  exit 0
fi

default log_dir "pal_logs/$name"
run_cmd mkdir -p "${ARG[log_dir]}"
run_cmd gcloud compute tpus tpu-vm scp "${TPU_FLAGS[@]}" --worker=all "$name:$REMOTE_LOGS/run-*" "${ARG[log_dir]}/"
if ! is_dry_run; then note "logs in ${ARG[log_dir]}/"; fi

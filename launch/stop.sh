#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete a TPU VM (or, with --queued, its queued resource and the node in it), or only stop it with --stop.
#
#   launch/stop.sh --name=NAME --zone=ZONE [--project=PROJECT] [--queued] [--stop] [--dry_run]
#
#   --queued   the VM was made by launch/create.sh --queued: delete the queued resource (--force also deletes
#              its TPU node)
#   --stop     stop the VM instead of deleting it (keeps its disk; on-demand VMs only: Spot and preemptible TPUs
#              cannot be restarted, and queued resources are deleted, not stopped)
#   --dry_run  print the gcloud commands (one per line, "+ ...") instead of running them
# The workdir on gs:// is never touched: a later create + setup + sync + run continues from its last checkpoint.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args stop "$@"
require name zone
tpu_flags
name=${ARG[name]}

if [[ -n ${ARG[stop]:-} ]]; then
  if [[ -n ${ARG[queued]:-} ]]; then die "--stop does not apply to --queued (a queued resource is deleted)"; fi
  run_cmd gcloud compute tpus tpu-vm stop "$name" "${TPU_FLAGS[@]}"
elif [[ -n ${ARG[queued]:-} ]]; then
  run_cmd gcloud compute tpus queued-resources delete "$name" "${TPU_FLAGS[@]}" --force --quiet
else
  run_cmd gcloud compute tpus tpu-vm delete "$name" "${TPU_FLAGS[@]}" --quiet
fi

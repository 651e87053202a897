#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a Cloud TPU VM (or, with --queued, a queued resource holding one TPU node of the same name).
#
#   launch/create.sh --name=NAME --zone=ZONE --accelerator_type=TYPE --runtime_version=VERSION
#                    [--project=PROJECT] [--spot | --preemptible] [--queued [--poll_interval=60]] [--dry_run]
#
#   --accelerator_type   e.g. v4-8 (one host), v4-32 (a pod slice: 4 hosts), v5litepod-16, v6e-8
#   --runtime_version    the TPU VM image, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite, v2-alpha-tpuv6e
#   --spot               Spot capacity (cheap, preemptible at any time, no 24 h limit; cannot be restarted)
#   --preemptible        legacy preemptible TPU (at most 24 h; not for --queued: use --spot there)
#   --queued             gcloud compute tpus queued-resources create: waits in the queue for capacity; this
#                        script then polls every --poll_interval seconds until the resource is ACTIVE
#   --dry_run            print the gcloud commands (one per line, "+ ...") instead of running them
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args create "$@"
require name zone accelerator_type runtime_version
default poll_interval 60
require_int poll_interval
if [[ -n ${ARG[spot]:-} && -n ${ARG[preemptible]:-} ]]; then die "--spot and --preemptible exclude each other"; fi
tpu_flags
name=${ARG[name]}

if [[ -z ${ARG[queued]:-} ]]; then
  cmd=(gcloud compute tpus tpu-vm create "$name" "${TPU_FLAGS[@]}"
    "--accelerator-type=${ARG[accelerator_type]}" "--version=${ARG[runtime_version]}")
  if [[ -n ${ARG[spot]:-} ]]; then cmd+=(--spot); fi
  if [[ -n ${ARG[preemptible]:-} ]]; then cmd+=(--preemptible); fi
  run_cmd "${cmd[@]}"  # returns when the VM is READY (or failed)
  exit 0
fi

if [[ -n ${ARG[preemptible]:-} ]]; then die "--preemptible is not available with --queued (use --spot)"; fi
cmd=(gcloud compute tpus queued-resources create "$name" "${TPU_FLAGS[@]}" "--node-id=$name"
  "--accelerator-type=${ARG[accelerator_type]}" "--runtime-version=${ARG[runtime_version]}")
if [[ -n ${ARG[spot]:-} ]]; then cmd+=(--spot); fi
run_cmd "${cmd[@]}"

# A queued resource is accepted at once and provisioned when capacity frees up: wait for ACTIVE.
describe=(gcloud compute tpus queued-resources describe "$name" "${TPU_FLAGS[@]}" '--format=value(state.state)')
if is_dry_run; then
  run_cmd "${describe[@]}"
  note "dry run: assuming the queued resource is ACTIVE (the real run polls every ${ARG[poll_interval]} s)"
  exit 0
fi
while true; do
  state=$(run_cmd "${describe[@]}" 2>/dev/null || echo UNKNOWN)
  case $state in
    ACTIVE)
      note "queued resource $name is ACTIVE"
      exit 0
      ;;
    FAILED | SUSPENDED)
      die "queued resource $name is $state (see: gcloud compute tpus queued-resources describe $name ${TPU_FLAGS[*]})"
      ;;
    *)
      note "queued resource $name is ${state:-UNKNOWN}; checking again in ${ARG[poll_interval]} s"
      sleep "${ARG[poll_interval]}"
      ;;
  esac
done

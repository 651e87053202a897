#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run python -m pal_jax.main on every worker of a TPU VM, each worker logging to ~/pal_logs/run-$(hostname).log.
#
#   launch/run.sh --name=NAME --zone=ZONE --config=configs/MODE.py[:PRESET] --workdir=gs://BUCKET/PATH
#                 [--project=PROJECT] [--config.KEY=VALUE ...] [--detach] [--fetch_logs [--log_dir=DIR]]
#                 [--dry_run] [-- EXTRA pal_jax.main FLAGS]
#
#   --config      relative to the repo (as synced by launch/sync.sh), e.g. configs/stage1.py:tiny
#   --workdir     a gs:// path every worker shares; pal_jax resumes from the last checkpoint there, so rerunning
#                 the same command (after a preemption, or by launch/babysit.sh) continues the run
#   --detach      start the run in the background on every worker and return at once (the run survives the ssh
#                 session); without it this waits until every worker's process has exited and fails if one did
#   --fetch_logs  afterwards, copy every worker's log to --log_dir (default pal_logs/NAME) with launch/logs.sh
#   --dry_run     print the gcloud commands (one per line, "+ ...") instead of running them
#
# Multi-host: the same command runs on every worker of the slice, with --distributed=on: pal_jax.main then calls
# jax.distributed.initialize(), which on a TPU VM needs no flags (JAX finds the coordinator, the process count and
# its own index from the TPU VM metadata; a gcloud ssh session carries no TPU_* variables to detect it by), so no
# --coordinator_address/--num_processes/--process_id are passed; those are for GPU clusters (launch/gpu_multinode.sh).
# `-- --distributed=auto` after the other arguments overrides it (the last flag wins).
# Each worker also writes its exit status to ~/pal_logs/run-$(hostname).exit (read by launch/babysit.sh).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args run "$@"
require name zone config workdir
check_workdir
tpu_flags
name=${ARG[name]}

pal_main_words "\$HOME/$REMOTE_VENV/bin/python" --distributed=on
main=$REPLY
# Appends, so a rerun keeps the earlier attempts' output above its own.
body="$main >> $HOST_LOG 2>&1"
remote="cd \$HOME/$REMOTE_REPO && mkdir -p \$HOME/$REMOTE_LOGS && rm -f $HOST_EXIT && "
if [[ -n ${ARG[detach]:-} ]]; then
  # A background subshell that ignores SIGHUP (like nohup) with no terminal attached: ssh returns at once and
  # the run outlives the session.
  remote+="(trap \"\" HUP; $body; echo \$? > $HOST_EXIT) < /dev/null > /dev/null 2>&1 &"
else
  remote+="$body; status=\$?; echo \$status > $HOST_EXIT; exit \$status"
fi

status=0
run_cmd gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" --worker=all --command "$remote" || status=$?
if [[ -n ${ARG[detach]:-} ]] && ! is_dry_run; then
  note "started on every worker; follow with: launch/logs.sh --name=$name --zone=${ARG[zone]} --tail=20"
fi
if [[ -n ${ARG[fetch_logs]:-} ]]; then
  forward_args logs
  "$LAUNCH_DIR/logs.sh" "${FORWARD[@]}" || true
fi
exit "$status"

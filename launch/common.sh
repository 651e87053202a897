# shellcheck shell=bash
# Sourced by every launch/*.sh script: argument parsing, run_cmd (--dry_run), the worker-side layout and the
# remote command lines that more than one script needs. Not meant to be run by itself.
#
# Options are written --key=value or --key value (--dry-run and --dry_run both work). Each script accepts the
# options listed for it in SCRIPT_OPTS; --config.KEY=VALUE overrides and, after `--`, extra pal_jax.main flags
# are passed through to `python -m pal_jax.main` by the scripts that run it.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "launch/*.sh need bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

# shellcheck disable=SC2034  # these are read by the scripts that source this file
{
  LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
  # On every TPU worker, relative to the worker's home directory: the code, the venv, the per-host logs, and the
  # requirements files that setup.sh copies before the code is synced. Remote commands spell them \$HOME/NAME
  # (expanded on the worker, not here); scp paths are relative to the home directory.
  REMOTE_REPO=pal_jax
  REMOTE_VENV=pal_venv
  REMOTE_LOGS=pal_logs
  REMOTE_SETUP=pal_setup
  # The JAX build for TPU VMs: the [tpu] extra brings libtpu (the TPU runtime) from PyPI, so nothing else is
  # needed. It must match the jax/jaxlib pins in requirements.txt, which setup.sh installs next.
  JAX_TPU_SPEC='jax[tpu]==0.10.2'
}

# Options each script accepts (dry_run and help are accepted by all).
declare -A SCRIPT_OPTS=(
  [create]="name zone project accelerator_type runtime_version queued spot preemptible poll_interval"
  [setup]="name zone project python"
  [sync]="name zone project"
  [run]="name zone project workdir config detach fetch_logs log_dir allow_local_workdir"
  [logs]="name zone project log_dir tail"
  [stop]="name zone project queued stop"
  [babysit]="name zone project accelerator_type runtime_version queued spot preemptible python workdir config
             allow_local_workdir poll_interval max_restarts simulate_state"
  [gpu_multinode]="hosts workdir config port coordinator remote_dir python"
)
# Options that are switches (no value); every other option takes a value.
FLAG_OPTS=" queued spot preemptible detach fetch_logs allow_local_workdir stop dry_run "
# Scripts that pass --config.KEY=VALUE and `-- EXTRA...` on to python -m pal_jax.main.
PASSTHROUGH_SCRIPTS=" run babysit gpu_multinode "

declare -A ARG=()      # parsed options: ARG[key]=value (1 for switches)
CONFIG_OVERRIDES=()    # --config.KEY=VALUE, in the order given
EXTRA_ARGS=()          # everything after --
SCRIPT_NAME=
TPU_FLAGS=()           # --zone=ZONE [--project=PROJECT], set by tpu_flags

die() {
  printf '%s: error: %s\n' "${SCRIPT_NAME:-launch}" "$*" >&2
  exit 2
}

note() {  # progress and decisions, on stderr so that --dry_run's stdout holds only commands
  printf '# %s\n' "$*" >&2
}

usage() {  # the header comment of the running script
  sed -n '2,/^[^#]/{/^# shellcheck /d;/^#/s/^# \{0,1\}//p;}' "$0"
}

is_dry_run() {
  [[ ${ARG[dry_run]:-} == 1 ]]
}

# One shell word as bash would read it back: unchanged when printf %q leaves it unchanged (no special
# characters), otherwise single-quoted with ${word@Q}, which is as exact as %q and keeps a long remote
# --command readable instead of escaping each of its spaces.
quote_word() {
  local q
  printf -v q '%q' "$1"
  if [[ $q == "$1" ]]; then REPLY=$1; else REPLY=${1@Q}; fi
}

format_cmd() {  # "+ word word ...", pasteable into bash
  local out=+ w
  for w in "$@"; do
    quote_word "$w"
    out+=" $REPLY"
  done
  printf '%s\n' "$out"
}

# Runs a command, or with --dry_run only prints it. Printed commands are one per line, prefixed "+ ".
run_cmd() {
  if is_dry_run; then
    format_cmd "$@"
    return 0
  fi
  format_cmd "$@" >&2
  "$@"
}

parse_args() {  # parse_args SCRIPT "$@"
  SCRIPT_NAME=$1
  shift
  local allowed
  allowed=" $(echo "${SCRIPT_OPTS[$SCRIPT_NAME]}" | tr -s ' \n' '  ') dry_run "
  while (($#)); do
    local a=$1 key val has_val=0
    shift
    case $a in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        [[ $PASSTHROUGH_SCRIPTS == *" $SCRIPT_NAME "* ]] || die "this script takes no arguments after --"
        EXTRA_ARGS=("$@")
        break
        ;;
      --config.*)
        [[ $PASSTHROUGH_SCRIPTS == *" $SCRIPT_NAME "* ]] || die "unknown option ${a%%=*} (see --help)"
        [[ $a == *=* ]] || die "$a: config overrides are written --config.KEY=VALUE"
        CONFIG_OVERRIDES+=("$a")
        ;;
      --?*)
        key=${a#--}
        if [[ $key == *=* ]]; then
          val=${key#*=}
          key=${key%%=*}
          has_val=1
        fi
        key=${key//-/_}
        [[ $allowed == *" $key "* ]] || die "unknown option --$key (see --help)"
        if [[ $FLAG_OPTS == *" $key "* ]]; then
          ((has_val == 0)) || die "--$key takes no value"
          ARG[$key]=1
        else
          if ((has_val == 0)); then
            [[ $# -gt 0 && $1 != --* ]] || die "--$key needs a value"
            val=$1
            shift
          fi
          [[ -n $val ]] || die "--$key needs a non-empty value"
          ARG[$key]=$val
        fi
        ;;
      *)
        die "unexpected argument '$a' (options are --key=value; see --help)"
        ;;
    esac
  done
}

require() {  # require KEY...: each must have been given
  local k
  for k in "$@"; do
    [[ -n ${ARG[$k]:-} ]] || die "missing required argument --$k (see --help)"
  done
}

default() {  # default KEY VALUE
  [[ -n ${ARG[$1]:-} ]] || ARG[$1]=$2
}

require_int() {  # require_int KEY: a non-negative integer
  [[ ${ARG[$1]} =~ ^[0-9]+$ ]] || die "--$1 must be a non-negative integer, got '${ARG[$1]}'"
}

tpu_flags() {  # checks --name and --zone, sets TPU_FLAGS from --zone and --project
  [[ ${ARG[name]} =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name must be lowercase letters, digits and hyphens, starting with a letter, got '${ARG[name]}'"
  [[ ${ARG[zone]} =~ ^[a-z0-9-]+$ ]] || die "--zone looks wrong: '${ARG[zone]}' (e.g. us-central2-b)"
  TPU_FLAGS=("--zone=${ARG[zone]}")
  if [[ -n ${ARG[project]:-} ]]; then TPU_FLAGS+=("--project=${ARG[project]}"); fi
}

check_workdir() {
  if [[ ${ARG[workdir]} != gs://?* && -z ${ARG[allow_local_workdir]:-} ]]; then
    die "--workdir must be a gs://BUCKET/PATH that every worker (and a recreated VM) can reach, got" \
      "'${ARG[workdir]}' (--allow_local_workdir to use a path on the worker's own disk)"
  fi
}

# The options of this run that TARGET accepts, as arguments for launch/TARGET.sh (used by babysit.sh and run.sh
# to call the other scripts with the same settings).
forward_args() {  # forward_args TARGET -> FORWARD array
  local target=$1 k
  FORWARD=()
  for k in ${SCRIPT_OPTS[$target]} dry_run; do
    [[ -n ${ARG[$k]:-} ]] || continue
    if [[ $FLAG_OPTS == *" $k "* ]]; then FORWARD+=("--$k"); else FORWARD+=("--$k=${ARG[$k]}"); fi
  done
  if [[ $PASSTHROUGH_SCRIPTS == *" $target "* ]]; then
    FORWARD+=("${CONFIG_OVERRIDES[@]}")
    if ((${#EXTRA_ARGS[@]})); then FORWARD+=(-- "${EXTRA_ARGS[@]}"); fi
  fi
  return 0
}

# PYTHON -m pal_jax.main with --config, --workdir, the overrides and extra flags, each word but PYTHON (which
# the caller writes for the remote shell) quoted for the remote shell: the command travels as one string.
pal_main_words() {  # pal_main_words PYTHON [EXTRA FLAG...] -> REPLY
  local out=$1 w
  shift
  for w in -m pal_jax.main "--config=${ARG[config]}" "--workdir=${ARG[workdir]}" "${CONFIG_OVERRIDES[@]}" "$@" \
    "${EXTRA_ARGS[@]}"; do
    out+=" $(printf '%q' "$w")"
  done
  REPLY=$out
}

# Per-host files on a TPU worker: the log and the exit status of the last run, named by the worker's hostname
# (on a TPU VM, e.g. t1v-n-0123abcd-w-3 for worker 3), evaluated on the worker.
HOST_LOG="\$HOME/$REMOTE_LOGS/run-\$(hostname).log"
HOST_EXIT="\$HOME/$REMOTE_LOGS/run-\$(hostname).exit"

# What babysit.sh asks worker 0: RUNNING, NONE (never started here), PREEMPTED (exited after a SIGTERM
# checkpoint: pal_jax's summary says "preempted: True") or "EXIT <status>".
RUN_STATUS_CMD="if pgrep -f \"pal_jax[.]main\" > /dev/null; then echo RUNNING; elif [ ! -f $HOST_EXIT ]; then echo NONE;"
RUN_STATUS_CMD+=" elif tail -n 40 $HOST_LOG | grep -q \"^preempted: True\"; then echo PREEMPTED;"
RUN_STATUS_CMD+=" else echo \"EXIT \$(cat $HOST_EXIT)\"; fi"

#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multi-node GPU run over plain ssh: starts one pal_jax process per node (each uses all of its node's GPUs),
# process i on the i-th host of --hosts, all pointed at process 0's coordinator, and waits for all of them.
#
#   launch/gpu_multinode.sh --hosts=HOST0,HOST1,... --config=configs/MODE.py[:PRESET] --workdir=DIR
#                           [--port=1234] [--coordinator=HOST0] [--remote_dir=THIS_CHECKOUT'S_PATH]
#                           [--python=.venv/bin/python] [--config.KEY=VALUE ...] [--dry_run] [-- EXTRA FLAGS]
#
#   --hosts        ssh destinations ([user@]host), comma-separated; the first one is process 0
#   --workdir      a directory every node shares (NFS, or gs://BUCKET/PATH): checkpoints are written by all
#   --coordinator  the address the other nodes reach process 0 at (default: the first host's name); --port its port
#   --remote_dir   the checkout on every node (default: this checkout's path, as on a shared home directory);
#                  its venv needs jax[cuda12]==0.10.2 and requirements.txt
#   --python       relative to --remote_dir unless absolute (default .venv/bin/python)
#   --dry_run      print the per-node ssh commands (one per line, "+ ...") instead of running them
# Node i runs, in --remote_dir:
#   PYTHON -m pal_jax.main --config=... --workdir=... --coordinator_address=COORDINATOR:PORT
#       --num_processes=N --process_id=i >> ~/pal_logs/run-$(hostname).log 2>&1
# Under SLURM none of this is needed: `srun --nodes=N --ntasks-per-node=1 python -m pal_jax.main ...` works as is,
# since pal_jax.main calls jax.distributed.initialize() itself when it sees a SLURM job with more than one task.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args gpu_multinode "$@"
require hosts config workdir
default port 1234
default remote_dir "$REPO_ROOT"
default python .venv/bin/python
require_int port
IFS=, read -r -a hosts <<<"${ARG[hosts]}"
((${#hosts[@]} > 0)) || die "--hosts lists no host"
for h in "${hosts[@]}"; do
  [[ -n $h && $h != -* ]] || die "--hosts has an empty or invalid entry: '${ARG[hosts]}'"
done
coordinator=${ARG[coordinator]:-${hosts[0]#*@}}
n=${#hosts[@]}

path_word() {  # a path for the remote shell: quoted, but a leading ~/ becomes $HOME/, expanded there
  if [[ $1 == \~/* ]]; then REPLY="\$HOME/$(printf '%q' "${1#\~/}")"; else REPLY=$(printf '%q' "$1"); fi
}
path_word "${ARG[remote_dir]}"
remote_dir=$REPLY

path_word "${ARG[python]}"
python=$REPLY

pids=()
for i in "${!hosts[@]}"; do
  pal_main_words "$python" "--coordinator_address=$coordinator:${ARG[port]}" "--num_processes=$n" \
    "--process_id=$i"
  remote="cd $remote_dir && mkdir -p \$HOME/$REMOTE_LOGS && $REPLY >> $HOST_LOG 2>&1"
  if is_dry_run; then
    run_cmd ssh -o BatchMode=yes "${hosts[$i]}" "$remote"
  else
    run_cmd ssh -o BatchMode=yes "${hosts[$i]}" "$remote" &
    pids+=($!)
  fi
done
is_dry_run && exit 0

failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${hosts[$i]} (process $i, exit $?)")
done
if ((${#failed[@]})); then
  die "failed on: ${failed[*]}; see ~/$REMOTE_LOGS/run-HOSTNAME.log on those nodes"
fi
note "all $n processes finished; logs in ~/$REMOTE_LOGS/run-HOSTNAME.log on each node"

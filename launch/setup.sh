#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install the Python environment on every worker of a TPU VM: ~/pal_venv with jax[tpu] (which brings libtpu),
# requirements.txt and requirements-nodeps.txt. Run once per VM (again after it is recreated); it does not need
# the code, so it can run before or after launch/sync.sh.
#
#   launch/setup.sh --name=NAME --zone=ZONE [--project=PROJECT] [--python=python3.11] [--dry_run]
#
#   --python   the interpreter that creates the venv (jax 0.10 needs Python >= 3.11; the Ubuntu 22.04 TPU images
#              ship 3.10, so when it is missing it is installed with apt: PYTHON and PYTHON-venv)
#   --dry_run  print the gcloud commands (one per line, "+ ...") instead of running them
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args setup "$@"
require name zone
default python python3.11
py=${ARG[python]}
[[ $py =~ ^python3(\.[0-9]+)?$ ]] || die "--python must be python3 or python3.N, got '$py'"
tpu_flags
name=${ARG[name]}

# 1. The requirements files, to ~/pal_setup/ on every worker (the code itself comes with sync.sh).
run_cmd gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" --worker=all --command "mkdir -p \$HOME/$REMOTE_SETUP"
run_cmd gcloud compute tpus tpu-vm scp "${TPU_FLAGS[@]}" --worker=all \
  "$REPO_ROOT/requirements.txt" "$REPO_ROOT/requirements-nodeps.txt" "$REPO_ROOT/requirements-gcs.txt" \
  "$name:$REMOTE_SETUP/"

# 2. The venv. 'jax[tpu]==0.10.2' brings libtpu (the TPU runtime) from PyPI as a dependency: no other TPU
# driver or -f index is needed. requirements.txt pins the same jax/jaxlib; the --no-deps file holds wheels whose
# own dependencies pal_jax never imports (see requirements-nodeps.txt); requirements-gcs.txt: gs:// workdirs.
pip="\$HOME/$REMOTE_VENV/bin/python -m pip install -q"
remote="if ! $py -c \"import ensurepip\" > /dev/null 2>&1; then"
remote+=" sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $py $py-venv; fi"
remote+=" && $py -m venv \$HOME/$REMOTE_VENV"
remote+=" && \$HOME/$REMOTE_VENV/bin/python -m pip install -q --upgrade pip"
remote+=" && $pip \"$JAX_TPU_SPEC\""
remote+=" && $pip -r \$HOME/$REMOTE_SETUP/requirements.txt"
remote+=" && $pip --no-deps -r \$HOME/$REMOTE_SETUP/requirements-nodeps.txt"
remote+=" && $pip -r \$HOME/$REMOTE_SETUP/requirements-gcs.txt"  # gs:// workdirs
# a check that needs no TPU (initialising the TPU backend on one worker of a pod would wait for the others)
remote+=" && \$HOME/$REMOTE_VENV/bin/python -c \"import jax, libtpu; print(jax.__version__)\""
run_cmd gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" --worker=all --command "$remote"

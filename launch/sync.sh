#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy this checkout's code to ~/pal_jax on every worker of a TPU VM, replacing what was there.
#
#   launch/sync.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry_run]
#
# The tarball holds the files `git ls-files --cached --others --exclude-standard` lists: tracked files as they
# are in the working tree (uncommitted edits included) plus untracked files that .gitignore does not exclude,
# so venvs, runs/ and workdirs never travel.
#   --dry_run  print the commands (one per line, "+ ...") instead of running them
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args sync "$@"
require name zone
tpu_flags
name=${ARG[name]}

list_files() {  # NUL-separated paths, relative to the repo root; files deleted but still in the index are left out
  local f
  while IFS= read -r -d '' f; do
    if [[ -f $REPO_ROOT/$f ]]; then printf '%s\0' "$f"; fi
  done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard --deduplicate)
  wait "$!" || die "git ls-files failed in $REPO_ROOT (sync.sh packs the files of a git checkout)"
}

git -C "$REPO_ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1 ||
  die "$REPO_ROOT is not a git checkout (sync.sh packs the files git ls-files lists)"
if is_dry_run; then
  tmp=${TMPDIR:-/tmp}/pal_jax-sync
  note "dry run: $(list_files | tr -cd '\0' | wc -c) files from git ls-files would go to $tmp/files"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  list_files >"$tmp/files"
fi
tarball=$tmp/$REMOTE_REPO.tar.gz
run_cmd tar -czf "$tarball" -C "$REPO_ROOT" --null -T "$tmp/files"
run_cmd gcloud compute tpus tpu-vm scp "${TPU_FLAGS[@]}" --worker=all "$tarball" "$name:$REMOTE_REPO.tar.gz"
run_cmd gcloud compute tpus tpu-vm ssh "$name" "${TPU_FLAGS[@]}" --worker=all --command \
  "rm -rf \$HOME/$REMOTE_REPO && mkdir -p \$HOME/$REMOTE_REPO && tar -xzf \$HOME/$REMOTE_REPO.tar.gz -C \$HOME/$REMOTE_REPO && rm \$HOME/$REMOTE_REPO.tar.gz"

#!/usr/bin/env bash
# Stops the cluster that cluster/local/up.sh started: the process tree of each node's
# `ray start --block` (pids in $DEER_LOCAL_STATE/*.pid): SIGTERM, then SIGKILL after a grace
# period. Processes of other Ray instances on this machine are left alone (`ray stop --force`
# would kill them all; use it only where this is the machine's one Ray).
set -uo pipefail
STATE=${DEER_LOCAL_STATE:-/tmp/deer-local-cluster}
GRACE=${DEER_DOWN_GRACE_S:-10}

tree() {  # pid and all its descendants
  local pid=$1 child
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
    tree "$child"
  done
}

pids=()
for f in "$STATE"/*.pid; do
  [ -e "$f" ] || continue
  root=$(cat "$f")
  if kill -0 "$root" 2>/dev/null; then
    pids+=($(tree "$root"))
  fi
done
# processes started for this cluster that left its trees (e.g. re-parented to init): they
# name this cluster's own temp dir, which no other Ray instance uses
if [ -d "$STATE/ray" ]; then
  for p in $(pgrep -f -- "$STATE/ray" 2>/dev/null); do
    [ "$p" != "$$" ] && pids+=("$p")
  done
fi
if [ ${#pids[@]} -eq 0 ]; then
  echo "down.sh: nothing running (state in $STATE)"
  rm -f "$STATE"/*.pid "$STATE"/address "$STATE"/env
  exit 0
fi
kill -TERM "${pids[@]}" 2>/dev/null
for _ in $(seq 1 $((GRACE * 5))); do
  alive=()
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  [ ${#alive[@]} -eq 0 ] && break
  sleep 0.2
done
if [ ${#alive[@]} -gt 0 ]; then
  kill -KILL "${alive[@]}" 2>/dev/null
  for _ in $(seq 1 50); do  # SIGKILL is asynchronous: wait until they are gone
    left=()
    for p in "${alive[@]}"; do
      st=$(ps -o stat= -p "$p" 2>/dev/null)
      [ -n "$st" ] && [ "${st:0:1}" != Z ] && left+=("$p")
    done
    [ ${#left[@]} -eq 0 ] && break
    sleep 0.2
  done
fi
rm -f "$STATE"/*.pid "$STATE"/address "$STATE"/env
echo "down.sh: stopped ${#pids[@]} processes"

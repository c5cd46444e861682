#!/usr/bin/env bash
# The local cluster recipe: a Ray head on this machine, a render submitted to it as a Ray job, and the
# head stopped again. Run from anywhere; the repository is shipped as the job's working_dir.
#
#   cluster/local.sh start [NUM_GPUS]   start a head (dashboard on 127.0.0.1:$KVRAY_DASHBOARD_PORT)
#   cluster/local.sh submit [ARGS...]   kvray submit examples/prompts.parquet --out $KVRAY_LOCAL/out ... ARGS
#                                       (run as python -m kvray.distributed.submit, the same command)
#   cluster/local.sh status             ray status for this head
#   cluster/local.sh stop               stop this head only
#   cluster/local.sh demo               start, submit the tiny example, stop
#
# The head lives in its own temp dir ($KVRAY_LOCAL, default /tmp/kvray-local) with its own ports, and
# `stop` ends only the processes of that temp dir: never `ray stop`, which ends every Ray on the
# machine. Token authentication is off (RAY_AUTH_MODE=disabled) and the dashboard listens on
# 127.0.0.1 only: a machine-local cluster. GPUs are logical (--num-gpus): on a machine without CUDA the
# stage actors fall back to the CPU.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${KVRAY_LOCAL:-/tmp/kvray-local}"
GCS_PORT="${KVRAY_GCS_PORT:-6390}"
DASHBOARD_PORT="${KVRAY_DASHBOARD_PORT:-8275}"
CLIENT_PORT="${KVRAY_CLIENT_PORT:-20011}"  # outside the worker port range 10002-19999
AGENT_PORT="${KVRAY_AGENT_PORT:-52375}"
ADDRESS="http://127.0.0.1:${DASHBOARD_PORT}"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Stage actors at normal CPU priority, as `kvray render` runs them (Ray's default, 15, starves them
# beside any other busy process): see kvray/distributed/priority.py.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

if [[ -x "$REPO/.venv/bin/ray" && -z "${VIRTUAL_ENV:-}" ]]; then
  . "$REPO/.venv/bin/activate"
fi

start() {
  local gpus="${1:-0}"
  mkdir -p "$STATE"
  # Logical CPUs (default 8, as `kvray render` gives a local Ray): stage actors ask for fractions of
  # CPUs and Ray Data waits until every actor of a pool is placed.
  ray start --head --num-cpus="${KVRAY_NUM_CPUS:-8}" --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
    --temp-dir="$STATE/ray" --num-gpus="$gpus" --disable-usage-stats
  echo "head up: submit with  kvray submit MANIFEST --out URI --address $ADDRESS"
}

submit() {
  # Paths in the manifest and the job file are relative to the shipped working dir (the repository).
  python -m kvray.distributed.submit examples/prompts.parquet --out "$STATE/out" --job cluster/job-tiny.yaml \
    --address "$ADDRESS" "$@"
}

status() {
  ray status --address="127.0.0.1:$GCS_PORT"
}

# The pids of every process whose command line names this head's temp dir, and their descendants.
head_pids() {
  local -a queue found=()
  local pid child
  # The patterns come from file descriptors, so this grep's own command line does not match them.
  mapfile -t queue < <(grep -lsFf <(printf '%s\n' "$STATE/ray") /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3)
  # Ray's client server names neither the temp dir nor a parent we find: match it by its own port.
  mapfile -t -O "${#queue[@]}" queue < <(grep -lsFf <(printf '%s\n' "--port=$CLIENT_PORT") /proc/[0-9]*/cmdline 2>/dev/null \
    | xargs -r grep -lsFf <(printf '%s\n' "ray.util.client.server") 2>/dev/null | cut -d/ -f3)
  while ((${#queue[@]})); do
    pid=${queue[0]}; queue=("${queue[@]:1}")
    [[ " ${found[*]} " == *" $pid "* ]] && continue
    found+=("$pid")
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do queue+=("$child"); done
  done
  echo "${found[*]}"
}

stop() {
  local pids; pids=$(head_pids)
  if [[ -z "$pids" ]]; then echo "no head running in $STATE/ray"; return 0; fi
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 20); do
    pids=$(for p in $pids; do
             if [[ -d /proc/$p ]] && ! grep -qs '^State:.*Z' "/proc/$p/status"; then echo "$p"; fi
           done)
    [[ -z "$pids" ]] && break
    sleep 0.5
  done
  if [[ -n "$pids" ]]; then kill -KILL $pids 2>/dev/null || true; fi
  echo "stopped the head in $STATE/ray"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  submit) shift; submit "$@" ;;
  status) status ;;
  stop) stop ;;
  demo) start 0; trap stop EXIT; submit ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac

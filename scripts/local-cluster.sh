#!/usr/bin/env bash
# The scale-out topology on one machine, on loopback: PostgreSQL (Optuna storage and MLflow's backend
# store) plus an `mlflow server` that proxies artifacts, so workers need no shared disk.
#
#   scripts/local-cluster.sh up   [DIR]   start both; prints the two URLs to export
#   scripts/local-cluster.sh env  [DIR]   print the exports again
#   scripts/local-cluster.sh down [DIR]   stop both (DIR keeps the data; delete it to start afresh)
#   scripts/local-cluster.sh workers DIR N [cnnexp worker flags]
#                                         N `cnnexp worker` processes against the cluster, logs in
#                                         DIR/worker-I.log; waits for all, exits non-zero if one failed
#
# Ports: PGPORT (default 55432) and MLFLOW_PORT (default 5001). Everything binds to 127.0.0.1.
set -euo pipefail

cmd=${1:-}
dir=$(realpath -m "${2:-.cluster}")
pg_port=${PGPORT:-55432}
mlflow_port=${MLFLOW_PORT:-5001}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
export PATH="$pg_bin:$PATH"

# initdb refuses to run as root, so the cluster belongs to the `postgres` user when we are root.
as_db_owner() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "PATH='$PATH' $*"; else bash -c "$*"; fi
}

pg_url() { echo "postgresql://postgres@127.0.0.1:$pg_port/$1"; }

print_env() {
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port"
  echo "export OPTUNA_STORAGE=$(pg_url optuna)"
}

up() {
  command -v initdb >/dev/null || { echo "local-cluster: PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
  mkdir -p "$dir/artifacts"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    # As root the cluster belongs to `postgres`, which must be able to enter every parent of DIR; a parent
    # made by `mktemp -d` (mode 0700) is one it cannot.
    su postgres -s /bin/bash -c "test -x '$dir'" || {
      echo "local-cluster: user postgres cannot enter $dir (a parent directory is private, e.g. made by mktemp -d);" \
           "use a DIR whose parents it can enter, or: chmod o+x on them" >&2; exit 1; }
  fi
  if [ ! -d "$dir/db" ]; then
    as_db_owner "initdb -D '$dir/db' -A trust -U postgres" >"$dir/initdb.log"
  fi
  as_db_owner "pg_ctl -D '$dir/db' -o \"-k '$dir' -p $pg_port -h 127.0.0.1\" -l '$dir/postgres.log' -w start" >/dev/null
  for db in mlflow optuna; do
    psql -h 127.0.0.1 -p "$pg_port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
      || createdb -h 127.0.0.1 -p "$pg_port" -U postgres "$db"
  done
  # The server's 4 processes would each keep SQLAlchemy's default pool (5, overflowing to 15): up to 60 of
  # PostgreSQL's 100 connections before any worker connects. 2 + 3 each caps the server at 20; a request
  # beyond that waits for a connection instead of failing (docs/scale-out.md, Connections).
  MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=${MLFLOW_SQLALCHEMYSTORE_POOL_SIZE:-2} \
  MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=${MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW:-3} \
  nohup mlflow server --host 127.0.0.1 --port "$mlflow_port" \
    --backend-store-uri "$(pg_url mlflow)" --artifacts-destination "$dir/artifacts" \
    >"$dir/mlflow.log" 2>&1 &
  echo $! >"$dir/mlflow.pid"
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null && break
    kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null || break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null \
    || { echo "local-cluster: mlflow server did not start; see $dir/mlflow.log" >&2; exit 1; }
  echo "PostgreSQL on 127.0.0.1:$pg_port, MLflow server on http://127.0.0.1:$mlflow_port (data in $dir)"
  print_env
}

down() {
  if [ -f "$dir/mlflow.pid" ]; then
    pkill -TERM -P "$(cat "$dir/mlflow.pid")" 2>/dev/null || true
    kill "$(cat "$dir/mlflow.pid")" 2>/dev/null || true
    rm -f "$dir/mlflow.pid"
  fi
  [ -d "$dir/db" ] && as_db_owner "pg_ctl -D '$dir/db' -m fast -w stop" >/dev/null 2>&1 || true
  echo "stopped (data kept in $dir)"
}

workers() {
  local n=${3:?usage: $0 workers DIR N [cnnexp worker flags]}
  shift 3
  eval "$(print_env)"
  local pids=() failed=0
  # Each process's share of this host's cores: N processes that each took all of them ran 3x slower.
  local threads=$(( $(nproc) / n )); [ "$threads" -ge 1 ] || threads=1
  for i in $(seq "$n"); do
    OMP_NUM_THREADS=$threads ${CNNEXP:-cnnexp} worker "$@" >"$dir/worker-$i.log" 2>&1 &
    pids+=($!)
    echo "worker $i: pid $! (log $dir/worker-$i.log)"
  done
  # Ctrl-C stops them the way `mlflow run` would (SIGTERM): their running trials end FAILED, not RUNNING.
  trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then tail -n 1 "$dir/worker-$((i + 1)).log"; else failed=1; echo "worker $((i + 1)) failed:"; tail -n 5 "$dir/worker-$((i + 1)).log"; fi
  done
  return $failed
}

case "$cmd" in
  up) up ;;
  env) print_env ;;
  down) down ;;
  workers) workers "$@" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac

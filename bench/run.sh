#!/usr/bin/env bash
# The flowthrough benchmark harness: one run, one load generator, one set of certificates,
# four targets — (a) the Webex API simulator directly, (b) flowthrough, (c) nginx as a plain
# mutual-TLS reverse proxy, (d) the same relay built from flowthrough's own crates (actix-web,
# rustls, reqwest; examples/stack_floor.rs) — all on loopback. See bench/README.md.
#
#   bench/run.sh [--short|--long]     the comparison; writes bench/RESULTS.md (default ≤ 10 min)
#   bench/run.sh soak [MINUTES] [sled|postgres]
#                                     RSS and open fds of flowthrough under steady load (default
#                                     60 min at 300 req/s on sled; BENCH_SOAK_RATE sets the rate)
#   bench/run.sh crash [N]            kill -9 flowthrough N times under load (default 20), then
#                                     compare acknowledged requests with the simulator's subscribers
#   bench/run.sh faults [SECONDS]     fixed-rate load through token-expiry storms, 429 storms and
#                                     certificate reloads (default 20 s each), beside a quiet
#                                     baseline; then every acknowledged request is looked for
#   bench/run.sh pg [--short]         (b) beside (b-pg): flowthrough on a throwaway PostgreSQL
#                                     cluster (initdb here, fsync on); throughput, CPU per request
#                                     (flowthrough + postgres processes), p99 added at half load
#                                     and at an AS's real rates (100/s and 10/s, 4 connections)
#   bench/run.sh cluster [--short]    (b-pg) one node beside (b-pg2) two nodes sharing one database
#                                     of that cluster, the generator spreading its connections over
#                                     both: the same three figures; then kill -9 of one node under
#                                     load and the time until the survivor delivers a user the dead
#                                     node held (lease_ms = 2000 for that part)
#
# Environment: CARGO_TARGET_DIR (default target), BENCH_PORT_BASE (default 18440),
# BENCH_KEEP=1 keeps the work directory, BENCH_WORKERS (default 2) sets both proxies' AS-side
# workers, BENCH_SKIP_BUILD=1 measures the binaries already in CARGO_TARGET_DIR/release (to
# compare two builds in one sitting).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/flowthrough
LOAD=$TARGET/release/flowthrough-load
FLOOR=$TARGET/release/examples/stack_floor
BASE=${BENCH_PORT_BASE:-18440}
SIM_PORT=$BASE
FT_PORT=$((BASE + 1))
NGX_PORT=$((BASE + 2))
ADMIN_PORT=$((BASE + 3))
FLOOR_PORT=$((BASE + 4))
PG_PORT=$((BASE + 5))
FTPG_PORT=$((BASE + 6))
ADMIN_PG_PORT=$((BASE + 7))
FTPG2A_PORT=$((BASE + 8))
ADMIN_PG2A_PORT=$((BASE + 9))
FTPG2B_PORT=$((BASE + 10))
ADMIN_PG2B_PORT=$((BASE + 11))
# Both proxies get the same number of AS-side worker threads/processes (flowthrough's
# `server.workers`, nginx's `worker_processes`); the generator runs on 1 thread.
WORKERS=${BENCH_WORKERS:-2}
CONNS=${BENCH_CONNECTIONS:-64}

MODE=bench
DUR=10
case "${1:-}" in
  --short) DUR=4 ;;
  --long) DUR=30 ;;
  soak) MODE=soak; SOAK_MIN=${2:-60}; SOAK_STORE=${3:-sled}
    case "$SOAK_STORE" in sled|postgres) ;; *) echo "soak: the store is sled or postgres, not '$SOAK_STORE'" >&2; exit 1 ;; esac ;;
  crash) MODE=crash; CRASH_N=${2:-20} ;;
  faults) MODE=faults; FAULT_S=${2:-20} ;;
  pg|cluster) MODE=$1; [ "${2:-}" = --short ] && DUR=4 ;;
  "") ;;
  *) echo "usage: bench/run.sh [--short|--long] | soak [MINUTES] [sled|postgres] | crash [N] | faults [SECONDS] | pg [--short] | cluster [--short]" >&2; exit 1 ;;
esac

say() { printf '\n== %s\n' "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

for tool in curl jq; do
  command -v "$tool" >/dev/null || die "$tool is needed (apt-get install $tool)"
done

if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  # Comparing builds: point CARGO_TARGET_DIR at a directory holding release/flowthrough and
  # release/flowthrough-load of the build to measure (and release/examples/stack_floor).
  [ -x "$BIN" ] && [ -x "$LOAD" ] || die "BENCH_SKIP_BUILD=1 needs $BIN and $LOAD"
  [ "$MODE" != bench ] || [ -x "$FLOOR" ] || die "BENCH_SKIP_BUILD=1 needs $FLOOR"
else
  say "building release binaries"
  (cd "$ROOT" && cargo build --release --locked --bins --example stack_floor >&2)
fi

WORK=$(mktemp -d /var/tmp/flowthrough-bench.XXXXXX)
SIM_PID= FT_PID= NGX_PID= FLOOR_PID= LOAD_PID= FTPG_PID= FTPG2A_PID= FTPG2B_PID= PGBIN=
# PostgreSQL refuses to run as root: its programs run as the postgres user then.
AS_PG=()
[ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)
cleanup() {
  # Only the processes this script started and that are still current.
  for pid in $LOAD_PID $FT_PID $FTPG_PID $FTPG2A_PID $FTPG2B_PID $NGX_PID $FLOOR_PID $SIM_PID; do kill "$pid" 2>/dev/null || true; done
  if [ -n "$PGBIN" ]; then "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true; fi
  wait 2>/dev/null || true
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

wait_tcp() { # port, what
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$2 did not start listening on 127.0.0.1:$1 (see $WORK/*.log)"
}

say "certificates (ECDSA P-256) in $WORK/pki"
"$BIN" certs ca --cn "flowthrough bench CA" --out "$WORK/pki" >/dev/null
"$BIN" certs server --ca "$WORK/pki" --dns localhost --ip 127.0.0.1 --out "$WORK/pki" >/dev/null
"$BIN" certs client --ca "$WORK/pki" --out "$WORK/pki" >/dev/null

say "Webex API simulator on 127.0.0.1:$SIM_PORT (no added latency)"
SECRET=bench-secret-$RANDOM$RANDOM
REFRESH=bench-refresh-$RANDOM$RANDOM
start_sim() {
  "$BIN" simulator --listen "127.0.0.1:$SIM_PORT" --out "$WORK/sim" --client-id bench \
    --client-secret "$SECRET" --refresh-token "$REFRESH" >>"$WORK/sim.log" 2>&1 &
  SIM_PID=$!
  wait_tcp "$SIM_PORT" simulator
}
start_sim
SIM="https://127.0.0.1:$SIM_PORT"
simctl() { curl -sf --cacert "$WORK/sim/ca.pem" -H 'content-type: application/json' -d "$1" "$SIM/_sim/control" >/dev/null; }
simstate() { curl -sf --cacert "$WORK/sim/ca.pem" "$SIM/_sim/state"; }

STORE_CAPS=
if [ "$MODE" = soak ]; then
  # Caps that let the store reach its steady size early in the soak: at 300 req/s under two
  # minutes of history and audit, pruned every five minutes (production keeps a million of
  # each, which 300 req/s fills in about an hour). The soak's users are a pool of 1,000, added
  # and deleted over and over.
  STORE_CAPS=$'audit_max_records = 30000\nhistory_max_entries = 30000'
fi
printf '%s' "$SECRET" >"$WORK/client_secret"
printf '%s' "$REFRESH" >"$WORK/refresh_token"
cat >"$WORK/flowthrough.toml" <<EOF
default_template = "acme"

[server]
listen = ["127.0.0.1:$FT_PORT"]
certificate = "$WORK/pki/server.pem"
private_key = "$WORK/pki/server.key"
client_ca = "$WORK/pki/ca.pem"
public_name = "localhost"
workers = $WORKERS

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[store]
$STORE_CAPS
path = "$WORK/store"

[log]
level = "info"

[webex]
api_base = "$SIM/v1"
token_url = "$SIM/v1/access_token"
ca_bundle = "$WORK/sim/ca.pem"
client_id = "bench"
client_secret_file = "$WORK/client_secret"
refresh_token_file = "$WORK/refresh_token"

[templates.acme]
provisioning_id = "prov-acme"
package = "standard"
enterprise_mode = true
user_verification = "trusted_email"
country = "US"
calling_code = "+1"
default_language = "en_US"
default_timezone = "America/New_York"

[template_overrides]
"acme-ent" = "acme"
EOF

wait_ready() { # admin port, pid, name, log
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
    kill -0 "$2" 2>/dev/null || die "$3 exited at start; see $4"
    sleep 0.1
  done
  die "$3 not ready after 30 s; see $4"
}
start_flowthrough() {
  "$BIN" serve --config "$WORK/flowthrough.toml" >>"$WORK/flowthrough.log" 2>&1 &
  FT_PID=$!
  wait_ready "$ADMIN_PORT" "$FT_PID" flowthrough "$WORK/flowthrough.log"
}
# The store's pending entries as a node's admin listener reports them ((b)'s by default); on
# PostgreSQL every node of a store sees all of them.
pending() { curl -sf "http://127.0.0.1:${1:-$ADMIN_PORT}/status" | jq '.outbox.pending'; }
drained() { [ "$(pending "${1:-}" 2>/dev/null || echo x)" = 0 ]; }
# Delivery is no longer paced (the pace learned from 429s has been dropped).
unpaced() { curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -qx 'flowthrough_delivery_pace_per_second 0.0'; }
wait_drained() { wait_for drained "$1" ${2:+"$2"}; } # timeout, admin port
wait_for() { # condition, timeout seconds, the condition's arguments; prints the seconds it took, or "timeout"
  local cond=$1 limit=$2 start now
  shift 2
  start=$(date +%s.%N)
  while :; do
    now=$(date +%s.%N)
    if "$cond" "$@"; then break; fi
    if awk -v s="$start" -v n="$now" -v t="$limit" 'BEGIN{exit !(n - s > t)}'; then echo "timeout"; return; fi
    sleep 0.1
  done
  awk -v s="$start" -v n="$now" 'BEGIN{printf "%.1f", n - s}'
}

# The generator with this run's certificates.
load() { "$LOAD" --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client.pem" --key "$WORK/pki/client.key" --threads 1 "$@"; }
OCI_BODY="$ROOT/schemas/samples/user-add-17sp4.xml"

# ---------------------------------------------------------------------------------------------
if [ "$MODE" = crash ]; then
  start_flowthrough
  ACKED=$WORK/acked.txt
  : >"$ACKED"
  say "crash: $CRASH_N × kill -9 of flowthrough under load, restart on the same store"
  for i in $(seq 1 "$CRASH_N"); do
    load --target "127.0.0.1:$FT_PORT" --body "$OCI_BODY" --run "crash$i-$RANDOM" -c 32 \
      --duration 4 --acked-out "$ACKED" --json >"$WORK/crash-$i.json" &
    LOAD_PID=$!
    sleep "$(awk -v r="$RANDOM" 'BEGIN{printf "%.3f", 0.5 + (r % 3000) / 1000}')"
    kill -9 "$FT_PID"
    wait "$FT_PID" 2>/dev/null || true
    wait "$LOAD_PID" || true
    printf 'kill %2d: %s\n' "$i" "$(jq -c '{ok, errors, warnings}' "$WORK/crash-$i.json")" >&2
    start_flowthrough
  done
  drained=$(wait_drained 120)
  say "outbox drained after the last restart in ${drained} s"
  simstate >"$WORK/sim-state.json"
  jq -r '.subscribers[].userId' "$WORK/sim-state.json" | sort >"$WORK/delivered.txt"
  sort -u "$ACKED" >"$WORK/acked-sorted.txt"
  acked=$(wc -l <"$WORK/acked-sorted.txt")
  lost=$(comm -23 "$WORK/acked-sorted.txt" "$WORK/delivered.txt" | wc -l)
  dup=$(uniq -d "$WORK/delivered.txt" | wc -l)
  extra=$(comm -13 "$WORK/acked-sorted.txt" <(sort -u "$WORK/delivered.txt") | wc -l)
  posts=$(jq '.counters.provision // 0' "$WORK/sim-state.json")
  subs=$(wc -l <"$WORK/delivered.txt")
  echo "kills: $CRASH_N"
  echo "acknowledged requests: $acked"
  echo "lost = $lost (acknowledged, not at the simulator)"
  echo "duplicated = $dup (userIds with more than one subscriber)"
  echo "delivered without an acknowledgement (in flight at a kill, written before it): $extra"
  echo "POSTs received by the simulator: $posts for $subs subscribers (re-sent POSTs answered 409: $((posts - subs)))"
  comm -23 "$WORK/acked-sorted.txt" "$WORK/delivered.txt" | head -20
  [ "$lost" = 0 ] && [ "$dup" = 0 ]
  exit $?
fi

# ---------------------------------------------------------------------------------------------
if [ "$MODE" = faults ]; then
  start_flowthrough
  RATE=${BENCH_FAULT_RATE:-500}
  R=$WORK/results
  mkdir -p "$R"
  ACKED=$WORK/acked.txt
  : >"$ACKED"
  ft_metric() { # awk regex on the series; the sum of the matching samples
    curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v f="$1" '$1 ~ f { s += $2 } END { printf "%d", s }'
  }
  sim_counter() { jq ".counters.$2 // 0" "$1"; }
  # One phase: the fault loop (a shell function, or none) runs beside FAULT_S s of load at RATE.
  phase() { # name, fault function or "", extra generator arguments...
    local name=$1 fault=$2 fault_pid=
    shift 2
    say "$name: $RATE req/s for $FAULT_S s"
    simstate >"$R/$name-sim-before.json"
    ft_metric '^flowthrough_token_refreshes_total' >"$R/$name-refreshes-before"
    ft_metric '^flowthrough_webex_calls_total' >"$R/$name-calls-before"
    ft_metric '^flowthrough_webex_calls_total.*status="429"' >"$R/$name-429-before"
    ft_metric '^flowthrough_reloads_total.*outcome="ok"' >"$R/$name-reloads-before"
    if [ -n "$fault" ]; then "$fault" & fault_pid=$!; fi
    load --target "127.0.0.1:$FT_PORT" --body "$OCI_BODY" --run "$name-$RANDOM" -c "$CONNS" \
      --rate "$RATE" --duration "$FAULT_S" --acked-out "$ACKED" --server-pid "$FT_PID" --json "$@" >"$R/$name.json"
    if [ -n "$fault_pid" ]; then kill "$fault_pid" 2>/dev/null; wait "$fault_pid" 2>/dev/null || true; fi
    simctl '{"rate_limit_per_s": 0}'
    wait_drained 120 >"$R/$name-drain"
    # The next phase starts unpaced: what a storm leaves behind is this phase's, not the next's.
    wait_for unpaced 180 >"$R/$name-unpaced"
    simstate >"$R/$name-sim-after.json"
    ft_metric '^flowthrough_token_refreshes_total' >"$R/$name-refreshes-after"
    ft_metric '^flowthrough_webex_calls_total' >"$R/$name-calls-after"
    ft_metric '^flowthrough_webex_calls_total.*status="429"' >"$R/$name-429-after"
    ft_metric '^flowthrough_reloads_total.*outcome="ok"' >"$R/$name-reloads-after"
  }
  # Every second, every access token stops working (a revocation on Webex's side): each call in
  # flight is answered 401 and wants a new token at the same moment.
  token_storm() { while :; do sleep 1; curl -sf --cacert "$WORK/sim/ca.pem" -X POST "$SIM/_sim/expire_tokens" >/dev/null; done; }
  # One second in two, Webex lets through one call per second and answers the rest 429. It
  # starts 3 s into the load, as a storm meets a node in steady traffic: what Webex took before
  # it is what the pace returns to.
  limit_storm() { sleep 3; while :; do simctl '{"rate_limit_per_s": 1}'; sleep 1; simctl '{"rate_limit_per_s": 0}'; sleep 1; done; }
  # The certificates are reloaded every half second while new connections keep arriving.
  reload_storm() {
    load --target "127.0.0.1:$FT_PORT" --new-connection --method GET --path /tls-probe -c 4 --rate 100 \
      --duration "$FAULT_S" --json >"$R/reload-handshakes.json" &
    while :; do sleep 0.5; curl -sf -X POST "http://127.0.0.1:$ADMIN_PORT/admin/reload" >/dev/null || echo "reload refused" >&2; done
  }
  load --target "127.0.0.1:$FT_PORT" --body "$OCI_BODY" -c "$CONNS" --duration 2 --json >/dev/null
  wait_drained 60 >/dev/null
  phase baseline ""
  phase token token_storm
  phase limit limit_storm
  phase reload reload_storm
  sleep 0.5 # the handshake generator of the reload phase writes its report as it ends

  delta() { echo $(( $(cat "$R/$1-$2-after") - $(cat "$R/$1-$2-before") )); }
  sim_delta() { echo $(( $(sim_counter "$R/$1-sim-after.json" "$2") - $(sim_counter "$R/$1-sim-before.json" "$2") )); }
  echo "Fixed rate $RATE req/s for $FAULT_S s per phase, $CONNS keep-alive connections, UserAdd sample."
  echo
  echo "| phase | answers (ok / 7020 / errors) | p50 / p99 / max ms | Webex calls | 429s | 401s | token refreshes | reloads | drained after | unpaced after that |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for p in baseline token limit reload; do
    f="$R/$p.json"
    printf '| %s | %s / %s / %s | %s / %s / %s | %s | %s | %s | %s | %s | %s s | %s s |\n' "$p" \
      "$(jq .ok "$f")" "$(jq '.warnings.oci_7020 // 0' "$f")" "$(jq '[.errors[]] | add // 0' "$f")" \
      "$(jq .latency_ms.p50 "$f")" "$(jq .latency_ms.p99 "$f")" "$(jq .latency_ms.max "$f")" \
      "$(delta "$p" calls)" "$(delta "$p" 429)" "$(sim_delta "$p" sent_401)" "$(delta "$p" refreshes)" \
      "$(delta "$p" reloads)" "$(cat "$R/$p-drain")" "$(cat "$R/$p-unpaced")"
  done
  echo
  echo "Token storms: $(sim_delta token tokens_expired) expiries at the simulator."
  echo "Handshakes during the reloads: $(jq -c '{ok, errors}' "$R/reload-handshakes.json") (answered 404 by design: GET /tls-probe)."
  jq -r '.subscribers[].userId' "$R/reload-sim-after.json" | sort >"$WORK/delivered.txt"
  sort -u "$ACKED" >"$WORK/acked-sorted.txt"
  lost=$(comm -23 "$WORK/acked-sorted.txt" "$WORK/delivered.txt" | wc -l)
  dup=$(uniq -d "$WORK/delivered.txt" | wc -l)
  echo "Acknowledged: $(wc -l <"$WORK/acked-sorted.txt"); lost = $lost; duplicated = $dup."
  [ "$lost" = 0 ] && [ "$dup" = 0 ]
  exit $?
fi

# PostgreSQL for (b-pg) and (b-pg2): a throwaway cluster (fsync on) and one database per
# configuration measured, so that an idle node never takes another configuration's work.
start_postgres() { # databases
  PGBIN=$(pg_config --bindir 2>/dev/null || true)
  [ -x "$PGBIN/initdb" ] || PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$PGBIN/initdb" ] || die "PostgreSQL's server binaries are missing (apt-get install postgresql)"
  say "PostgreSQL ($PGBIN) on 127.0.0.1:$PG_PORT, data in $WORK/pg"
  chmod 755 "$WORK"
  mkdir -p "$WORK/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
  "${AS_PG[@]}" "$PGBIN/initdb" -D "$WORK/pg/data" -U flowthrough --auth=trust -E UTF8 --locale=C >"$WORK/pg/initdb.log" 2>&1 ||
    die "initdb failed; see $WORK/pg/initdb.log"
  printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nfsync = on\nsynchronous_commit = on\n" \
    "$PG_PORT" "$WORK/pg" | "${AS_PG[@]}" tee -a "$WORK/pg/data/postgresql.conf" >/dev/null
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w start >/dev/null ||
    die "PostgreSQL did not start; see $WORK/pg/server.log"
  PG_PID=$(head -1 "$WORK/pg/data/postmaster.pid")
  for db in "$@"; do "${AS_PG[@]}" "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U flowthrough "$db"; done
}
psql_do() { "$PGBIN/psql" -X -h 127.0.0.1 -p "$PG_PORT" -U flowthrough -d "$1" -qAtc "$2"; } # database, SQL
# flowthrough on PostgreSQL: (b)'s config with the store, the listeners and [cluster] changed. The
# pid goes into the variable named first before the wait, so the trap stops a node that never
# becomes ready.
start_pg_node() { # pid variable, node_id, database, port, admin port, further [cluster] lines
  local conf=$WORK/flowthrough-$2.toml log=$WORK/flowthrough-$2.log
  awk -v pg="$PG_PORT" -v db="$3" -v ft="$4" -v admin="$5" -v ftp="$FT_PORT" -v adminp="$ADMIN_PORT" '
    /^path = / { print "backend = \"postgres\""; print ""; print "[store.postgres]";
      print "host = \"127.0.0.1\""; print "port = " pg; print "dbname = \"" db "\"";
      print "user = \"flowthrough\""; print "tls = \"disable\""; next }
    { gsub("127.0.0.1:" ftp "\"", "127.0.0.1:" ft "\""); gsub("127.0.0.1:" adminp "\"", "127.0.0.1:" admin "\""); print }
  ' "$WORK/flowthrough.toml" >"$conf"
  printf '\n[cluster]\nnode_id = "%s"\n%s\n' "$2" "${6:-}" >>"$conf"
  "$BIN" serve --config "$conf" >>"$log" 2>&1 &
  printf -v "$1" '%s' "$!"
  wait_ready "$5" "$!" "flowthrough ($2)" "$log"
}
stop_node() { # pid variable: SIGTERM (the node drains and hands its lanes back), then forget it
  kill -TERM "${!1}"
  wait "${!1}" 2>/dev/null || true
  printf -v "$1" '%s' ''
}

# ---------------------------------------------------------------------------------------------
if [ "$MODE" = soak ]; then
  if [ "$SOAK_STORE" = postgres ]; then
    start_postgres soak
    start_pg_node FTPG_PID soak soak "$FTPG_PORT" "$ADMIN_PG_PORT"
    SOAK_PID=$FTPG_PID SOAK_PORT=$FTPG_PORT
    # The database's size, and the resident memory of every PostgreSQL process beside
    # flowthrough's (shared buffers are counted in each backend that touched them: a ceiling).
    store_kib() { psql_do soak "select pg_database_size('soak') / 1024"; }
    db_rss_kib() { for p in "$PG_PID" $(pgrep -P "$PG_PID"); do awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null; done | awk '{s += $1} END {print s + 0}'; }
  else
    start_flowthrough
    SOAK_PID=$FT_PID SOAK_PORT=$FT_PORT
    store_kib() { du -sk "$WORK/store" | cut -f1; }
    db_rss_kib() { echo 0; }
  fi
  RATE=${BENCH_SOAK_RATE:-300}
  say "soak on $SOAK_STORE: $SOAK_MIN min at $RATE req/s through flowthrough (pid $SOAK_PID), sampled every 10 s"
  load --target "127.0.0.1:$SOAK_PORT" --body "$OCI_BODY" --body "$ROOT/schemas/samples/user-delete.xml" \
    --users 1000 --rate "$RATE" -c 16 --duration $((SOAK_MIN * 60)) --json >"$WORK/soak-load.json" &
  LOAD_PID=$!
  # The store's size beside RSS: sled keeps per-page metadata in memory beyond its cache, so
  # sled's memory follows the store's size (examples/store_io), which the caps hold level.
  echo "t_s rss_kib fds store_kib db_rss_kib" | tee "$WORK/soak.txt"
  t=0
  while kill -0 "$LOAD_PID" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$SOAK_PID/status")
    fds=$(find "/proc/$SOAK_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
    echo "$t $rss $fds $(store_kib) $(db_rss_kib)" | tee -a "$WORK/soak.txt"
    sleep 10
    t=$((t + 10))
  done
  wait "$LOAD_PID" || true
  jq -c '{requests, ok_per_s, latency_ms, warnings, errors}' "$WORK/soak-load.json"
  [ "${BENCH_KEEP:-0}" = 1 ] || cp "$WORK/soak.txt" "/var/tmp/flowthrough-soak-$SOAK_STORE-$(date +%H%M).txt"
  # Flat (issue 24): RSS grows by at most 2 % over the last half, read as the least-squares
  # slope of its samples times the half's length, against the half's mean. A slope rather than
  # two means, because pruning rounds draw a sawtooth of ±15 % that two means catch at different
  # phases; fds may move by 10 at most. The first half is the warm-up: the store fills up to its
  # caps and sled's cache and the allocator's arenas with it.
  awk 'NR > 1 { t[n] = $1; r[n] = $2; f[n] = $3; s[n] = $4; n++ }
    END {
      if (n < 12) { print "verdict: too short to judge (" n " samples; run at least 2 minutes)"; exit }
      h = int(n / 2)
      for (i = h; i < n; i++) { mt += t[i]; mr += r[i]; mf += f[i]; ms += s[i] }
      k = n - h; mt /= k; mr /= k; mf /= k; ms /= k
      for (i = h; i < n; i++) { sxy += (t[i] - mt) * (r[i] - mr); sxx += (t[i] - mt) ^ 2; fxy += (t[i] - mt) * (f[i] - mf) }
      span = t[n - 1] - t[h]
      growth = sxy / sxx * span / mr * 100
      fds = fxy / sxx * span
      for (i = h; i < n; i++) { if (!lo || r[i] < lo) lo = r[i]; if (r[i] > hi) hi = r[i] }
      printf "last half (%d s): RSS mean %.1f MiB (%.1f to %.1f), trend %+.2f %% over the half; fds %.0f (trend %+.1f); store %.0f MiB\n", span, mr / 1024, lo / 1024, hi / 1024, growth, mf, fds, ms / 1024
      flat = (growth <= 2) && (fds <= 10)
      print "verdict: " (flat ? "FLAT (at most 2 % growth over the last half)" : "GROWING (more than 2 % over the last half: look for a leak)")
    }' "$WORK/soak.txt"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
if [ "$MODE" != cluster ]; then start_flowthrough; fi
if [ "$MODE" = pg ]; then
  start_postgres flowthrough
  start_pg_node FTPG_PID pg flowthrough "$FTPG_PORT" "$ADMIN_PG_PORT"
fi
if [ "$MODE" = cluster ]; then
  start_postgres one two
  start_pg_node FTPG_PID one one "$FTPG_PORT" "$ADMIN_PG_PORT"
  start_pg_node FTPG2A_PID two-a two "$FTPG2A_PORT" "$ADMIN_PG2A_PORT"
  start_pg_node FTPG2B_PID two-b two "$FTPG2B_PORT" "$ADMIN_PG2B_PORT"
fi

if [ "$MODE" = bench ]; then
say "nginx (plain mTLS reverse proxy) on 127.0.0.1:$NGX_PORT"
if ! command -v nginx >/dev/null; then
  echo "nginx is missing: installing the Debian package" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y nginx >&2
fi
mkdir -p "$WORK/nginx"
sed -e "s|@WORK@|$WORK|g" -e "s|@PORT@|$NGX_PORT|g" -e "s|@SIM_PORT@|$SIM_PORT|g" \
  -e "s|@PKI@|$WORK/pki|g" -e "s|@SIM_CA@|$WORK/sim/ca.pem|g" -e "s|@WORKERS@|$WORKERS|g" \
  "$ROOT/bench/nginx.conf.template" >"$WORK/nginx/nginx.conf"
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
NGX_PID=$!
wait_tcp "$NGX_PORT" nginx
sleep 0.3
NGX_PIDS=("$NGX_PID")
for p in $(pgrep -P "$NGX_PID"); do NGX_PIDS+=("$p"); done
NGX_PID_ARGS=()
for p in "${NGX_PIDS[@]}"; do NGX_PID_ARGS+=(--server-pid "$p"); done

say "(d) actix-web + reqwest relay (examples/stack_floor.rs) on 127.0.0.1:$FLOOR_PORT"
"$FLOOR" "127.0.0.1:$FLOOR_PORT" "$SIM" "$WORK/pki/server.pem" "$WORK/pki/server.key" "$WORK/pki/ca.pem" \
  "$WORK/sim/ca.pem" "$WORKERS" >"$WORK/floor.log" 2>&1 &
FLOOR_PID=$!
wait_tcp "$FLOOR_PORT" "the stack floor relay"
fi

# (a) and (c) send the Webex call flowthrough itself would make for the same document, with a
# bearer token from the simulator: the same upstream work as (b), minus translation and the outbox.
TOKEN=$(curl -sf --cacert "$WORK/sim/ca.pem" -d grant_type=refresh_token -d client_id=bench \
  --data-urlencode "client_secret=$SECRET" --data-urlencode "refresh_token=$REFRESH" \
  "$SIM/v1/access_token" | jq -r .access_token)
"$BIN" translate "$OCI_BODY" --config "$WORK/flowthrough.toml" --json |
  jq -c '.commands[0].webex.body' >"$WORK/webex-body.json"

R=$WORK/results
mkdir -p "$R"
target_a() { load --target "127.0.0.1:$SIM_PORT" --ca "$WORK/sim/ca.pem" --path /v1/broadworks/subscribers --body "$WORK/webex-body.json" \
  --content-type application/json --header "Authorization: Bearer $TOKEN" --server-pid "$SIM_PID" "$@"; }
target_b() { load --target "127.0.0.1:$FT_PORT" --path /provisioning --body "$OCI_BODY" --server-pid "$FT_PID" "$@"; }
relayed() { # port, then the generator's other arguments: the Webex call, through a relay to the simulator
  local port=$1; shift
  load --target "127.0.0.1:$port" --path /v1/broadworks/subscribers --body "$WORK/webex-body.json" \
    --content-type application/json --header "Authorization: Bearer $TOKEN" "$@"
}
target_c() { relayed "$NGX_PORT" "${NGX_PID_ARGS[@]}" "$@"; }
target_d() { relayed "$FLOOR_PORT" --server-pid "$FLOOR_PID" "$@"; }
# (b-pg), (b-pg2): their CPU is flowthrough's and every PostgreSQL process's (the postmaster, its
# background workers, the backends of every node's pool), listed anew before each run: the pools
# open their backends during the warm-up, and an autovacuum worker comes and goes.
pg_pids() {
  PG_PID_ARGS=(--server-pid "$PG_PID")
  for p in $(pgrep -P "$PG_PID"); do PG_PID_ARGS+=(--server-pid "$p"); done
}
target_bpg() { pg_pids; load --target "127.0.0.1:$FTPG_PORT" --path /provisioning --body "$OCI_BODY" --server-pid "$FTPG_PID" "${PG_PID_ARGS[@]}" "$@"; }
# One generator for both nodes, every other connection to each, as a balancer in front would.
target_bpg2() {
  pg_pids
  load --target "127.0.0.1:$FTPG2A_PORT" --target "127.0.0.1:$FTPG2B_PORT" --path /provisioning --body "$OCI_BODY" \
    --server-pid "$FTPG2A_PID" --server-pid "$FTPG2B_PID" "${PG_PID_ARGS[@]}" "$@"
}

# Reading the reports.
ROUNDS=${BENCH_HALF_ROUNDS:-3}
j() { jq -r "$1" "$R/$2"; }
median() { # [printf format]: of the numbers on stdin; "n/a" when a report lacks the figure in every round
  sort -g | awk -v f="${1:-%s}" '$1 != "null" && NF { v[++n] = $1 }
    END { if (!n) print "n/a"; else printf f "\n", (n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2) }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a != "n/a" && b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }
per_round() { # jq path, measurement (max, half), target: the figure of each round
  for round in $(seq 1 "$ROUNDS"); do j "$1" "$2-$3-$round.json"; done
}
added_diffs() { # target [measurement, default half]: its p99 minus (a)'s of the same round, one line a round
  local m=${2:-half}
  for round in $(seq 1 "$ROUNDS"); do
    awk -v x="$(j .latency_ms.p99 "$m-$1-$round.json")" -v a="$(j .latency_ms.p99 "$m-a-$round.json")" 'BEGIN{printf "%.2f\n", x - a}'
  done
}
added() { # target [measurement]: the median of added_diffs, then their range
  local diffs
  diffs=$(added_diffs "$1" "${2:-}")
  printf '%.2f (%s to %s)' "$(echo "$diffs" | median)" "$(echo "$diffs" | sort -g | head -1)" "$(echo "$diffs" | sort -g | tail -1)"
}
if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  BUILT="prebuilt binaries from $TARGET/release"
else
  BUILT="built from commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '(not a git checkout)')"
fi
# bench/RESULTS.md with $WORK/section.md in place of the last run's section between the same
# markers (appended the first time); everything outside the markers is kept.
write_section() { # marker name
  local out=$ROOT/bench/RESULTS.md section=$WORK/section.md
  if [ -f "$out" ] && grep -q "<!-- $1:start" "$out"; then
    awk -v f="$section" -v m="$1" '
      index($0, "<!-- " m ":start") == 1 { while ((getline line < f) > 0) print line; skip = 1; next }
      index($0, "<!-- " m ":end -->") == 1 { skip = 0; next }
      !skip { print }' "$out" >"$out.new"
  elif [ -f "$out" ]; then
    { cat "$out"; echo; cat "$section"; } >"$out.new"
  else
    { echo "# flowthrough benchmark results"; echo; cat "$section"; } >"$out.new"
  fi
  mv "$out.new" "$out"
  cat "$section"
}

# pg and cluster: a warm-up, then ROUNDS rounds at max and ROUNDS rounds at half of the base's
# median max, the targets taking turns within each round, so that a stall of this shared machine
# lands in one round of one target and the medians leave it out. Each run starts with every store
# drained: a backlog left by the target before would take CPU from the one measured.
STORES=()
settled() { for port in "${STORES[@]}"; do wait_drained 60 "$port" >/dev/null; done; }
measure_rounds() { # (a), the base whose max sets the half load, the others
  say "warm-up"
  for t in "$@"; do settled; "target_$t" -c "$CONNS" --duration 2 --json >/dev/null; done
  say "max throughput, keep-alive, $CONNS connections, ${DUR} s each, $ROUNDS rounds"
  for round in $(seq 1 "$ROUNDS"); do
    for t in "$@"; do settled; "target_$t" -c "$CONNS" --duration "$DUR" --json >"$R/max-$t-$round.json"; done
  done
  HALF=$(half_of "$2")
  say "latency at half of ($2)'s max: $HALF req/s, $ROUNDS rounds"
  fixed_rate_rounds half "$HALF" "$@"
}
half_of() { per_round .ok_per_s max "$1" | median | awk '{ h = int($1 / 2); print (h < 1 ? 1 : h) }'; } # target
fixed_rate_rounds() { # measurement name, rate, targets
  local m=$1 rate=$2
  shift 2
  for round in $(seq 1 "$ROUNDS"); do
    for t in "$@"; do traced "$m" "$t" "$round" -c "$CONNS" --rate "$rate" --duration "$DUR"; done
  done
}
# One fixed-rate run of a target; for flowthrough also its own account of each request's stages
# (`/debug/stages`, cleared before the run), beside the generator's report.
admin_of() { case $1 in b) echo "$ADMIN_PORT" ;; bpg) echo "$ADMIN_PG_PORT" ;; esac; }
traced() { # measurement, target, round, the generator's arguments
  local m=$1 t=$2 round=$3 admin
  shift 3
  admin=$(admin_of "$t")
  settled
  [ -z "$admin" ] || curl -sf -X DELETE "http://127.0.0.1:$admin/debug/stages" >/dev/null
  "target_$t" "$@" --json >"$R/$m-$t-$round.json"
  [ -z "$admin" ] || curl -sf "http://127.0.0.1:$admin/debug/stages" >"$R/stages-$m-$t-$round.json"
}
# Where the time of flowthrough's requests went in one measurement (issue 24), from each run's
# /debug/stages: per stage the median over the rounds of its p50, its p99 and its mean among the
# slowest 1 % of requests, in ms, for each target named. The generator's p99 beside the
# handler's own total says what the connection, TLS and HTTP around the handler took.
stage_table() { # measurement, targets
  local m=$1 t stage
  shift
  local head="| stage" rule="| ---"
  for t in "$@"; do head="$head | ($t) p50 | ($t) p99 | ($t) slowest 1 %"; rule="$rule | --- | --- | ---"; done
  echo "$head |"
  echo "$rule |"
  stage_cell() { # target, jq filter on a stage summary → µs
    for round in $(seq 1 "$ROUNDS"); do
      jq -r "$2 // \"null\"" "$R/stages-$m-$1-$round.json" 2>/dev/null || echo null
    done | median | awk '$1 == "n/a" { print "—"; next } { printf "%.3f", $1 / 1000 }'
  }
  for stage in parse map accept queue claim webex notify wake flush audit reply; do
    local row="| $stage"
    for t in "$@"; do
      for f in p50_us p99_us tail_mean_us; do
        row="$row | $(stage_cell "$t" ".stages[] | select(.stage == \"$stage\") | .$f")"
      done
    done
    echo "$row |"
  done
  local row="| total in the handler"
  for t in "$@"; do row="$row | $(stage_cell "$t" .total.p50_us) | $(stage_cell "$t" .total.p99_us) | $(stage_cell "$t" .total.max_us) (max)"; done
  echo "$row |"
  row="| the generator's latency"
  for t in "$@"; do row="$row | $(per_round .latency_ms.p50 "$m" "$t" | median) | $(per_round .latency_ms.p99 "$m" "$t" | median) | "; done
  echo "$row |"
}
# The rates a real Application Server sends (issue 24): 100/s and 10/s over 4 connections, each
# round 2 × and 5 × the measurement time, so that a p99 rests on 200 or more requests a round.
LOW_RATES=(100 10)
low_rate_rounds() { # targets
  local rate
  for rate in "${LOW_RATES[@]}"; do
    local seconds=$((rate >= 100 ? DUR * 2 : DUR * 5))
    say "latency at $rate req/s, 4 connections, ${seconds} s, $ROUNDS rounds"
    for round in $(seq 1 "$ROUNDS"); do
      for t in "$@"; do traced "low$rate" "$t" "$round" -c 4 --rate "$rate" --duration "$seconds"; done
    done
  done
}
low_rate_rows() { # base, other
  local rate
  for rate in "${LOW_RATES[@]}"; do
    printf '| p99 at %s req/s, 4 connections (ms), median of %s rounds | %s | %s | %s | | |\n' "$rate" "$ROUNDS" \
      "$(per_round .latency_ms.p99 "low$rate" a | median)" "$(per_round .latency_ms.p99 "low$rate" "$1" | median)" \
      "$(per_round .latency_ms.p99 "low$rate" "$2" | median)"
    printf '| p99 added over direct at %s req/s (ms): median (range) | — | %s | %s | %s | ≤ 1 (issue 24) |\n' "$rate" \
      "$(added "$1" "low$rate")" "$(added "$2" "low$rate")" \
      "$(ratio "$(added_diffs "$2" "low$rate" | median)" "$(added_diffs "$1" "low$rate" | median)")"
  done
}
# The table rows pg and cluster share: (a), the base, the other and other / base.
comparison_rows() { # base, other, throughput ratio target, added p99 target
  local b=$1 o=$2
  printf '| max throughput, keep-alive (ok req/s), median of %s rounds | %s | %s | %s | %s | %s |\n' "$ROUNDS" \
    "$(per_round .ok_per_s max a | median %.0f)" "$(per_round .ok_per_s max "$b" | median %.0f)" \
    "$(per_round .ok_per_s max "$o" | median %.0f)" \
    "$(ratio "$(per_round .ok_per_s max "$o" | median)" "$(per_round .ok_per_s max "$b" | median)")" "$3"
  printf '| server CPU per request at max (µs; on PostgreSQL: flowthrough + postgres), median | %s | %s | %s | %s | |\n' \
    "$(per_round .server.cpu_per_request_us max a | median %.0f)" "$(per_round .server.cpu_per_request_us max "$b" | median %.0f)" \
    "$(per_round .server.cpu_per_request_us max "$o" | median %.0f)" \
    "$(ratio "$(per_round .server.cpu_per_request_us max "$o" | median)" "$(per_round .server.cpu_per_request_us max "$b" | median)")"
  printf '| p99 at %s req/s (ms), median of %s rounds | %s | %s | %s | | |\n' "$HALF" "$ROUNDS" \
    "$(per_round .latency_ms.p99 half a | median)" "$(per_round .latency_ms.p99 half "$b" | median)" \
    "$(per_round .latency_ms.p99 half "$o" | median)"
  printf '| p99 added over direct at %s req/s (ms): median (range) | — | %s | %s | %s | %s |\n' "$HALF" \
    "$(added "$b")" "$(added "$o")" "$(ratio "$(added_diffs "$o" | median)" "$(added_diffs "$b" | median)")" "$4"
}
errors_of() { # measurement, target: the generator's errors summed over the rounds
  jq -cs '[.[].errors | to_entries[]] | group_by(.key) | map({key: .[0].key, value: (map(.value) | add)}) | from_entries' "$R/$1-$2"-*.json
}
pg_setup_line() {
  echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') in a throwaway cluster on the same machine (fsync on, synchronous_commit on, defaults otherwise; data under /var/tmp);"
}

if [ "$MODE" = pg ]; then
  STORES=("$ADMIN_PORT" "$ADMIN_PG_PORT")
  measure_rounds a b bpg
  # (b)'s half load is over (b-pg)'s max (its queue then grows for the whole round): the added
  # p99 of both is also measured at half of (b-pg)'s own max, a load each of them carries.
  HALF_PG=$(half_of bpg)
  say "latency at half of (bpg)'s max: $HALF_PG req/s, $ROUNDS rounds"
  fixed_rate_rounds halfpg "$HALF_PG" a b bpg
  low_rate_rounds a b bpg
  {
    echo "<!-- bench-pg:start (written by bench/run.sh pg; everything outside these markers is kept) -->"
    echo "## (b) flowthrough on sled beside (b-pg) flowthrough on PostgreSQL"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') with \`bench/run.sh pg${2:+ $2}\` (${DUR} s per measurement), $BUILT."
    pg_setup_line
    echo "flowthrough (b-pg): pool of 16, tls = disable (loopback). Everything shares the same $(nproc) cores. Generator as above, $CONNS connections."
    echo
    echo "| measure | (a) direct | (b) sled | (b-pg) PostgreSQL | b-pg / b | target |"
    echo "| --- | --- | --- | --- | --- | --- |"
    comparison_rows b bpg "≥ 0.5" "≤ 2"
    printf '| p99 at %s req/s, half of (b-pg)'"'"'s max (ms), median of %s rounds | %s | %s | %s | | |\n' "$HALF_PG" "$ROUNDS" \
      "$(per_round .latency_ms.p99 halfpg a | median)" "$(per_round .latency_ms.p99 halfpg b | median)" \
      "$(per_round .latency_ms.p99 halfpg bpg | median)"
    printf '| p99 added over direct at %s req/s (ms): median (range) | — | %s | %s | %s | ≤ 2 |\n' "$HALF_PG" \
      "$(added b halfpg)" "$(added bpg halfpg)" "$(ratio "$(added_diffs bpg halfpg | median)" "$(added_diffs b halfpg | median)")"
    low_rate_rows b bpg
    # Issue 24 counts PostgreSQL's durable commit as (b-pg)'s floor: its accept stage (the one
    # statement committed with synchronous_commit = on) in the same runs, beside what is left.
    for rate in "${LOW_RATES[@]}"; do
      floor_ms=$(for round in $(seq 1 "$ROUNDS"); do
        jq -r '.stages[] | select(.stage == "accept") | .p99_us / 1000' "$R/stages-low$rate-bpg-$round.json" 2>/dev/null || echo null
      done)
      above=$(paste <(added_diffs bpg "low$rate") <(echo "$floor_ms") | awk '$2 != "null" && NF == 2 { printf "%.2f\n", $1 - $2 }')
      printf '| (b-pg) at %s req/s: its floor, the accept'"'"'s own p99 (the durable commit), and the p99 added above it (ms), medians of %s rounds | — | — | %s; %s | | ≤ 1 (issue 24) |\n' \
        "$rate" "$ROUNDS" "$(echo "$floor_ms" | median %.2f)" "$(echo "$above" | median %.2f)"
    done
    for m in low100 low10 halfpg; do
      echo
      case $m in
        low100) echo "Where the time goes at 100 req/s, 4 connections (ms; \`/debug/stages\` of each run, medians of $ROUNDS rounds):" ;;
        low10) echo "Where the time goes at 10 req/s, 4 connections (ms; \`/debug/stages\` of each run, medians of $ROUNDS rounds):" ;;
        halfpg) echo "Where the time goes at $HALF_PG req/s, half of (b-pg)'s max (ms; \`/debug/stages\` of each run, medians of $ROUNDS rounds):" ;;
      esac
      echo
      stage_table "$m" b bpg
    done
    echo
    echo "Errors: max $(errors_of max b) / $(errors_of max bpg); half-load 7020s (b-pg): $(jq -s '[.[].warnings.oci_7020 // 0] | add' "$R"/half-bpg-*.json) at $HALF req/s, $(jq -s '[.[].warnings.oci_7020 // 0] | add' "$R"/halfpg-bpg-*.json) at $HALF_PG req/s."
    echo "<!-- bench-pg:end -->"
  } >"$WORK/section.md"
  write_section bench-pg
  exit 0
fi

# The survivor's first delivery of a user the killed node held: only a node holding a lease on a
# lane with work strands anyone, so the kill waits for one. The default lease is 30 s; a short one
# keeps the run short, and the default's figure is worked out from it.
FAIL_LEASE_MS=2000
FAIL_RATE=${BENCH_FAIL_RATE:-100}
# Webex's latency keeps calls under way, as in tests/cluster.rs: with answers in microseconds a
# node holds a lane for so short a time that a kill rarely finds one held.
FAIL_LATENCY_MS=100
holds_work() { # node_id
  [ "$(psql_do two "SELECT count(*) FROM lanes l WHERE lease_owner = '$1' AND lease_until > now()
    AND EXISTS (SELECT 1 FROM outbox o WHERE o.user_id = l.user_id AND o.state = 'pending')")" -gt 0 ]
}
none_pending() { [ "$(psql_do two "SELECT count(*) FROM outbox WHERE id IN ($1) AND state = 'pending'")" = 0 ]; }
failover() {
  say "failover: (b-pg2) restarted with lease_ms = $FAIL_LEASE_MS, $FAIL_RATE req/s, Webex answering after $FAIL_LATENCY_MS ms; kill -9 of two-b"
  # (b-pg) is measured: its node would only take CPU from here on.
  stop_node FTPG_PID
  stop_node FTPG2A_PID
  stop_node FTPG2B_PID
  start_pg_node FTPG2A_PID two-a two "$FTPG2A_PORT" "$ADMIN_PG2A_PORT" "lease_ms = $FAIL_LEASE_MS"
  start_pg_node FTPG2B_PID two-b two "$FTPG2B_PORT" "$ADMIN_PG2B_PORT" "lease_ms = $FAIL_LEASE_MS"
  wait_drained 60 "$ADMIN_PG2A_PORT" >/dev/null
  simctl "{\"latency_ms\": $FAIL_LATENCY_MS}"
  load --target "127.0.0.1:$FTPG2A_PORT" --target "127.0.0.1:$FTPG2B_PORT" --path /provisioning --body "$OCI_BODY" \
    -c 16 --rate "$FAIL_RATE" --duration 15 --json >"$R/failover-load.json" &
  LOAD_PID=$!
  sleep 3
  wait_for holds_work 10 two-b >/dev/null
  kill -9 "$FTPG2B_PID"
  KILLED_MS=$(date +%s%3N)
  wait "$FTPG2B_PID" 2>/dev/null || true
  FTPG2B_PID=
  # Entries still pending on lanes whose lease two-b holds: its users, stranded until it runs out.
  psql_do two "SELECT coalesce(string_agg(o.id::text, ','), ''), count(DISTINCT o.user_id),
      coalesce((min(extract(epoch FROM l.lease_until)) * 1000)::bigint - $KILLED_MS, 0),
      coalesce((max(extract(epoch FROM l.lease_until)) * 1000)::bigint - $KILLED_MS, 0)
    FROM outbox o JOIN lanes l USING (user_id)
    WHERE o.state = 'pending' AND l.lease_owner = 'two-b' AND l.lease_until > now()" >"$R/failover-stranded.txt"
  IFS='|' read -r STRANDED STRANDED_USERS LEASE_MIN_MS LEASE_MAX_MS <"$R/failover-stranded.txt"
  if [ -n "$STRANDED" ]; then
    wait_for none_pending 60 "$STRANDED" >/dev/null
    # An outcome two-b had sent just before the kill can still commit just after the query above:
    # such entries ended before the kill, and are counted apart from the survivor's deliveries.
    psql_do two "SELECT count(*) FILTER (WHERE ended_ms < $KILLED_MS),
        count(*) FILTER (WHERE ended_ms >= $KILLED_MS AND state = 'delivered'),
        coalesce(min(ended_ms) FILTER (WHERE ended_ms >= $KILLED_MS) - $KILLED_MS, -1),
        coalesce(max(ended_ms) - $KILLED_MS, -1)
      FROM outbox WHERE id IN ($STRANDED)" >"$R/failover-ended.txt"
  fi
  wait "$LOAD_PID" || true
  LOAD_PID=
  simctl '{"latency_ms": 0}'
}

if [ "$MODE" = cluster ]; then
  STORES=("$ADMIN_PG_PORT" "$ADMIN_PG2A_PORT")
  LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  measure_rounds a bpg bpg2
  LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
  failover
  {
    echo "<!-- bench-cluster:start (written by bench/run.sh cluster; everything outside these markers is kept) -->"
    echo "## Two nodes on one PostgreSQL store (issue 22)"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') in one run with \`bench/run.sh cluster${2:+ $2}\` (${DUR} s per measurement), $BUILT."
    pg_setup_line
    echo "(b-pg) is node \`one\` alone on database \`one\`; (b-pg2) is nodes \`two-a\` and \`two-b\` on database \`two\` (own node_id,"
    echo "ports and admin ports). All three run throughout, on separate databases so that no node takes another configuration's"
    echo "work; pool of 16, tls = disable, lease_ms and poll_ms at their defaults (30 s, 1 s). One generator (\`flowthrough-load\`,"
    echo "1 thread, $CONNS keep-alive connections; for (b-pg2) every other connection to each node). CPU per request: the"
    echo "flowthrough processes measured (one, or both) + every postgres process. Everything shares the same $(nproc) cores;"
    echo "load average (1, 5, 15 min) $LOAD_BEFORE before the measurements, $LOAD_AFTER after."
    echo
    echo "| measure | (a) direct | (b-pg) one node | (b-pg2) two nodes | two / one | target |"
    echo "| --- | --- | --- | --- | --- | --- |"
    comparison_rows bpg bpg2 "" ""
    echo
    echo "Errors: max $(errors_of max bpg) / $(errors_of max bpg2); half $(errors_of half bpg) / $(errors_of half bpg2);"
    echo "half-load 7020s: $(jq -s '[.[].warnings.oci_7020 // 0] | add' "$R"/half-bpg-*.json) / $(jq -s '[.[].warnings.oci_7020 // 0] | add' "$R"/half-bpg2-*.json)."
    echo
    echo "Failover: \`two-a\` and \`two-b\` restarted with \`lease_ms = $FAIL_LEASE_MS\` (poll_ms 1000, the default), the simulator"
    echo "answering after $FAIL_LATENCY_MS ms so that calls are under way, $FAIL_RATE req/s offered over both nodes; \`kill -9\` of \`two-b\`"
    echo "once it leased a lane with work pending."
    if [ -n "$STRANDED" ]; then IFS='|' read -r N_BEFORE N_DELIVERED FIRST_MS LAST_MS <"$R/failover-ended.txt"; fi
    if [ -z "$STRANDED" ]; then
      echo "Not measured in this run: two-b held no lane with work pending when it was killed (rerun)."
    elif [ "$FIRST_MS" -lt 0 ]; then
      echo "Not measured in this run: none of the $STRANDED_USERS users two-b held was delivered after the kill within 60 s."
    else
      echo "It held $(tr ',' '\n' <<<"$STRANDED" | wc -l) pending entries of $STRANDED_USERS users, their leases ending $LEASE_MIN_MS–$LEASE_MAX_MS ms after"
      echo "the kill. **The survivor's first delivery of one of them came $FIRST_MS ms after the kill**, the last $LAST_MS ms after"
      echo "($N_DELIVERED delivered after the kill; $N_BEFORE ended by two-b's own last writes, committed as it died)."
      echo "Load: $(jq -c '{ok, errors, warnings}' "$R/failover-load.json") (the connections to the dead node fail from the kill on)."
      echo
      echo "With the default lease, by arithmetic (not measured): a lease has the same age at the kill whatever its length,"
      echo "so $FIRST_MS − $FAIL_LEASE_MS + 30000 = $((FIRST_MS - FAIL_LEASE_MS + 30000)) ms; in the worst case (a lease taken as the node died,"
      echo "the poll just missed) lease_ms + poll_ms = 31000 ms."
    fi
    echo "<!-- bench-cluster:end -->"
  } >"$WORK/section.md"
  write_section bench-cluster
  exit 0
fi

# Idle first, so each process's RSS is its footprint with the connections, not after a load run.
say "1,000 idle mTLS connections"
target_a --idle 1000 --json >"$R/idle-a.json"
target_b --idle 1000 --json >"$R/idle-b.json"
target_c --idle 1000 --json >"$R/idle-c.json"
target_d --idle 1000 --json >"$R/idle-d.json"

say "warm-up"
for t in a b c d; do "target_$t" -c "$CONNS" --duration 2 --json >/dev/null; done

say "max throughput, keep-alive, $CONNS connections, ${DUR} s each"
for t in a b c d; do "target_$t" -c "$CONNS" --duration "$DUR" --json >"$R/max-$t.json"; done

HALF=$(jq '.ok_per_s / 2 | floor' "$R/max-b.json")
[ "$HALF" -ge 1 ] || HALF=1
# Several rounds, the targets taking turns within each: a stall of this shared machine lands in one
# round of one target, and the medians leave it out (one round let nginx's p99 read 1.5 s).
say "latency at half of flowthrough's max: $HALF req/s fixed rate on all four, $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
  for t in a b c d; do "target_$t" -c "$CONNS" --rate "$HALF" --duration "$DUR" --json >"$R/half-$t-$round.json"; done
done

# The rates an AS sends, for all four: what a plain proxy and the stack's floor add there is what
# flowthrough's added p99 is measured against (issue 24).
low_rate_rounds a b c d

say "new-connection handshakes (GET /tls-probe, answered locally), 16 clients"
for t in a b c d; do
  "target_$t" --new-connection --method GET --path /tls-probe -c 16 --duration "$DUR" --json >"$R/handshake-$t.json"
done

wait_drained 60 >/dev/null

LIMIT=${BENCH_RATE_LIMIT:-$(( HALF / 2 > 20 ? HALF / 2 : 20 ))}
LIMIT_DUR=$((DUR * 2))
say "upstream rate limit R = $LIMIT/s, offered 2R for ${LIMIT_DUR} s"
# Counted from flowthrough's own metrics: the simulator's state dump lists every subscriber (hundreds
# of thousands by now) under its lock, and reading it would stall the run being measured.
metrics() { curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^flowthrough_webex_calls_total' || true; }
for t in b c; do
  metrics >"$R/limit-$t-before.txt"
  simctl "{\"rate_limit_per_s\": $LIMIT}"
  "target_$t" -c "$CONNS" --rate $((LIMIT * 2)) --duration "$LIMIT_DUR" --json >"$R/limit-$t.json"
  metrics >"$R/limit-$t-after.txt"
  simctl '{"rate_limit_per_s": 0}'
  if [ "$t" = b ]; then wait_drained 120 >"$R/limit-b-drain.txt"; fi
done

N_OUTAGE=${BENCH_OUTAGE_REQUESTS:-$((DUR * 100))}
say "outage: the simulator answers 503, $N_OUTAGE requests queue, then it recovers"
simctl '{"server_error_ratio": 1.0}'
target_b -c 256 --requests "$N_OUTAGE" --json >"$R/outage-b.json"
echo "{\"pending_at_recovery\": $(pending)}" >"$R/outage-pending.json"
simctl '{"server_error_ratio": 0.0}'
wait_drained 180 >"$R/outage-drain.txt"

# ---------------------------------------------------------------------------------------------
say "writing bench/RESULTS.md"
metric_sum() { # file, label filter (awk regex)
  awk -v f="$2" '$1 ~ f { s += $2 } END { printf "%d", s }' "$1"
}
limit_row() { # b: from flowthrough's metrics; c: from the generator's answers
  local subs calls n429
  if [ "$1" = b ]; then
    subs=$(( $(metric_sum "$R/limit-b-after.txt" 'call="provision".*status="ok"') - $(metric_sum "$R/limit-b-before.txt" 'call="provision".*status="ok"') ))
    calls=$(( $(metric_sum "$R/limit-b-after.txt" .) - $(metric_sum "$R/limit-b-before.txt" .) ))
    n429=$(( $(metric_sum "$R/limit-b-after.txt" 'status="429"') - $(metric_sum "$R/limit-b-before.txt" 'status="429"') ))
  else
    subs=$(jq .ok "$R/limit-c.json"); calls=$(jq .requests "$R/limit-c.json"); n429=$(jq '.errors.http_429 // 0' "$R/limit-c.json")
  fi
  awk -v s="$subs" -v d="$LIMIT_DUR" -v r="$LIMIT" -v c="$calls" -v q="$n429" \
    'BEGIN{ printf "%.1f/s = %.2f R | %.1f %% (%d of %d upstream calls)", s / d, s / d / r, (c > 0 ? 100 * q / c : 0), q, c }'
}
MAX_B=$(j .ok_per_s max-b.json); MAX_C=$(j .ok_per_s max-c.json); MAX_D=$(j .ok_per_s max-d.json)
HS_B=$(j .answered_per_s handshake-b.json); HS_C=$(j .answered_per_s handshake-c.json); HS_D=$(j .answered_per_s handshake-d.json)
CMD="bench/run.sh${1:+ $1}"
{
  echo "<!-- bench:start (written by bench/run.sh; everything outside these markers is kept) -->"
  echo "## Comparison: (a) simulator direct, (b) flowthrough, (c) nginx mTLS proxy, (d) the stack's floor"
  echo
  echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') in one run with \`$CMD\` (${DUR} s per measurement), $BUILT."
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -h | awk '/^Mem:/{print $2}') RAM."
  echo "Generator: \`flowthrough-load\`, 1 thread, $CONNS keep-alive connections; flowthrough: server.workers = $WORKERS,"
  echo "log level info, store on disk (\`$WORK\` is under /var/tmp); nginx $(nginx -v 2>&1 | cut -d/ -f2): worker_processes $WORKERS,"
  echo "access log on, upstream keep-alive; (d) relays as nginx does with actix-web, rustls and reqwest, $WORKERS workers,"
  echo "one reqwest client per worker, no logging (examples/stack_floor.rs); simulator: 2 workers."
  echo "Everything shares the same $(nproc) cores."
  echo
  echo "| scenario | (a) direct | (b) flowthrough | (c) nginx | (d) stack floor | b/c | d/c | target |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  cpu() { j .server.cpu_per_request_us "max-$1.json"; }
  printf '| max throughput, keep-alive (ok req/s) | %.0f | %.0f | %.0f | %.0f | %s | %s | b/c ≥ 1.0 |\n' \
    "$(j .ok_per_s max-a.json)" "$MAX_B" "$MAX_C" "$MAX_D" "$(ratio "$MAX_B" "$MAX_C")" "$(ratio "$MAX_D" "$MAX_C")"
  printf '| server CPU per request at max (µs) | %.0f | %.0f | %.0f | %.0f | %s | %s | |\n' \
    "$(cpu a)" "$(cpu b)" "$(cpu c)" "$(cpu d)" "$(ratio "$(cpu b)" "$(cpu c)")" "$(ratio "$(cpu d)" "$(cpu c)")"
  percentiles() { echo "$(per_round .latency_ms.p50 half "$1" | median) / $(per_round .latency_ms.p99 half "$1" | median) / $(per_round .latency_ms.p99_9 half "$1" | median)"; }
  printf '| p50 / p99 / p99.9 ms at %s req/s, medians of %s rounds | %s | %s | %s | %s | | | |\n' "$HALF" "$ROUNDS" \
    "$(percentiles a)" "$(percentiles b)" "$(percentiles c)" "$(percentiles d)"
  printf '| p99 added over direct at %s req/s (ms): median (range) of %s rounds | — | %s | %s | %s | | | b ≤ 1 ms |\n' \
    "$HALF" "$ROUNDS" "$(added b)" "$(added c)" "$(added d)"
  for rate in "${LOW_RATES[@]}"; do
    printf '| p99 at %s req/s, 4 connections (ms), medians of %s rounds | %s | %s | %s | %s | | | |\n' "$rate" "$ROUNDS" \
      "$(per_round .latency_ms.p99 "low$rate" a | median)" "$(per_round .latency_ms.p99 "low$rate" b | median)" \
      "$(per_round .latency_ms.p99 "low$rate" c | median)" "$(per_round .latency_ms.p99 "low$rate" d | median)"
    printf '| p99 added over direct at %s req/s (ms): median (range) of %s rounds | — | %s | %s | %s | | | b ≤ 1 ms |\n' \
      "$rate" "$ROUNDS" "$(added b "low$rate")" "$(added c "low$rate")" "$(added d "low$rate")"
  done
  printf '| new-connection mTLS handshakes/s | %.0f | %.0f | %.0f | %.0f | %s | %s | b/c ≥ 1.0 |\n' \
    "$(j .answered_per_s handshake-a.json)" "$HS_B" "$HS_C" "$HS_D" "$(ratio "$HS_B" "$HS_C")" "$(ratio "$HS_D" "$HS_C")"
  rss() { j .server.rss_mib "idle-$1.json"; }
  printf '| RSS with 1,000 idle mTLS connections (MiB) | %.1f | %.1f | %.1f | %.1f | %s | %s | b ≤ 40 MiB |\n' \
    "$(rss a)" "$(rss b)" "$(rss c)" "$(rss d)" "$(ratio "$(rss b)" "$(rss c)")" "$(ratio "$(rss d)" "$(rss c)")"
  printf '| idle connections open after the hold | %s | %s | %s | %s | | | 1000 |\n' \
    "$(j .alive_after_hold idle-a.json)" "$(j .alive_after_hold idle-b.json)" "$(j .alive_after_hold idle-c.json)" \
    "$(j .alive_after_hold idle-d.json)"
  echo
  echo "Upstream rate limit R = $LIMIT/s on the simulator, offered load 2R for ${LIMIT_DUR} s:"
  echo
  echo "| target | delivered | 429 share | answers to the client |"
  echo "| --- | --- | --- | --- |"
  echo "| (b) flowthrough | $(limit_row b) | $(jq -c '{ok, warnings, errors, unsent_behind_schedule}' "$R/limit-b.json") |"
  echo "| (c) nginx | $(limit_row c) | $(jq -c '{ok, errors, unsent_behind_schedule}' "$R/limit-c.json") |"
  echo
  echo "(b) counts provision calls answered 200 in the window and every Webex call flowthrough made"
  echo "(flowthrough_webex_calls_total); (c) counts the answers nginx relayed."
  echo "Targets: (b) delivered ≥ 0.95 R with ≤ 2 % of upstream calls answered 429. nginx passes each"
  echo "429 to the client (nothing is queued); flowthrough queues and answers 7020 past the ack deadline."
  echo "Backlog drained $(cat "$R/limit-b-drain.txt") s after the limit was lifted."
  echo
  echo "Outage: the simulator answered 503 while $N_OUTAGE requests arrived ($(jq -c '{ok, warnings, errors}' "$R/outage-b.json"));"
  echo "$(jq .pending_at_recovery "$R/outage-pending.json") were pending at recovery and the outbox drained in $(cat "$R/outage-drain.txt") s."
  echo
  echo "Errors by kind per measurement (a / b / c / d):"
  echo
  for s in max handshake; do
    echo "- $s: $(jq -c .errors "$R/$s-a.json") / $(jq -c .errors "$R/$s-b.json") / $(jq -c .errors "$R/$s-c.json") / $(jq -c .errors "$R/$s-d.json")"
  done
  for m in half low100 low10; do
    echo "- $m, all rounds: $(errors_of $m a) / $(errors_of $m b) / $(errors_of $m c) / $(errors_of $m d)"
  done
  echo
  echo "Raw reports: \`BENCH_KEEP=1 $CMD\` keeps them in the work directory (results/*.json)."
  echo "<!-- bench:end -->"
} >"$WORK/section.md"
write_section bench

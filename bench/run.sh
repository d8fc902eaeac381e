#!/usr/bin/env bash
# The flowthrough benchmark harness: one run, one load generator, one set of certificates,
# four targets — (a) the Webex API simulator directly, (b) flowthrough, (c) nginx as a plain
# mutual-TLS reverse proxy, (d) the same relay built from flowthrough's own crates (actix-web,
# rustls, reqwest; examples/stack_floor.rs) — all on loopback. See bench/README.md.
#
#   bench/run.sh [--short|--long]     the comparison; writes bench/RESULTS.md (default ≤ 10 min)
#   bench/run.sh soak [MINUTES]       RSS and open fds of flowthrough under steady load (default 30)
#   bench/run.sh crash [N]            kill -9 flowthrough N times under load (default 20), then
#                                     compare acknowledged requests with the simulator's subscribers
#   bench/run.sh faults [SECONDS]     fixed-rate load through token-expiry storms, 429 storms and
#                                     certificate reloads (default 20 s each), beside a quiet
#                                     baseline; then every acknowledged request is looked for
#   bench/run.sh pg [--short]         (b) beside (b-pg): flowthrough on a throwaway PostgreSQL
#                                     cluster (initdb here, fsync on); throughput, CPU per request
#                                     (flowthrough + postgres processes), p99 added at half load
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
# Both proxies get the same number of AS-side worker threads/processes (flowthrough's
# `server.workers`, nginx's `worker_processes`); the generator runs on 1 thread.
WORKERS=${BENCH_WORKERS:-2}
CONNS=${BENCH_CONNECTIONS:-64}

MODE=bench
DUR=10
case "${1:-}" in
  --short) DUR=4 ;;
  --long) DUR=30 ;;
  soak) MODE=soak; SOAK_MIN=${2:-30} ;;
  crash) MODE=crash; CRASH_N=${2:-20} ;;
  faults) MODE=faults; FAULT_S=${2:-20} ;;
  pg) MODE=pg; [ "${2:-}" = --short ] && DUR=4 ;;
  "") ;;
  *) echo "usage: bench/run.sh [--short|--long] | soak [MINUTES] | crash [N] | faults [SECONDS] | pg [--short]" >&2; exit 1 ;;
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
SIM_PID= FT_PID= NGX_PID= FLOOR_PID= LOAD_PID= FTPG_PID= PGBIN=
# PostgreSQL refuses to run as root: its programs run as the postgres user then.
AS_PG=()
[ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)
cleanup() {
  # Only the processes this script started and that are still current.
  for pid in $LOAD_PID $FT_PID $FTPG_PID $NGX_PID $FLOOR_PID $SIM_PID; do kill "$pid" 2>/dev/null || true; done
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
  # Caps that let the store reach its steady size within the soak's first third: at 100 req/s
  # about five minutes of history and audit, pruned every five minutes (production keeps a
  # million of each). The soak's users are a pool of 1,000, added and deleted over and over.
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
path = "$WORK/store"
$STORE_CAPS

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
pending() { curl -sf "http://127.0.0.1:$ADMIN_PORT/status" | jq '.outbox.pending'; }
drained() { [ "$(pending 2>/dev/null || echo x)" = 0 ]; }
# Delivery is no longer paced (the pace learned from 429s has been dropped).
unpaced() { curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -qx 'flowthrough_delivery_pace_per_second 0.0'; }
wait_drained() { wait_for drained "$1"; }
wait_for() { # condition, timeout seconds; prints the seconds it took, or "timeout"
  local start now
  start=$(date +%s.%N)
  while :; do
    now=$(date +%s.%N)
    if "$1"; then break; fi
    if awk -v s="$start" -v n="$now" -v t="$2" 'BEGIN{exit !(n - s > t)}'; then echo "timeout"; return; fi
    sleep 0.1
  done
  awk -v s="$start" -v n="$now" 'BEGIN{printf "%.1f", n - s}'
}

# The generator with this run's certificates.
load() { "$LOAD" --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/client.pem" --key "$WORK/pki/client.key" --threads 1 "$@"; }
OCI_BODY="$ROOT/schemas/samples/user-add-17sp4.xml"

# ---------------------------------------------------------------------------------------------
if [ "$MODE" = soak ]; then
  start_flowthrough
  RATE=${BENCH_SOAK_RATE:-100}
  say "soak: $SOAK_MIN min at $RATE req/s through flowthrough (pid $FT_PID), sampled every 10 s"
  load --target "127.0.0.1:$FT_PORT" --body "$OCI_BODY" --body "$ROOT/schemas/samples/user-delete.xml" \
    --users 1000 --rate "$RATE" -c 16 --duration $((SOAK_MIN * 60)) --json >"$WORK/soak-load.json" &
  LOAD_PID=$!
  # The store's size beside RSS: sled keeps per-page metadata in memory beyond its cache, so
  # sled's memory follows the store's size (examples/store_io), which the caps hold level.
  echo "t_s rss_kib fds store_kib" | tee "$WORK/soak.txt"
  t=0
  while kill -0 "$LOAD_PID" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$FT_PID/status")
    fds=$(find "/proc/$FT_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
    store=$(du -sk "$WORK/store" | cut -f1)
    echo "$t $rss $fds $store" | tee -a "$WORK/soak.txt"
    sleep 10
    t=$((t + 10))
  done
  wait "$LOAD_PID" || true
  jq -c '{requests, ok_per_s, latency_ms, warnings, errors}' "$WORK/soak-load.json"
  # Flat: the last third's mean is within 10 % (RSS) / 10 fds of the middle third's, after the
  # first third (warm-up: sled's cache and the allocator's arenas fill up) is set aside.
  awk 'NR > 1 { t[n] = $1; r[n] = $2; f[n] = $3; n++ }
    END {
      if (n < 6) { print "verdict: too short to judge (" n " samples; run at least 1 minute)"; exit }
      a = int(n / 3); b = int(2 * n / 3)
      for (i = a; i < b; i++) { rm += r[i]; fm += f[i] } rm /= (b - a); fm /= (b - a)
      for (i = b; i < n; i++) { rl += r[i]; fl += f[i] } rl /= (n - b); fl /= (n - b)
      flat = (rl <= rm * 1.10) && (fl <= fm + 10)
      printf "middle third: RSS %.1f MiB, %.0f fds; last third: RSS %.1f MiB, %.0f fds\n", rm / 1024, fm, rl / 1024, fl
      print "verdict: " (flat ? "FLAT (no leak seen)" : "GROWING (look for a leak)")
    }' "$WORK/soak.txt"
  exit 0
fi

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

# A throwaway PostgreSQL cluster (fsync on) and flowthrough (b-pg) on it, beside (b).
start_flowthrough_pg() {
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
  "${AS_PG[@]}" "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U flowthrough flowthrough
  awk -v pg="$PG_PORT" -v ft="$FTPG_PORT" -v admin="$ADMIN_PG_PORT" -v ftp="$FT_PORT" -v adminp="$ADMIN_PORT" '
    /^path = / { print "backend = \"postgres\""; print ""; print "[store.postgres]";
      print "host = \"127.0.0.1\""; print "port = " pg; print "dbname = \"flowthrough\"";
      print "user = \"flowthrough\""; print "tls = \"disable\""; next }
    { gsub("127.0.0.1:" ftp "\"", "127.0.0.1:" ft "\""); gsub("127.0.0.1:" adminp "\"", "127.0.0.1:" admin "\""); print }
  ' "$WORK/flowthrough.toml" >"$WORK/flowthrough-pg.toml"
  "$BIN" serve --config "$WORK/flowthrough-pg.toml" >>"$WORK/flowthrough-pg.log" 2>&1 &
  FTPG_PID=$!
  wait_ready "$ADMIN_PG_PORT" "$FTPG_PID" "flowthrough (b-pg)" "$WORK/flowthrough-pg.log"
}

# ---------------------------------------------------------------------------------------------
start_flowthrough
if [ "$MODE" = pg ]; then start_flowthrough_pg; fi

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
# (b-pg): its CPU is flowthrough's and every PostgreSQL process's (the postmaster, its background
# workers and the backends of flowthrough's pool, listed after the warm-up has opened them).
PG_PID_ARGS=()
target_bpg() { load --target "127.0.0.1:$FTPG_PORT" --path /provisioning --body "$OCI_BODY" --server-pid "$FTPG_PID" "${PG_PID_ARGS[@]}" "$@"; }

if [ "$MODE" = pg ]; then
  j() { jq -r "$1" "$R/$2"; }
  median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
  say "warm-up"
  for t in a b bpg; do "target_$t" -c "$CONNS" --duration 2 --json >/dev/null; done
  PG_PID_ARGS=(--server-pid "$PG_PID")
  for p in $(pgrep -P "$PG_PID"); do PG_PID_ARGS+=(--server-pid "$p"); done
  say "max throughput, keep-alive, $CONNS connections, ${DUR} s each (PostgreSQL: ${#PG_PID_ARGS[@]} processes counted)"
  for t in a b bpg; do "target_$t" -c "$CONNS" --duration "$DUR" --json >"$R/max-$t.json"; done
  HALF=$(jq '.ok_per_s / 2 | floor' "$R/max-b.json")
  [ "$HALF" -ge 1 ] || HALF=1
  ROUNDS=${BENCH_HALF_ROUNDS:-3}
  say "latency at half of (b)'s max: $HALF req/s, $ROUNDS rounds"
  for round in $(seq 1 "$ROUNDS"); do
    for t in a b bpg; do "target_$t" -c "$CONNS" --rate "$HALF" --duration "$DUR" --json >"$R/half-$t-$round.json"; done
  done
  wait_drained 60 >/dev/null
  added_median() { # target: median over the rounds of its p99 minus (a)'s of the same round
    for round in $(seq 1 "$ROUNDS"); do
      awk -v x="$(j .latency_ms.p99 "half-$1-$round.json")" -v a="$(j .latency_ms.p99 "half-a-$round.json")" 'BEGIN{printf "%.2f\n", x - a}'
    done | median
  }
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
  MAX_B=$(j .ok_per_s max-b.json); MAX_P=$(j .ok_per_s max-bpg.json)
  ADD_B=$(added_median b); ADD_P=$(added_median bpg)
  SECTION=$WORK/section.md
  {
    echo "<!-- bench-pg:start (written by bench/run.sh pg; everything outside these markers is kept) -->"
    echo "## (b) flowthrough on sled beside (b-pg) flowthrough on PostgreSQL"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') with \`bench/run.sh pg${2:+ $2}\` (${DUR} s per measurement), built from commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')."
    echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') in a throwaway cluster on the same machine (fsync on, synchronous_commit on, defaults otherwise; data under /var/tmp);"
    echo "flowthrough (b-pg): pool of 16, tls = disable (loopback). Everything shares the same $(nproc) cores. Generator as above, $CONNS connections."
    echo
    echo "| measure | (a) direct | (b) sled | (b-pg) PostgreSQL | b-pg / b | target |"
    echo "| --- | --- | --- | --- | --- | --- |"
    printf '| max throughput, keep-alive (ok req/s) | %.0f | %.0f | %.0f | %s | ≥ 0.5 |\n' "$(j .ok_per_s max-a.json)" "$MAX_B" "$MAX_P" "$(ratio "$MAX_P" "$MAX_B")"
    printf '| server CPU per request at max (µs; b-pg: flowthrough + postgres) | %.0f | %.0f | %.0f | %s | |\n' \
      "$(j .server.cpu_per_request_us max-a.json)" "$(j .server.cpu_per_request_us max-b.json)" "$(j .server.cpu_per_request_us max-bpg.json)" \
      "$(ratio "$(j .server.cpu_per_request_us max-bpg.json)" "$(j .server.cpu_per_request_us max-b.json)")"
    printf '| p99 at %s req/s (ms), median of %s rounds | %s | %s | %s | | |\n' "$HALF" "$ROUNDS" \
      "$(for r in $(seq 1 "$ROUNDS"); do j .latency_ms.p99 "half-a-$r.json"; done | median)" \
      "$(for r in $(seq 1 "$ROUNDS"); do j .latency_ms.p99 "half-b-$r.json"; done | median)" \
      "$(for r in $(seq 1 "$ROUNDS"); do j .latency_ms.p99 "half-bpg-$r.json"; done | median)"
    printf '| p99 added over direct at %s req/s (ms) | — | %s | %s | %s | ≤ 2 |\n' "$HALF" "$ADD_B" "$ADD_P" "$(ratio "$ADD_P" "$ADD_B")"
    echo
    echo "Errors: max $(jq -c .errors "$R/max-b.json") / $(jq -c .errors "$R/max-bpg.json"); half-load 7020s (b-pg): $(jq -s '[.[].warnings.oci_7020 // 0] | add' "$R"/half-bpg-*.json)."
    echo "<!-- bench-pg:end -->"
  } >"$SECTION"
  OUT=$ROOT/bench/RESULTS.md
  if grep -q '<!-- bench-pg:start' "$OUT"; then
    awk -v f="$SECTION" '
      /<!-- bench-pg:start/ { while ((getline line < f) > 0) print line; skip = 1; next }
      /<!-- bench-pg:end -->/ { skip = 0; next }
      !skip { print }' "$OUT" >"$OUT.new"
    mv "$OUT.new" "$OUT"
  else
    { cat "$OUT"; echo; cat "$SECTION"; } >"$OUT.new"
    mv "$OUT.new" "$OUT"
  fi
  cat "$SECTION"
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
ROUNDS=${BENCH_HALF_ROUNDS:-3}
say "latency at half of flowthrough's max: $HALF req/s fixed rate on all four, $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
  for t in a b c d; do "target_$t" -c "$CONNS" --rate "$HALF" --duration "$DUR" --json >"$R/half-$t-$round.json"; done
done

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
j() { jq -r "$1" "$R/$2"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
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
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
half_median() { # target, jq path: the median over the rounds
  for round in $(seq 1 "$ROUNDS"); do j "$2" "half-$1-$round.json"; done | median
}
added() { # target: p99 minus the direct p99 of the same round; the median, then the range
  local diffs
  diffs=$(for round in $(seq 1 "$ROUNDS"); do
    awk -v x="$(j .latency_ms.p99 "half-$1-$round.json")" -v a="$(j .latency_ms.p99 "half-a-$round.json")" 'BEGIN{printf "%.2f\n", x - a}'
  done)
  printf '%.2f (%s to %s)' "$(echo "$diffs" | median)" "$(echo "$diffs" | sort -g | head -1)" "$(echo "$diffs" | sort -g | tail -1)"
}
CMD="bench/run.sh${1:+ $1}"
SECTION=$WORK/section.md
if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  BUILT="prebuilt binaries from $TARGET/release"
else
  BUILT="built from commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '(not a git checkout)')"
fi
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
  percentiles() { echo "$(half_median "$1" .latency_ms.p50) / $(half_median "$1" .latency_ms.p99) / $(half_median "$1" .latency_ms.p99_9)"; }
  printf '| p50 / p99 / p99.9 ms at %s req/s, medians of %s rounds | %s | %s | %s | %s | | | |\n' "$HALF" "$ROUNDS" \
    "$(percentiles a)" "$(percentiles b)" "$(percentiles c)" "$(percentiles d)"
  printf '| p99 added over direct at %s req/s (ms): median (range) of %s rounds | — | %s | %s | %s | | | b ≤ 1 ms |\n' \
    "$HALF" "$ROUNDS" "$(added b)" "$(added c)" "$(added d)"
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
  half_errors() { jq -cs '[.[].errors | to_entries[]] | group_by(.key) | map({key: .[0].key, value: (map(.value) | add)}) | from_entries' "$R"/half-"$1"-*.json; }
  echo "- half, all rounds: $(half_errors a) / $(half_errors b) / $(half_errors c) / $(half_errors d)"
  echo
  echo "Raw reports: \`BENCH_KEEP=1 $CMD\` keeps them in the work directory (results/*.json)."
  echo "<!-- bench:end -->"
} >"$SECTION"
OUT=$ROOT/bench/RESULTS.md
if [ -f "$OUT" ] && grep -q '<!-- bench:start' "$OUT"; then
  awk -v f="$SECTION" '
    /<!-- bench:start/ { while ((getline line < f) > 0) print line; skip = 1; next }
    /<!-- bench:end -->/ { skip = 0; next }
    !skip { print }' "$OUT" >"$OUT.new"
  mv "$OUT.new" "$OUT"
elif [ -f "$OUT" ]; then
  { cat "$OUT"; echo; cat "$SECTION"; } >"$OUT.new"
  mv "$OUT.new" "$OUT"
else
  { echo "# flowthrough benchmark results"; echo; cat "$SECTION"; } >"$OUT"
fi
cat "$SECTION"

#!/usr/bin/env bash
# Webhook ingest benchmark (issue 5): autopilot against Debian's `webhook` (adnanh/webhook
# 2.8), both driven by Debian's `wrk` with the same HMAC-SHA256-signed post-call
# deliveries, in one run on one machine.
#
#   benches/ingest.sh                                   # build (release), then measure
#   AUTOPILOT_BIN=target/release/autopilot DURATION=5s benches/ingest.sh
#
# What it does:
#   1. installs wrk and webhook with apt-get if missing; builds autopilot in release mode
#      (CARGO_TARGET_DIR respected, default target/) unless AUTOPILOT_BIN is given;
#   2. writes distinct signed deliveries with Python's hmac/hashlib: copies of
#      tests/data/webhooks/post-call.json, each with its own call_id (so dedupe does not
#      turn them into duplicates), signed HMAC-SHA256, hex, `sha256=` prefix, in header
#      X-Hub-Signature-256. wrk's Lua cannot compute an HMAC: its script loads the signed
#      requests in init(), each wrk thread a disjoint slice, and cycles through them;
#   3. starts `autopilot sim` (where the jobs drain to), autopilot (source `bench`, auth
#      hmac-sha256, id = /call_id, one rule that makes a job of every delivery; database in
#      a temp dir: WAL, synchronous=FULL, every 2xx after the commit) and `webhook` (one
#      hook whose trigger rule is payload-hmac-sha256, running /bin/true, answering 200);
#   4. checks with curl that a signed request gets a 2xx and a badly signed one is
#      refused, by both;
#   5. measures (a) max throughput: wrk -t$THREADS -c$CONNS -d$DURATION --latency,
#      (b) for autopilot also max throughput storing only: the same deliveries with a rule
#      that matches nothing (authenticated, deduplicated, evaluated and committed, but no
#      run and no job: the counterpart of webhook's no-op command), and (c) a fixed rate:
#      RATE req/s over RATE_CONNS connections, paced by a Lua delay() (Debian's wrk 4.1
#      has no -R); each autopilot phase on a fresh database. After each autopilot run it
#      counts the stored deliveries and compares them with the 2xx wrk saw;
#   6. prints a Markdown table, the autopilot/webhook throughput ratio, the targets
#      (>= 3x webhook's throughput; p99 < 25 ms at 1,000 req/s) and the CPU each process
#      used during each run (the machine has few cores: wrk, the receiver and the
#      simulator share them).
#
# Knobs (environment): DURATION (20s; wrk's -d for the max phase), RATE_DURATION
# (= DURATION), THREADS (2), CONNS (64), RATE (1000), RATE_CONNS (20), N (deliveries for the
# max phase; default 15,000 per second of DURATION, at least 300,000), AGENTS (1: every
# delivery targets agent 101 like the sample; >1 spreads them over agents 101..100+AGENTS,
# which the simulator is seeded with), RUST_LOG (autopilot's log filter, default `info` as
# in production; the log goes to a file), KEEP_TMP=1 (keep the temp dir: configs, logs,
# databases, wrk output), SKIP_WEBHOOK=1 (autopilot only). Any AUTOPILOT_<KEY>__<KEY>
# variable reaches autopilot as a config override, e.g. AUTOPILOT_QUEUE__WORKERS=8.
#
# The Markdown report goes to stdout; progress, the curl checks and wrk's own output go to
# stderr. AUTOPILOT_BIN is removed from the environment before autopilot starts (autopilot
# would read it as the unknown config key `bin`). webhook 2.8 answers a bad signature with
# 500 ("Error occurred while evaluating hook rules"), a missing one with the configured 401.
#
# Exit status 0 when everything ran, autopilot answered only 2xx and stored every delivery
# it acknowledged; 1 otherwise. Whether the targets are met is reported, not enforced.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-20s}
RATE_DURATION=${RATE_DURATION:-$DURATION}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
RATE=${RATE:-1000}
RATE_CONNS=${RATE_CONNS:-20}
AGENTS=${AGENTS:-1}
SECRET=${SECRET:-bench-hmac-secret-3f9c2a}
export RUST_LOG=${RUST_LOG:-info}
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

die() { echo "ingest.sh: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

# wrk durations ("20s", "2m", "1h", "90") in whole seconds.
seconds() {
  case $1 in
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *h) echo $(( ${1%h} * 3600 )) ;;
    *) echo "$1" ;;
  esac
}
DUR_S=$(seconds "$DURATION")
RATE_DUR_S=$(seconds "$RATE_DURATION")
[[ $DUR_S =~ ^[0-9]+$ && $RATE_DUR_S =~ ^[0-9]+$ ]] || die "DURATION must look like 20s, 2m or 1h"
N=${N:-$(( DUR_S * 15000 > 300000 ? DUR_S * 15000 : 300000 ))}
# The fixed-rate phase needs about RATE * duration distinct deliveries; plus a margin.
N_RATE=$(( RATE * RATE_DUR_S * 3 / 2 + 2000 ))

# ---- tools ---------------------------------------------------------------------------
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
[[ ${SKIP_WEBHOOK:-} == 1 ]] || command -v webhook >/dev/null || need_apt+=(webhook)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} with apt-get"
  if ! { apt-get install -y "${need_apt[@]}" || { apt-get update && apt-get install -y "${need_apt[@]}"; }; } >&2; then
    die "could not install ${need_apt[*]} with apt-get (root needed, and a Debian/Ubuntu mirror); install them yourself and run again"
  fi
fi
command -v python3 >/dev/null || die "python3 is required (it signs the deliveries and reads the database)"
command -v curl >/dev/null || die "curl is required"
WEBHOOK_VERSION=none
if [[ ${SKIP_WEBHOOK:-} != 1 ]]; then
  WEBHOOK_VERSION=$(webhook -version 2>&1 | awk '{ print $NF }')
  [[ $WEBHOOK_VERSION == 2.8* ]] || echo "note: expected webhook 2.8, found $WEBHOOK_VERSION" >&2
fi

# ---- autopilot binary ----------------------------------------------------------------
if [[ -n ${AUTOPILOT_BIN:-} ]]; then
  BIN=$(realpath "$AUTOPILOT_BIN")
else
  log "building autopilot (release)"
  (cd "$ROOT" && cargo build --release --locked --bin autopilot) >&2 || die "cargo build failed"
  target=${CARGO_TARGET_DIR:-target}
  [[ $target == /* ]] || target=$ROOT/$target
  BIN=$target/release/autopilot
fi
[[ -x $BIN ]] || die "no autopilot binary at $BIN"
# autopilot reads every AUTOPILOT_* variable as a config override (AUTOPILOT_BIN would be
# an unknown key `bin`): keep this one to ourselves.
unset AUTOPILOT_BIN

# ---- temp dir, cleanup ---------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/autopilot-ingest.XXXXXX")
PIDS=()
# shellcheck disable=SC2329 # invoked by the EXIT trap
cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP_TMP:-} == 1 ]]; then
    echo "kept $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r SIM_PORT AP_PORT WH_PORT < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)

# ---- deliveries ----------------------------------------------------------------------
log "signing $N + $N_RATE deliveries"
python3 - "$ROOT/tests/data/webhooks/post-call.json" "$SECRET" "$AGENTS" "$TMP" "$N" "$N_RATE" <<'PY'
import hashlib, hmac, json, sys
sample, secret, agents, tmp, n_max, n_rate = sys.argv[1:7]
agents, n_max, n_rate = int(agents), int(n_max), int(n_rate)
base = json.load(open(sample))
key = secret.encode()

def signed(call_id, agent=None, k=key):
    d = dict(base)
    d["call_id"] = call_id
    if agent is not None:
        d["ai_voice_agent_id"] = agent
    body = json.dumps(d, separators=(",", ":"))
    assert "\t" not in body and "\n" not in body
    return "sha256=" + hmac.new(k, body.encode(), hashlib.sha256).hexdigest(), body

def write(path, first_id, count):
    with open(path, "w") as f:
        for i in range(count):
            sig, body = signed(first_id + i, 101 + i % agents if agents > 1 else None)
            f.write(f"{sig}\t{body}\n")

# Disjoint call_ids: 1 and 2 for the curl checks, 1e9.. for the max phase, 2e9.. for
# the fixed-rate phase (each autopilot phase also gets a fresh database).
write(f"{tmp}/max.reqs", 1_000_000_000, n_max)
write(f"{tmp}/rate.reqs", 2_000_000_000, n_rate)
for name, call_id, k in (("good", 1, key), ("bad", 2, b"not-the-secret")):
    sig, body = signed(call_id, k=k)
    open(f"{tmp}/{name}.json", "w").write(body)
    open(f"{tmp}/{name}.sig", "w").write(sig)
json.dump([{"id": 101 + i} for i in range(max(agents, 3))], open(f"{tmp}/agents.json", "w"))
PY

# ---- configs -------------------------------------------------------------------------
cat >"$TMP/autopilot.toml" <<EOF
# Written by benches/ingest.sh.
[server]
listen = "127.0.0.1:$AP_PORT"

[database]
path = "db/autopilot.db"   # relative to the directory autopilot runs in: one per phase

[platform]
base_url = "http://127.0.0.1:$SIM_PORT/v3"
token = { value = "sim-token" }

[[sources]]
name = "bench"
auth = { kind = "hmac-sha256", header = "X-Hub-Signature-256", encoding = "hex", prefix = "sha256=", secret = { value = "$SECRET" } }
id = "/call_id"

[[rules]]
name = "bench: note every post-call"
webhook = { source = "bench", match = { "/event" = "post_call" } }
agent = "/ai_voice_agent_id"
set = { more_information = "benchmark delivery" }
EOF

# The same, with a rule that matches nothing: every delivery is still authenticated,
# deduplicated, evaluated and committed, but causes no run and no job (the closest
# counterpart of webhook's no-op command).
sed 's|match = { "/event" = "post_call" }|match = { "/event" = "no such event" }|' \
  "$TMP/autopilot.toml" >"$TMP/autopilot-store.toml"
grep -q '"no such event"' "$TMP/autopilot-store.toml" || die "could not write the storing-only config"

cat >"$TMP/hooks.json" <<EOF
[
  {
    "id": "bench",
    "execute-command": "/bin/true",
    "response-message": "ok",
    "success-http-response-code": 200,
    "trigger-rule-mismatch-http-response-code": 401,
    "trigger-rule": {
      "match": {
        "type": "payload-hmac-sha256",
        "secret": "$SECRET",
        "parameter": { "source": "header", "name": "X-Hub-Signature-256" }
      }
    }
  }
]
EOF

cat >"$TMP/ingest.lua" <<'LUA'
-- wrk script for benches/ingest.sh: replays pre-signed webhook deliveries.
--
-- wrk's Lua cannot compute an HMAC, so ingest.sh writes the requests beforehand, one a
-- line: `<signature>\t<body>`. Each wrk thread loads its own disjoint slice of the file in
-- init() (thread ids are handed out in setup()), so no two requests of one run carry the
-- same call_id, and cycles through it in request(). If a thread runs past the end of its
-- slice it starts over (those are duplicates): done() reports it as `wrapped`.
--
-- Start barrier: wrk 4.1 runs init() of thread i+1 in its main thread after thread i has
-- started sending, and starts its clock only after the last init(). Loading a slice
-- takes about a second, so without a barrier the first thread's early requests would be
-- counted against a shorter duration. Each thread therefore drops a file when its slice
-- is loaded, and holds its first request until every thread's file is there.
--
-- Environment (set by ingest.sh):
--   BENCH_REQS     the request file          BENCH_COUNT    lines in it
--   BENCH_THREADS  wrk's -t                  BENCH_PATH     the URL path to POST to
--   BENCH_READY    prefix of the barrier files (BENCH_READY<tid>)
--   BENCH_RATE     optional: target requests/s for the whole run (fixed-rate mode)
--
-- Fixed-rate mode: Debian's wrk 4.1 has no -R, so delay() paces requests. Each thread
-- hands out send slots every BENCH_THREADS*1000/BENCH_RATE ms on the monotonic clock
-- and delays each request until its slot. wrk measures latency from the moment a request
-- is written, so the delay is not latency; a connection still waits for its response
-- before its next request (closed loop), so the rate actually achieved is reported.

local ffi = require("ffi")
ffi.cdef [[
   typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
   int clock_gettime(int clk_id, bench_timespec *tp);
   int usleep(unsigned int usec);
]]

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local nthreads = tonumber(os.getenv("BENCH_THREADS"))
local ready = os.getenv("BENCH_READY")

function init(args)
   local file = assert(os.getenv("BENCH_REQS"), "BENCH_REQS not set")
   local count = tonumber(os.getenv("BENCH_COUNT"))
   local path = os.getenv("BENCH_PATH") or "/"
   local per = math.floor(count / nthreads)
   local first = tid * per + 1
   local last = first + per - 1
   reqs = {}
   local i = 0
   for line in io.lines(file) do
      i = i + 1
      if i > last then break end
      if i >= first then
         local sig, body = line:match("^([^\t]*)\t(.*)$")
         reqs[#reqs + 1] = wrk.format("POST", path, {
            ["Host"] = wrk.headers["Host"],
            ["Content-Type"] = "application/json",
            ["X-Hub-Signature-256"] = sig,
         }, body)
      end
   end
   n = #reqs
   assert(n > 0, "empty slice of " .. file)
   idx = 0
   sent = 0
   wrapped = 0
   started = false
   io.open(ready .. tid, "w"):close()
end

local function all_ready()
   for t = 0, nthreads - 1 do
      local f = io.open(ready .. t, "r")
      if not f then return false end
      f:close()
   end
   return true
end

function request()
   if not started then
      -- wrk calls request() once in thread 0's state, from its main thread, right after
      -- that init(), to check the request parses: answer that call without waiting (and
      -- without counting it: it is never sent).
      if tid == 0 and not verified then
         verified = true
         return reqs[1]
      end
      while not all_ready() do ffi.C.usleep(1000) end
      started = true
   end
   idx = idx + 1
   if idx > n then
      idx = 1
      wrapped = wrapped + 1
   end
   sent = sent + 1
   return reqs[idx]
end

local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate and rate > 0 then
   local ts = ffi.new("bench_timespec")
   local function now_ms()
      ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
   end
   local interval = nthreads * 1000 / rate
   local slot = nil
   function delay()
      local now = now_ms()
      if slot == nil then
         slot = now
      else
         slot = slot + interval
      end
      -- Every connection busy for a while (the server is slower than the target): do not
      -- send a burst to catch up, fall behind (the achieved rate shows it).
      if slot < now - 50 then slot = now end
      local d = slot - now
      if d < 0 then return 0 end
      return math.floor(d)
   end
end

function done(summary, latency, requests)
   local sent, wrapped = 0, 0
   for _, t in ipairs(threads) do
      sent = sent + (t:get("sent") or 0)
      wrapped = wrapped + (t:get("wrapped") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d sent=%d wrapped=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%.0f\n",
      summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
      sent, wrapped,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
end
LUA

# ---- processes -----------------------------------------------------------------------
wait_http() { # url what pid

  for _ in $(seq 1 300); do
    if curl -s -o /dev/null --max-time 1 "$1"; then return 0; fi
    kill -0 "$3" 2>/dev/null || die "$2 exited at start; its log is in $TMP (KEEP_TMP=1 keeps it)"
    sleep 0.1
  done
  die "$2 did not come up at $1"
}

log "starting autopilot sim on 127.0.0.1:$SIM_PORT"
"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --agents "$TMP/agents.json" >"$TMP/sim.log" 2>&1 &
SIM_PID=$!
PIDS+=("$SIM_PID")
wait_http "http://127.0.0.1:$SIM_PORT/_sim/agents/101" "autopilot sim" "$SIM_PID"

"$BIN" check --config "$TMP/autopilot.toml" >"$TMP/check.log" 2>&1 \
  || { cat "$TMP/check.log" >&2; die "autopilot check refused the bench config"; }

AP_PID=
start_autopilot() { # phase [config]
  mkdir -p "$TMP/$1"
  (cd "$TMP/$1" && exec "$BIN" --log-format json serve --config "${2:-$TMP/autopilot.toml}") >"$TMP/$1/autopilot.log" 2>&1 &
  AP_PID=$!
  PIDS+=("$AP_PID")
  wait_http "http://127.0.0.1:$AP_PORT/readyz" "autopilot" "$AP_PID"
}
# Stops a process this script started and forgets it (so the exit trap never signals a
# pid that has since been reused).
stop_pid() { # pid
  local keep=() p
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
stop_autopilot() {
  stop_pid "$AP_PID"
  AP_PID=
}

WH_PID=
start_webhook() {
  # Without -verbose, webhook 2.8 discards its log: logging costs it nothing.
  webhook -hooks "$TMP/hooks.json" -ip 127.0.0.1 -port "$WH_PORT" -nopanic >"$TMP/webhook.log" 2>&1 &
  WH_PID=$!
  PIDS+=("$WH_PID")
  wait_http "http://127.0.0.1:$WH_PORT/" "webhook" "$WH_PID"
}

AP_URL="http://127.0.0.1:$AP_PORT/webhooks/bench"
WH_URL="http://127.0.0.1:$WH_PORT/hooks/bench"

post() { # url good|bad: prints the status code
  curl -s -o "$TMP/curl.out" -w '%{http_code}' -X POST "$1" \
    -H 'content-type: application/json' -H "X-Hub-Signature-256: $(cat "$TMP/$2.sig")" \
    --data-binary @"$TMP/$2.json"
}
check_receiver() { # name url
  local good bad
  good=$(post "$2" good)
  [[ $good == 2?? ]] || die "$1: a correctly signed delivery got $good: $(cat "$TMP/curl.out")"
  echo "   $1: signed -> $good $(head -c 200 "$TMP/curl.out")" >&2
  bad=$(post "$2" bad)
  [[ $bad != 2?? ]] || die "$1: a badly signed delivery was accepted ($bad: $(cat "$TMP/curl.out"))"
  echo "   $1: bad signature -> $bad $(head -c 200 "$TMP/curl.out")" >&2
}

# ---- measuring -----------------------------------------------------------------------
declare -A R
run_wrk() { # label url reqfile count conns duration [rate]: results in R[label.*]
  local label=$1 url=$2 reqs=$3 count=$4 conns=$5 dur=$6 rate=${7:-}
  local out="$TMP/wrk.$label.txt" line kv
  local path="/${url#http://*/}"
  log "wrk $label: -t$THREADS -c$conns -d$dur${rate:+, paced to $rate req/s} $url"
  # wrk under a small Python wrapper that measures, over the run proper (from the moment
  # every wrk thread has loaded its requests to wrk's exit), the CPU time used by the
  # machine, by wrk and by the receivers.
  BENCH_REQS=$reqs BENCH_COUNT=$count BENCH_THREADS=$THREADS BENCH_PATH=$path BENCH_RATE=$rate \
    BENCH_READY="$TMP/ready.$label." \
    python3 - "$out" "$TMP/ready.$label." "$THREADS" "${AP_PID:-0}" "${SIM_PID:-0}" "${WH_PID:-0}" \
      wrk -t"$THREADS" -c"$conns" -d"$dur" --latency --timeout 10s -s "$TMP/ingest.lua" "$url" <<'PY' \
      || die "wrk failed: $(cat "$out")"
import os, subprocess, sys, time
out, ready, nthreads, ap, sim, wh = sys.argv[1:7]
hz = os.sysconf("SC_CLK_TCK")
def cpu(pid):  # user+sys of a process and its waited-for children, in seconds
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in f[11:15]) / hz
    except (OSError, IndexError):
        return 0.0
def busy():
    f = open("/proc/stat").readline().split()
    return sum(int(f[i]) for i in (1, 2, 3, 6, 7, 8)) / hz
def sample():
    return time.monotonic(), busy(), cpu(ap), cpu(sim), cpu(wh)
with open(out, "w") as f:
    p = subprocess.Popen(sys.argv[7:], stdout=f, stderr=subprocess.STDOUT)
    done = None
    while not all(os.path.exists(f"{ready}{t}") for t in range(int(nthreads))):
        done = os.wait4(p.pid, os.WNOHANG)
        if done[0]:
            break
        time.sleep(0.005)
    start, wrk0 = sample(), cpu(p.pid)
    if not done or not done[0]:
        done = os.wait4(p.pid, 0)
    _, status, ru = done
    end = sample()
wall, b, a, s, w = (y - x for x, y in zip(start, end))
with open(out, "a") as f:
    f.write(f"CPU wall={wall:.2f} busy={b:.2f} ap={a:.2f} sim={s:.2f} wh={w:.2f} wrk={ru.ru_utime + ru.ru_stime - wrk0:.2f}\n")
sys.exit(os.waitstatus_to_exitcode(status))
PY
  grep -v -e '^BENCH ' -e '^CPU ' "$out" | sed 's/^/   /' >&2
  line=$(grep '^BENCH ' "$out") || die "wrk printed no summary: $(cat "$out")"
  for kv in ${line#BENCH }; do R[$label.${kv%%=*}]=${kv#*=}; done
  line=$(grep '^CPU ' "$out") || die "no CPU figures in $out"
  for kv in ${line#CPU }; do R[$label.cpu_${kv%%=*}]=${kv#*=}; done
  R[$label.rps]=$(awk -v n="${R[$label.requests]}" -v d="${R[$label.duration_us]}" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
  R[$label.p50]=$(awk -v u="${R[$label.p50_us]}" 'BEGIN { printf "%.2f", u / 1000 }')
  R[$label.p99]=$(awk -v u="${R[$label.p99_us]}" 'BEGIN { printf "%.2f", u / 1000 }')
  R[$label.sockerr]=$(( R[$label.connect_errors] + R[$label.read_errors] + R[$label.write_errors] + R[$label.timeouts] ))
  if (( R[$label.wrapped] > 0 )); then
    echo "WARNING: $label: wrk ran past its slice of deliveries (duplicates were sent); raise N" >&2
  fi
}

# Counts from a phase's database (read-only, beside the running daemon): deliveries, rule
# runs, jobs, jobs done, and the wrk deliveries stored per second in 5-second slices.
db_counts() { # phase -> "deliveries runs jobs jobs_done slices"
  python3 - "$TMP/$1/db/autopilot.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
q = lambda s: c.execute(s).fetchone()[0]
times = [t for (t,) in c.execute(
    "select received_at from deliveries where source = 'bench' and dedupe_key != 'id:1' order by id")]
rates = "-"
if len(times) > 1:
    span = (times[-1] - times[0]) / 1000
    full = int(span // 5)
    slices = [0] * (full + 1)
    for t in times:
        slices[int((t - times[0]) // 5000)] += 1
    # Whole 5 s slices only; a run shorter than that gets its mean rate.
    rates = ",".join(str(n // 5) for n in slices[:full]) if full else str(int(len(times) / span))
print(q("select count(*) from deliveries where source = 'bench'"), q("select count(*) from rule_runs"),
      q("select count(*) from jobs"), q("select count(*) from jobs where status = 'done'"),
      rates)
PY
}

FAIL=0
check_autopilot_run() { # label phase deliveries_before
  local label=$1 phase=$2 before=$3 d r j ndone slices
  if (( R[$label.status_errors] != 0 || R[$label.sockerr] != 0 )); then
    echo "FAIL: $label: autopilot answered ${R[$label.status_errors]} non-2xx responses, ${R[$label.sockerr]} socket errors/timeouts; see its log (KEEP_TMP=1)" >&2
    FAIL=1
  fi
  # Durability: every 2xx wrk counted must be a committed delivery. Requests that wrk
  # had written when its time ran out are not counted by wrk but may have committed (a
  # delivery in the group commit is written even if its client hung up): at most
  # sent - counted of them. Give those a moment to land before counting.
  sleep 1
  read -r d r j ndone slices < <(db_counts "$phase")
  local stored=$(( d - before ))
  local ok=$(( R[$label.requests] - R[$label.status_errors] ))
  local sent=${R[$label.sent]} note
  if (( R[$label.wrapped] > 0 )); then
    note="stored $stored vs 2xx $ok: not comparable, wrk re-sent deliveries (raise N)"; FAIL=1
  elif (( stored < ok )); then
    note="DURABILITY CHECK FAILED: stored $stored < 2xx $ok"; FAIL=1
  elif (( stored > sent )); then
    note="stored $stored > sent $sent: unexpected"; FAIL=1
  elif (( stored > ok )); then
    note="stored $stored = 2xx $ok + $(( stored - ok )) in flight when wrk stopped ($(( sent - ok )) were in flight)"
  else
    note="stored $stored = 2xx $ok"
  fi
  R[$label.durability]=$note
  R[$label.jobs]=$j
  R[$label.jobs_done]=$ndone
  R[$label.slices]=$slices
  echo "   $label: $note; rule runs $r, jobs $j, of which done $ndone (the rest still queued)" >&2
  echo "   $label: deliveries stored per second, by 5-second slice (whole slices only): $slices" >&2
}

# webhook answers before its command runs (a goroutine per hook): after a flood it keeps
# running /bin/true for a while. Waits until it is idle (under 10% of a core), so the next
# phase does not share the CPU with the last one's backlog; prints how long that took.
wait_idle() { # pid
  local t0=$SECONDS c0 c1
  while (( SECONDS - t0 < 300 )); do
    c0=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$1/stat")
    sleep 1
    c1=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$1/stat")
    (( c1 - c0 > CLK_TCK / 10 )) || break
  done
  echo $(( SECONDS - t0 ))
}
CLK_TCK=$(getconf CLK_TCK)

log "autopilot: auth checks"
start_autopilot max
check_receiver autopilot "$AP_URL"
read -r before _ < <(db_counts max)
run_wrk ap_max "$AP_URL" "$TMP/max.reqs" "$N" "$CONNS" "$DURATION"
check_autopilot_run ap_max max "$before"
stop_autopilot

log "autopilot: storing only (the rule matches nothing), fresh database"
start_autopilot store "$TMP/autopilot-store.toml"
read -r before _ < <(db_counts store)
run_wrk ap_store "$AP_URL" "$TMP/max.reqs" "$N" "$CONNS" "$DURATION"
check_autopilot_run ap_store store "$before"
stop_autopilot

log "autopilot: fixed rate, fresh database"
start_autopilot rate
read -r before _ < <(db_counts rate)
run_wrk ap_rate "$AP_URL" "$TMP/rate.reqs" "$N_RATE" "$RATE_CONNS" "$RATE_DURATION" "$RATE"
check_autopilot_run ap_rate rate "$before"
stop_autopilot

if [[ ${SKIP_WEBHOOK:-} != 1 ]]; then
  log "webhook: auth checks"
  start_webhook
  check_receiver webhook "$WH_URL"
  run_wrk wh_max "$WH_URL" "$TMP/max.reqs" "$N" "$CONNS" "$DURATION"
  R[wh_max.drain]=$(wait_idle "$WH_PID")
  echo "   webhook kept running the accepted hooks' commands for about ${R[wh_max.drain]} s after wrk stopped" >&2
  run_wrk wh_rate "$WH_URL" "$TMP/rate.reqs" "$N_RATE" "$RATE_CONNS" "$RATE_DURATION" "$RATE"
  R[wh_rate.drain]=$(wait_idle "$WH_PID")
  stop_pid "$WH_PID"
  WH_PID=
fi

# ---- report --------------------------------------------------------------------------
CORES=$(nproc)
cpu_note() { # label: where the CPU went during the run, in % of one core
  local l=$1
  awk -v s="${R[$l.cpu_wall]}" -v ap="${R[$l.cpu_ap]}" -v sim="${R[$l.cpu_sim]}" -v wh="${R[$l.cpu_wh]}" \
      -v wrk="${R[$l.cpu_wrk]}" -v busy="${R[$l.cpu_busy]}" -v cores="$CORES" 'BEGIN {
    other = busy - ap - sim - wh - wrk; if (other < 0) other = 0
    idle = cores * s - busy; if (idle < 0) idle = 0
    out = ""
    if (ap > 0) out = out sprintf("autopilot %.0f%%, sim %.0f%%, ", 100 * ap / s, 100 * sim / s)
    if (wh > 0) out = out sprintf("webhook %.0f%% (with its /bin/true children), ", 100 * wh / s)
    printf "CPU %swrk %.0f%%, everything else %.0f%%, idle %.0f%% (of %d00%%)", out, 100 * wrk / s, 100 * other / s, 100 * idle / s, cores }'
}
row() { # label receiver notes
  local l=$1 extra=""
  [[ -n ${R[$l.requests]:-} ]] || return 0
  (( R[$l.sockerr] == 0 )) || extra=", ${R[$l.sockerr]} socket errors/timeouts"
  printf '| %s | %s | %s ms | %s ms | %s non-2xx%s; %s; %s |\n' "$2" "${R[$l.rps]}" \
    "${R[$l.p50]}" "${R[$l.p99]}" "${R[$l.status_errors]}" "$extra" "$3" "$(cpu_note "$l")"
}

echo
echo "## Webhook ingest: autopilot vs webhook $WEBHOOK_VERSION"
echo
echo "$(date -u +%Y-%m-%dT%H:%MZ), $CORES cores, loopback, load average before the run: $LOAD_BEFORE; wrk -t$THREADS; autopilot RUST_LOG=$RUST_LOG (JSON log to a file), AGENTS=$AGENTS; webhook without -verbose (no log)."
echo
echo "| receiver | req/s | p50 | p99 | notes |"
echo "|---|---|---|---|---|"
row ap_max "autopilot, max (-c$CONNS, $DURATION)" "${R[ap_max.durability]:-}; stored/s by 5 s slice: ${R[ap_max.slices]:-}; jobs done by the end: ${R[ap_max.jobs_done]:-?} of ${R[ap_max.jobs]:-?}"
row ap_store "autopilot storing only, max (-c$CONNS, $DURATION)" "${R[ap_store.durability]:-}; the rule matches nothing: no runs, no jobs"
row wh_max "webhook, max (-c$CONNS, $DURATION)" "runs /bin/true per delivery in a goroutine after answering, stores nothing; still running them ${R[wh_max.drain]:-?} s after wrk stopped"
row ap_rate "autopilot, $RATE req/s target (-c$RATE_CONNS, $RATE_DURATION)" "${R[ap_rate.durability]:-}; stored/s by 5 s slice: ${R[ap_rate.slices]:-}; jobs done by the end: ${R[ap_rate.jobs_done]:-?} of ${R[ap_rate.jobs]:-?}"
row wh_rate "webhook, $RATE req/s target (-c$RATE_CONNS, $RATE_DURATION)" "runs /bin/true per delivery in a goroutine after answering, stores nothing; started idle"
echo
if [[ -n ${R[wh_max.rps]:-} ]]; then
  ratio=$(awk -v a="${R[ap_max.rps]}" -v w="${R[wh_max.rps]}" 'BEGIN { printf "%.2f", a / w }')
  echo "Throughput ratio autopilot / webhook: **$ratio**"
  echo
  if [[ -n ${R[ap_store.rps]:-} ]]; then
    echo "Storing only (no rule matches) / webhook: $(awk -v a="${R[ap_store.rps]}" -v w="${R[wh_max.rps]}" 'BEGIN { printf "%.2f", a / w }')"
    echo
  fi
  awk -v r="$ratio" 'BEGIN { exit !(r >= 3) }' && t="met" || t="NOT met"
  echo "- target >= 3x webhook's throughput, every 2xx committed with synchronous=FULL: $t"
fi
awk -v p="${R[ap_rate.p99]}" 'BEGIN { exit !(p < 25) }' && t="met" || t="NOT met"
echo "- target p99 < 25 ms at ~$RATE req/s (achieved ${R[ap_rate.rps]} req/s, p99 ${R[ap_rate.p99]} ms): $t"
echo
echo "Latency is wrk's: from the moment a request is written to its response, with wrk 4.1's own coordinated-omission correction (synthetic samples for responses slower than twice the mean per-connection interval). In the fixed-rate runs a connection waits for its response before its next send slot (closed loop), hence the achieved rate. Load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)."
if [[ $FAIL != 0 ]]; then
  echo
  echo "**FAILED**: see the messages above."
fi
exit "$FAIL"

#!/usr/bin/env bash
# The gateway's hot routes under wrk (C, so the load generator costs the shared cores little), against a running
# farm, as issue 20 measured it: 2 threads, 16 connections, 8 s per route, the queue paused so nothing renders.
#
#   make up                                   # in another terminal
#   bench/wrk_gateway.sh [base_url] [key]     # defaults: http://127.0.0.1:7861 and var/admin_key
#
# Prints requests/s, p50 and p95 per route and the ratio to /healthz in the same run, and how many jobs were queued
# before it (a long queue makes polls and lists cost more; each run's POSTs add thousands). Needs wrk (Debian: apt-get
# install wrk). The queue is paused for the run and resumed at the end; the POSTs leave queued jobs behind. The key's
# owner runs without a rate limit or queued cap meanwhile (their defaults are restored at the end).
set -euo pipefail
BASE=${1:-http://127.0.0.1:7861}
KEY=${2:-$(cat var/admin_key)}
SECONDS_PER_ROUTE=${SECONDS_PER_ROUTE:-8}
AUTH="Authorization: Bearer $KEY"
WORK=$(mktemp -d)
OWNER=$(curl -sf -H "$AUTH" "$BASE/v1/usage" | python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"])')
# The POST run measures the gateway, not the rate limit (60 then 10/s by default, which wrk passes in a moment):
# the key's owner gets no rate limit or queued cap for the run, and its defaults back at the end.
LIFTED='{"rate_burst": 1000000, "rate_per_second": 1000000, "max_queued": 0}'
RESTORED='{"rate_burst": null, "rate_per_second": null, "max_queued": null}'
trap 'curl -s -X POST -H "$AUTH" "$BASE/v1/admin/queue/resume" >/dev/null
      curl -s -X PATCH -H "$AUTH" -H "Content-Type: application/json" -d "$RESTORED" "$BASE/v1/admin/owners/$OWNER" >/dev/null
      rm -rf "$WORK"' EXIT

curl -sf -X POST -H "$AUTH" "$BASE/v1/admin/queue/pause" >/dev/null
# Pausing stops claims, not the batch a worker is rendering: wait for it (up to a minute), or its render and the
# updates after it would compete with the first routes measured.
for _ in $(seq 60); do
  RUNNING=$(curl -sf -H "$AUTH" "$BASE/v1/admin/queue" | python3 -c 'import json,sys; print(json.load(sys.stdin)["database"]["running"])')
  [ "$RUNNING" = 0 ] && break
  sleep 1
done
curl -sf -X PATCH -H "$AUTH" -H "Content-Type: application/json" -d "$LIFTED" "$BASE/v1/admin/owners/$OWNER" >/dev/null
sleep 6  # the other API processes keep the owner's old policy cached for up to 5 s (POLICY_CACHE_SECONDS)
BODY='{"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}'
JOB=$(curl -sf -X POST -H "$AUTH" -H 'Content-Type: application/json' -d "$BODY" "$BASE/v1/jobs" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
QUEUED=$(curl -sf -H "$AUTH" "$BASE/v1/jobs?status=queued&limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
echo "jobs queued before the run: $QUEUED (this key's); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
ETAG=$(curl -sf -D - -o /dev/null -H "$AUTH" "$BASE/v1/jobs/$JOB" | grep -i '^etag:' | cut -d' ' -f2- | tr -d '\r')
cat > "$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
EOF
cat > "$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.1f %.1f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
EOF

run() {  # name, path, extra wrk args...
  local name=$1 path=$2; shift 2
  local script="$WORK/report.lua"
  if [ "${1:-}" = "--post" ]; then shift; cat "$WORK/post.lua" "$WORK/report.lua" > "$WORK/both.lua"; script="$WORK/both.lua"; fi
  local out
  out=$(wrk -t2 -c16 -d"${SECONDS_PER_ROUTE}s" --latency -s "$script" -H "$AUTH" "$@" "$BASE$path" | grep '^RESULT')
  echo "$name ${out#RESULT }"
}

{
  run "GET /healthz" /healthz
  run "GET /v1/jobs/{id}" "/v1/jobs/$JOB"
  run "GET /v1/jobs/{id} (304)" "/v1/jobs/$JOB" -H "If-None-Match: $ETAG"
  run "GET /v1/jobs" "/v1/jobs?limit=20"
  run "GET /sdapi/v1/progress" /sdapi/v1/progress
  run "POST /v1/jobs" /v1/jobs --post  # last: the jobs it queues would weigh on the routes after it
} > "$WORK/results"

python3 - "$WORK/results" <<'EOF'
import sys
rows = [line.rsplit(" ", 4) for line in open(sys.argv[1]).read().splitlines()]
base = float(rows[0][1])
print("| route | requests/s | p50 ms | p95 ms | vs /healthz | errors |")
print("|---|---:|---:|---:|---:|---:|")
for name, rps, p50, p95, errors in rows:
    print(f"| `{name}` | {float(rps):.0f} | {float(p50):.1f} | {float(p95):.1f} | {float(rps) / base:.2f} | {errors} |")
EOF

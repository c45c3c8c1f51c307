#!/bin/bash
# Instructions per request of intermission on the held row (the holding page), repeatable where
# req/s is not (callgrind counts instructions, whatever else runs): intermission with
# threads = 1, maintenance switched on through the control socket with the harness's message,
# `h2load --h1 -t1 -cCONNS -H "Accept: text/html"` on `/` as wrk asks in load.sh's held row,
# 3,000 requests of warm-up, then N = 10,000 and 3N under instrumentation; per request =
# (T(3N) - T(N)) / 2N, which leaves out start-up and connection set-up. The nginx upstream is
# there only for the health checks (a server down is checked every 500 ms, which would count).
# With UNTIL set (UNTIL=+2h), maintenance has that announced end, as a scheduled window or
# `ctl on --until` gives it, and `Retry-After` counts down to it.
# usage: benches/load/callgrind_held.sh BINARY OUTDIR [CONNS]   (needs valgrind, nginx, h2load)
set -u
BIN=$1; W=$2; C=${3:-16}; rm -rf $W; mkdir -p $W/up $W/im
UP=${UP_PORT:-28361}; P=${HELD_PORT:-28362}
VPID=""
trap 'kill $VPID 2>/dev/null; wait $VPID 2>/dev/null; nginx -c $W/up/nginx.conf -s stop 2>/dev/null' EXIT
cd "$(dirname "$0")"
. ./h2_row.sh
h2_upstream $W $UP
cat > $W/im/config.toml <<EOC
[proxy]
listen = ["127.0.0.1:$P"]
threads = 1
[upstream]
servers = ["http://127.0.0.1:$UP"]
[health]
interval = "5s"
[log]
access_log = false
level = "warn"
[control]
socket = "$W/im/control.sock"
state_file = "$W/im/state.json"
EOC
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$W/cg.out.%p $BIN run -c $W/im/config.toml > $W/im/log 2>&1 & VPID=$!
for i in $(seq 60); do curl -s http://127.0.0.1:$P/ -o /dev/null && break; sleep 1; done
MESSAGE="We are upgrading our database. Orders placed before 09:00 are safe. Back in about 45 minutes."
timeout 20 python3 ./control.py $W/im/control.sock on --message "$MESSAGE" ${UNTIL:+--until "$UNTIL"} >/dev/null || { echo "control on failed"; exit 1; }
H=(-H "Accept: text/html")
h2load --h1 -t1 -c$C -n 3000 "${H[@]}" http://127.0.0.1:$P/ | grep -E "status codes"
callgrind_control -i on $VPID >/dev/null
callgrind_control -z $VPID >/dev/null
h2load --h1 -t1 -c$C -n 10000 "${H[@]}" http://127.0.0.1:$P/ | grep -E "status codes"
callgrind_control -d n10000 $VPID >/dev/null
callgrind_control -z $VPID >/dev/null
h2load --h1 -t1 -c$C -n 30000 "${H[@]}" http://127.0.0.1:$P/ | grep -E "status codes"
callgrind_control -d n30000 $VPID >/dev/null
sleep 1
T1=$(grep -h "^summary:" $W/cg.out.*.1 | awk "{print \$2}")
T3=$(grep -h "^summary:" $W/cg.out.*.2 | awk "{print \$2}")
echo "T(10000)=$T1 T(30000)=$T3 per-request=$(( (T3 - T1) / 20000 ))"

#!/bin/bash
# Instructions per request of intermission on the forwarding row, repeatable where req/s is
# not (callgrind counts instructions, whatever else runs): the nginx upstream of the h2 row
# (`return 200` of 100 bytes, 1 worker), intermission with threads = 1 and the access log off,
# `h2load --h1 -t1 -cCONNS` on `/`, 3,000 requests of warm-up, then N = 10,000 and 3N under
# instrumentation; per request = (T(3N) - T(N)) / 2N, which leaves out start-up and connection
# set-up. The script the sessions of 2026-12-07 ran as `cg-h1.sh`. Timers fire by the clock,
# not by request, and a request under valgrind takes ten times as long: compare call counts
# of `Sleep::reset` and `Sleep::poll` between runs as well as the total.
# usage: benches/load/callgrind_forward.sh BINARY OUTDIR [CONNS]   (needs valgrind, nginx, h2load)
set -u
BIN=$1; W=$2; C=${3:-16}; rm -rf $W; mkdir -p $W/up $W/im
UP=${UP_PORT:-28363}; P=${FORWARD_PORT:-28364}
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
h2load --h1 -t1 -c$C -n 3000 http://127.0.0.1:$P/ | grep -E "status codes"
callgrind_control -i on $VPID >/dev/null
callgrind_control -z $VPID >/dev/null
h2load --h1 -t1 -c$C -n 10000 http://127.0.0.1:$P/ | grep -E "status codes"
callgrind_control -d n10000 $VPID >/dev/null
callgrind_control -z $VPID >/dev/null
h2load --h1 -t1 -c$C -n 30000 http://127.0.0.1:$P/ | grep -E "status codes"
callgrind_control -d n30000 $VPID >/dev/null
sleep 1
T1=$(grep -h "^summary:" $W/cg.out.*.1 | awk "{print \$2}")
T3=$(grep -h "^summary:" $W/cg.out.*.2 | awk "{print \$2}")
echo "T(10000)=$T1 T(30000)=$T3 per-request=$(( (T3 - T1) / 20000 ))"

#!/bin/bash
# Instructions per request of intermission on the HTTPS HTTP/2 row, repeatable where req/s is
# not (callgrind counts instructions, whatever else runs): nginx upstream (return 200, 100
# bytes), intermission with threads = 1 terminating TLS, `h2load -t1 -c16 -m8`, 3,000
# requests of warm-up, then N = 10,000 and 3N under instrumentation; per request =
# (T(3N) - T(N)) / 2N, which leaves out start-up and connection set-up.
# usage: benches/load/callgrind_h2.sh BINARY OUTDIR   (needs valgrind, nginx, h2load, openssl)
set -u
BIN=$1; W=$2; rm -rf $W; mkdir -p $W/up $W/im
UP=${UP_PORT:-28152}; TLSP=${TLS_PORT:-28153}
VPID=""
trap 'kill $VPID 2>/dev/null; wait $VPID 2>/dev/null; nginx -c $W/up/nginx.conf -s stop 2>/dev/null' EXIT
. "$(dirname "$0")/h2_row.sh"
h2_cert $W
h2_upstream $W $UP
h2_im_config $W/im $UP $TLSP $W
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$W/cg.out.%p $BIN run -c $W/im/config.toml > $W/im/log 2>&1 & VPID=$!
for i in $(seq 60); do curl -sk --http2 https://127.0.0.1:$TLSP/ -o /dev/null && break; sleep 1; done
h2load -t1 -c16 -m8 -n 3000 https://127.0.0.1:$TLSP/ | grep -E "requests:|status codes"
callgrind_control -i on $VPID >/dev/null
callgrind_control -z $VPID >/dev/null
h2load -t1 -c16 -m8 -n 10000 https://127.0.0.1:$TLSP/ | grep -E "requests:|status codes"
callgrind_control -d n10000 $VPID >/dev/null
callgrind_control -z $VPID >/dev/null
h2load -t1 -c16 -m8 -n 30000 https://127.0.0.1:$TLSP/ | grep -E "requests:|status codes"
callgrind_control -d n30000 $VPID >/dev/null
sleep 1
T1=$(grep -h "^summary:" $W/cg.out.*.1 | awk "{print \$2}")
T3=$(grep -h "^summary:" $W/cg.out.*.2 | awk "{print \$2}")
echo "T(10000)=$T1 T(30000)=$T3 per-request=$(( (T3 - T1) / 20000 ))"

#!/bin/bash
# Side by side on the harness's HTTPS h2 row: two intermission binaries (OLD, NEW) and nginx
# terminating TLS (1 worker, `ssl http2`, upstream keepalive 128), before an nginx upstream
# answering 100 bytes, alternated ROUNDS times (default 6) with
# `h2load -t1 -c16 -m8 -D 5` after a 2 s warm-up each; prints "name req/s µs-of-CPU-per-request"
# per run (CPU from /proc). Ports 18080 and 18443-18445 on 127.0.0.1; needs nginx, h2load,
# openssl, python3. Used to tell a regression from a machine (docs/performance-history.md).
#   benches/load/ab_h2.sh OLD_BINARY NEW_BINARY [ROUNDS]
set -u
OLD=${1:?usage: ab_h2.sh OLD_BINARY NEW_BINARY [ROUNDS]}; NEW=${2:?usage: ab_h2.sh OLD_BINARY NEW_BINARY [ROUNDS]}
ROUNDS=${3:-6}
OLDPID=""; NEWPID=""
W=$(mktemp -d); mkdir -p $W/up $W/ngt
trap 'kill $OLDPID $NEWPID 2>/dev/null; nginx -c $W/up/nginx.conf -s stop 2>/dev/null; nginx -c $W/ngt/nginx.conf -s stop 2>/dev/null; rm -rf $W' EXIT
. "$(dirname "$0")/h2_row.sh"
h2_cert $W
h2_upstream $W 18080
{ nginx_common 1 $W/ngt; echo "upstream app { server 127.0.0.1:18080; keepalive 128; } server { listen 127.0.0.1:18445 ssl http2; ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem; ssl_protocols TLSv1.2 TLSv1.3; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }"; } > $W/ngt/nginx.conf
nginx -c $W/ngt/nginx.conf
h2_im_config $W/old 18080 18443 $W; h2_im_config $W/new 18080 18444 $W
$OLD run -c $W/old/config.toml > $W/old/log 2>&1 & OLDPID=$!
$NEW run -c $W/new/config.toml > $W/new/log 2>&1 & NEWPID=$!
sleep 2
NGPID=$(pgrep -f "nginx: worker" | while read p; do if grep -q ngt /proc/$(ps -o ppid= -p $p | tr -d ' ')/cmdline 2>/dev/null; then echo $p; fi; done | head -1)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # name port pid
  local c0=$(cpu $3); local out=$(h2load -t1 -c16 -m8 -D 5 https://127.0.0.1:$2/ 2>&1); local c1=$(cpu $3)
  local rps=$(grep -oP 'finished in [0-9.]+s, \K[0-9.]+(?= req/s)' <<<"$out"); local done=$(grep -oP 'requests: \d+ total, \d+ started, \K\d+(?= done)' <<<"$out")
  local us=$(python3 -c "print(round(($c1-$c0)*10000/max(1,$done),2))")
  echo "$1 $rps $us"
}
for p in 18443 18444 18445; do h2load -t1 -c16 -m8 -D 2 https://127.0.0.1:$p/ >/dev/null 2>&1; done
for _ in $(seq "$ROUNDS"); do run old 18443 $OLDPID; run new 18444 $NEWPID; run nginx 18445 $NGPID; done

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
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout $W/key.pem -out $W/cert.pem 2>/dev/null
BODY=$(head -c 100 /dev/zero | tr '\0' 'x')
common() { echo "worker_processes $1; pid $2/nginx.pid; error_log $2/error.log; events { worker_connections 4096; } http { access_log off; client_body_temp_path $2/t1; proxy_temp_path $2/t2; fastcgi_temp_path $2/t3; uwsgi_temp_path $2/t4; scgi_temp_path $2/t5; keepalive_requests 1000000; keepalive_timeout 75s;"; }
{ common 1 $W/up; echo "server { listen 127.0.0.1:18080; location / { return 200 '$BODY'; } } }"; } > $W/up/nginx.conf
{ common 1 $W/ngt; echo "upstream app { server 127.0.0.1:18080; keepalive 128; } server { listen 127.0.0.1:18445 ssl http2; ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem; ssl_protocols TLSv1.2 TLSv1.3; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }"; } > $W/ngt/nginx.conf
nginx -c $W/up/nginx.conf; nginx -c $W/ngt/nginx.conf
conf() { mkdir -p $W/$1; cat > $W/$1/config.toml <<EOC
[proxy]
listen = []
threads = 1
[upstream]
servers = ["http://127.0.0.1:18080"]
[health]
interval = "5s"
[log]
access_log = false
level = "warn"
[control]
socket = "$W/$1/control.sock"
state_file = "$W/$1/state.json"
[tls]
listen = ["127.0.0.1:$2"]
[[tls.certificates]]
cert = "$W/cert.pem"
key = "$W/key.pem"
EOC
}
conf old 18443; conf new 18444
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

#!/bin/bash
# What one forwarded request costs the upstream, by the request each proxy writes: the upstream
# nginx's user-space instructions per request (callgrind counts them whatever else runs, where
# the upstream's CPU time in load.sh moves with the machine's load). Both proxies are set up
# as in load.sh's forwarding rows (nginx: 1 worker, `proxy_http_version 1.1`, `Connection ""`,
# keepalive; intermission: threads = 1) in front of a capture server, which keeps the head
# each proxy writes for wrk's request (`GET / HTTP/1.1` and `Host` alone, as `wrk -t1 -c64`
# sends it); each head is then sent N and 3N times, one after another on one keep-alive
# connection, to the harness's upstream (nginx, 1 worker, `return 200` of 100 bytes) run
# under callgrind; per request = (T(3N) - T(N)) / 2N, which leaves out start-up.
# usage: benches/load/callgrind_upstream.sh BINARY OUTDIR [N]   (needs valgrind, nginx, python3)
# Ports: CAP_PORT (capture), NGX_PORT, IM_PORT, UP_PORT, 28211..28214 unless set.
set -u
BIN=$1; W=$2; N=${3:-2000}; rm -rf $W; mkdir -p $W/ngx $W/im $W/up
CAP=${CAP_PORT:-28211}; NGX=${NGX_PORT:-28212}; IM=${IM_PORT:-28213}; UP=${UP_PORT:-28214}
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null; wait 2>/dev/null; nginx -c $W/ngx/nginx.conf -s stop 2>/dev/null' EXIT
cd "$(dirname "$0")"
. ./h2_row.sh

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }

# The capture server: answers every head with a 2-byte body and writes each head, escaped, on
# its own line (the health checks' too; they say who they are in their User-Agent).
python3 -u - $CAP > $W/heads.txt 2>$W/capture.log <<'EOF' &
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def serve(c):
    d = b""
    while True:
        x = c.recv(4096)
        if not x:
            return
        d += x
        while b"\r\n\r\n" in d:
            i = d.index(b"\r\n\r\n") + 4
            print(d[:i].decode("latin-1").encode("unicode_escape").decode())
            d = d[i:]
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
EOF
PIDS+=($!)
wait_port $CAP
{ nginx_common 1 $W/ngx; cat <<EOC
upstream app { server 127.0.0.1:$CAP; keepalive 128; }
server { listen 127.0.0.1:$NGX; location / { proxy_pass http://app; proxy_http_version 1.1;
  proxy_set_header Connection ""; proxy_max_temp_file_size 0; } } }
EOC
} > $W/ngx/nginx.conf
nginx -c $W/ngx/nginx.conf
cat > $W/im/config.toml <<EOC
[proxy]
listen = ["127.0.0.1:$IM"]
threads = 1
[upstream]
servers = ["http://127.0.0.1:$CAP"]
[health]
interval = "5s"
[log]
access_log = false
level = "warn"
[control]
socket = "$W/im/control.sock"
state_file = "$W/im/state.json"
EOC
$BIN run -c $W/im/config.toml > $W/im/log 2>&1 &
PIDS+=($!)
wait_port $NGX; wait_port $IM
for p in $NGX $IM; do
  printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n\r\n' $p > $W/req
  python3 - $p $W/req <<'EOF'
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(open(sys.argv[2], "rb").read())
d = b""
while not d.endswith(b"ok"):
    d += c.recv(4096)
EOF
done
sleep 0.5
grep -v -i 'health-check' $W/heads.txt > $W/forwarded.txt
[ "$(wc -l < $W/forwarded.txt)" = 2 ] || { echo "expected 2 forwarded heads:"; cat $W/heads.txt; exit 1; }

# The upstream under callgrind, without a master process: the worker is the one measured.
{ nginx_common 1 $W/up; echo "server { listen 127.0.0.1:$UP; location / { default_type text/plain; return 200 '$(head -c 100 /dev/zero | tr '\0' 'x')'; } } }"; } \
  | sed 's/^worker_processes 1;/worker_processes 1; master_process off; daemon off;/' > $W/up/nginx.conf
total() { # HEAD COUNT -> instructions of the whole run
  valgrind --tool=callgrind --callgrind-out-file=$W/up/cg.out nginx -c $W/up/nginx.conf 2>$W/up/vg.log &
  local v=$!
  wait_port $UP
  python3 - $UP "$1" $2 <<'EOF'
import socket, sys
head = sys.argv[2].encode().decode("unicode_escape").encode("latin-1")
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for _ in range(int(sys.argv[3])):
    c.sendall(head)
    d = b""
    while not d.endswith(b"x" * 10):
        d += c.recv(4096)
EOF
  kill -QUIT $v; wait $v
  awk '/^summary:/ {print $2}' $W/up/cg.out
}
for who in nginx intermission; do
  # nginx's head names its upstream block (`Host: app`); intermission's keeps the client's.
  if [ $who = nginx ]; then head=$(grep -F 'Host: app' $W/forwarded.txt); else head=$(grep -v -F 'Host: app' $W/forwarded.txt); fi
  t1=$(total "$head" $N); t3=$(total "$head" $((3 * N)))
  bytes=$(printf '%b' "$head" | wc -c)
  echo "behind $who: $bytes-byte head, $(( (t3 - t1) / (2 * N) )) upstream instructions per request: $head"
done

#!/usr/bin/env bash
# benches/load.sh — intermission against nginx, side by side, on 127.0.0.1.
#
#   benches/load.sh            # full run (about 9–11 minutes after the build)
#   benches/load.sh --quick    # smoke test (about 2 minutes)
#   benches/load.sh --help
#
# Installs what is missing (as root, with apt-get), builds intermission in release, starts an
# upstream nginx, nginx reverse proxies, nginx serving a 503 page and intermission instances,
# each in its own temporary directory with ports picked at run time, measures them with wrk (and
# with h2load over TLS for the HTTPS rows) in interleaved rows, and prints one markdown report. Every process it starts is stopped by PID
# when it ends, however it ends. Only 127.0.0.1 is ever used. See benches/load/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benches/load.sh [OPTIONS]

Measures intermission against nginx on this machine (127.0.0.1 only) and prints one markdown
report: forwarding (direct / nginx / nginx forwarding the same headers as intermission /
intermission), holding page (nginx `return 503` / intermission in maintenance), bodies of 1
KiB, 64 KiB and 1 MiB, 64 and 1024 connections, threads=2 against 2 nginx workers, HTTPS
(HTTP/2 with h2load and HTTP/1.1 with wrk; direct to a TLS upstream / nginx terminating TLS /
intermission terminating TLS, self-signed P-256 certificate made at run time), forwarding to an
https:// upstream (nginx / intermission), RSS idle and after load, RSS with many idle
keep-alive connections, and maintenance switched on and off 10 times a second under load.

Options:
  --quick           smoke test: 1 repetition, 2 s runs, 1 s warm-ups, no 1 MiB and no
                    1024-connection rows (the HTTPS rows stay), 500 idle connections
                    instead of 10,000
  --reps N          measured repetitions of each row, after one warm-up (default 3)
  --duration D      seconds per measured run, e.g. 5 or 5s (default 5)
  --warmup D        seconds per warm-up run (default 2)
  --idle N          idle keep-alive connections for the memory test (default 10000)
  --toggle-secs D   length of the toggle-under-load run (default 10)
  --no-install      never run apt-get; fail if a tool is missing
  --no-build        use the existing target/release/intermission instead of building
                    ($CARGO_TARGET_DIR/release/intermission when CARGO_TARGET_DIR is set)
  --out FILE        also write the report to FILE
  --keep            keep the temporary directory (configs, logs, raw wrk output)
  -h, --help        this text

Needs: nginx, wrk, h2load (nghttp2-client), openssl, python3, cargo, timeout (coreutils). Run as root
on Debian/Ubuntu and missing packages are installed with apt-get; otherwise it says what to
install. Progress goes to stderr, the report to stdout.
EOF
}

die() { printf 'load.sh: error: %s\n' "$*" >&2; exit 1; }
say() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------- options
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOAD_DIR="$REPO/benches/load"
COMMAND_LINE="benches/load.sh${*:+ $*}"
QUICK=0; INSTALL=1; BUILD=1; KEEP=0; OUT=""
REPS=""; DURATION=""; WARMUP=""; IDLE=""; TOGGLE_SECS=10

seconds_arg() { # NAME VALUE -> integer seconds
    local v=${2%s}
    [[ $v =~ ^[0-9]+$ && $v -ge 1 && $v -le 3600 ]] || die "$1 wants whole seconds (1..3600), e.g. 5 or 5s; got '$2'"
    printf '%s' "$v"
}
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --reps) [[ ${2:-} =~ ^[1-9][0-9]?$ ]] || die "--reps wants a number from 1 to 99"; REPS=$2; shift ;;
        --duration) DURATION=$(seconds_arg --duration "${2:-}"); shift ;;
        --warmup) WARMUP=$(seconds_arg --warmup "${2:-}"); shift ;;
        --idle) [[ ${2:-} =~ ^[1-9][0-9]*$ && ${2:-0} -le 100000 ]] || die "--idle wants 1..100000"; IDLE=$2; shift ;;
        --toggle-secs) TOGGLE_SECS=$(seconds_arg --toggle-secs "${2:-}"); shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --out) [[ -n ${2:-} ]] || die "--out wants a file name"; OUT=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
    shift
done
if ((QUICK)); then
    : "${REPS:=1}" "${DURATION:=2}" "${WARMUP:=1}" "${IDLE:=500}"
else
    : "${REPS:=3}" "${DURATION:=5}" "${WARMUP:=2}" "${IDLE:=10000}"
fi

# ---------------------------------------------------------------------------------- tools
missing_pkgs=()
command -v nginx >/dev/null 2>&1 || missing_pkgs+=(nginx)
command -v wrk >/dev/null 2>&1 || missing_pkgs+=(wrk)
command -v h2load >/dev/null 2>&1 || missing_pkgs+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || missing_pkgs+=(openssl)
command -v python3 >/dev/null 2>&1 || missing_pkgs+=(python3)
command -v timeout >/dev/null 2>&1 || missing_pkgs+=(coreutils)
if ((${#missing_pkgs[@]})); then
    if ((INSTALL)) && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing_pkgs[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        timeout 600 apt-get update -qq >&2 || die "apt-get update failed"
        if ! timeout 900 apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >&2; then
            # Some releases only have the light flavour of nginx.
            pkgs=("${missing_pkgs[@]/#nginx/nginx-light}")
            timeout 900 apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2 \
                || die "apt-get install ${missing_pkgs[*]} failed"
        fi
    else
        printf 'load.sh: missing: %s\n' "${missing_pkgs[*]}" >&2
        printf '  install them with:  sudo apt-get install -y %s\n' "${missing_pkgs[*]}" >&2
        printf '  (or run this script as root on Debian/Ubuntu and it installs them)\n' >&2
        exit 1
    fi
fi
for tool in nginx wrk h2load openssl python3 timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is still missing after the install step"
done
if ((BUILD)) && ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found: install the Rust toolchain (https://rustup.rs) or pass --no-build"
fi

# ---------------------------------------------------------------------------------- limits
# Every idle client connection is a descriptor in the proxy (and one in the client).
CONN_LIMIT=$((IDLE + 2000 > 12000 ? IDLE + 2000 : 12000))
if [[ $(id -u) -eq 0 ]]; then
    ulimit -Hn $((CONN_LIMIT * 2 > 65536 ? CONN_LIMIT * 2 : 65536)) 2>/dev/null || true
fi
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
want=$((CONN_LIMIT * 2 > 65536 ? CONN_LIMIT * 2 : 65536))
ulimit -Sn $((hard < want ? hard : want)) || die "cannot raise the open-file limit (ulimit -n)"
NOFILE=$(ulimit -Sn)
if ((NOFILE < CONN_LIMIT + 256)); then
    die "the open-file limit is $NOFILE; $((CONN_LIMIT + 256)) are needed for $IDLE idle connections. Raise the hard limit (as root: ulimit -Hn 65536, or LimitNOFILE / limits.conf) or pass a smaller --idle"
fi

# ---------------------------------------------------------------------------------- build
# Where cargo puts the build: CARGO_TARGET_DIR when set (relative to the repository, where
# cargo runs below), so that a build kept outside the clone is the one measured.
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$REPO/$TARGET_DIR"
BIN="$TARGET_DIR/release/intermission"
if ((BUILD)); then
    say "building intermission and the bare relay (cargo build --release)"
    # Two invocations: an example is built with the dev-dependencies, and cargo unifies
    # their features with the binary's when both are built by one command, which gave the
    # measured binary tokio's `full` and `test-util` (the timer driver's clock behind a mutex
    # and an orphan-process check at every park: some 500 user-space instructions per
    # forwarded request on one connection under callgrind, 100-200 on eight). The binary is
    # built as `cargo build --release` ships it.
    (cd "$REPO" && timeout 3600 cargo build --release --quiet --bin intermission \
        && timeout 3600 cargo build --release --quiet --example bare_relay) >&2 \
        || die "cargo build --release failed"
fi
[[ -x $BIN ]] || die "$BIN not found: build it (cargo build --release) or drop --no-build"
# The ceiling row: the barest relay (benches/load/bare_relay.rs), measured beside nginx.
BARE_BIN="$TARGET_DIR/release/examples/bare_relay"

# ---------------------------------------------------------------------------------- cleanup
WORK=$(mktemp -d "${TMPDIR:-/tmp}/intermission-load.XXXXXX")
chmod 755 "$WORK"
RES="$WORK/results"
mkdir -p "$RES/runs" "$WORK/www"
declare -a ALL_PIDS=()     # everything started in the background, wrappers included
declare -A SPID=()         # server name -> the server's own PID (nginx master, intermission)

cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for pid in ${SPID[@]+"${SPID[@]}"} ${ALL_PIDS[@]+"${ALL_PIDS[@]}"}; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        local alive=0
        for pid in ${SPID[@]+"${SPID[@]}"} ${ALL_PIDS[@]+"${ALL_PIDS[@]}"}; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in ${SPID[@]+"${SPID[@]}"} ${ALL_PIDS[@]+"${ALL_PIDS[@]}"}; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if ((KEEP)); then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------------------------- helpers
# The longest the whole run may take; servers are wrapped in `timeout` with it so that nothing
# outlives a harness killed with SIGKILL by more than that.
SERVER_BOUND=$((3600 * 3))
CLK_TCK=$(getconf CLK_TCK)

# N free TCP ports on 127.0.0.1, all distinct (held open together while picked).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

port_free() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

# PID plus its children (nginx workers).
family() {
    local pid=$1
    printf '%s\n' "$pid"
    cat /proc/"$pid"/task/*/children 2>/dev/null | tr ' ' '\n' | sed '/^$/d' || true
}

rss_kib() { # SERVER -> summed VmRSS in KiB
    local total=0 p v
    for p in $(family "${SPID[$1]}"); do
        v=$(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status 2>/dev/null || true)
        total=$((total + ${v:-0}))
    done
    printf '%s' "$total"
}

cpu_ticks() { # SERVER -> utime+stime ticks of the server's processes
    local total=0 p v
    for p in $(family "${SPID[$1]}"); do
        v=$(sed 's/.*) //' /proc/"$p"/stat 2>/dev/null | awk '{print $12 + $13}' || true)
        total=$((total + ${v:-0}))
    done
    printf '%s' "$total"
}

# Sockets in TIME_WAIT on connections to or from the upstream's port (or PORT): connections to
# the application that were closed instead of reused (for direct rows, wrk's own connections).
time_wait() { # [PORT]
    awk -v port="$(printf '%04X' "${1:-$PORT_UP}")" '$4 == "06" {
        split($2, l, ":"); split($3, r, ":"); if (l[2] == port || r[2] == port) n++
    } END {print n + 0}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

all_server_ticks() {
    local total=0 s
    for s in "${!SPID[@]}"; do total=$((total + $(cpu_ticks "$s"))); done
    printf '%s' "$total"
}

# CPU ticks of this shell's finished children (wrk, through timeout), and of the whole machine
# (user, nice, system, irq, softirq, steal): what is left is other processes' (a busy machine).
child_ticks() { sed 's/.*) //' /proc/$$/stat | awk '{print $14 + $15}'; }
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
idle_ticks() { awk '/^cpu / {print $5 + $6; exit}' /proc/stat; }
# TICKS of CPU time over NS nanoseconds of wall time, in % of one core (or of CORES cores).
pct() { # TICKS NS [CORES]
    awk -v c="$1" -v hz="$CLK_TCK" -v ns="$2" -v n="${3:-1}" \
        'BEGIN {v = c / hz / (ns / 1e9) / n * 100; printf "%.1f", v < 0 ? 0 : v}'
}

record_rss() { # PHASE SERVER...
    local phase=$1 s
    shift
    for s in "$@"; do
        printf '%s\t%s\t%s\n' "$s" "$phase" "$(rss_kib "$s")" >>"$RES/rss.tsv"
    done
}

note() { printf '%s\n' "$*" >>"$RES/notes.txt"; say "NOTE: $*"; }

alive() { kill -0 "${SPID[$1]}" 2>/dev/null; }

# start_server NAME PORT LOG CMD...: starts CMD under `timeout`, records the server's own PID
# and waits until PORT accepts connections.
start_server() {
    local name=$1 port=$2 log=$3 wrapper child i
    shift 3
    port_free "$port" || die "port $port on 127.0.0.1 is already taken (for $name); run again"
    timeout --kill-after=5 "$SERVER_BOUND" "$@" >"$log" 2>&1 &
    wrapper=$!
    ALL_PIDS+=("$wrapper")
    child=""
    for ((i = 0; i < 100; i++)); do
        child=$(cat /proc/"$wrapper"/task/*/children 2>/dev/null | awk '{print $1}' || true)
        [[ -n $child ]] && break
        kill -0 "$wrapper" 2>/dev/null || break
        sleep 0.05
    done
    [[ -n $child ]] || { tail -n 20 "$log" >&2 || true; die "$name did not start (see above)"; }
    SPID[$name]=$child
    for ((i = 0; i < 200; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            say "$name up on 127.0.0.1:$port (pid $child)"
            return 0
        fi
        if ! kill -0 "$child" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "$name exited at start (log above, $log)"
        fi
        sleep 0.05
    done
    tail -n 20 "$log" >&2 || true
    die "$name does not listen on 127.0.0.1:$port after 10 s"
}

NGINX_E=()
nginx -h 2>&1 | grep -q -- ' -e filename' && NGINX_E=(-e stderr)
USER_LINE=""
[[ $(id -u) -eq 0 ]] && USER_LINE="user root;  # workers must read files in this temp dir"

# nginx_conf NAME WORKERS SERVER_BLOCKS: writes $WORK/NAME/nginx.conf
nginx_conf() {
    local dir="$WORK/$1"
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
# Written by benches/load.sh for the server "$1".
$USER_LINE
worker_processes $2;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events {
    worker_connections $CONN_LIMIT;
}
http {
    access_log off;
    error_log $dir/error.log crit;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    sendfile on;
$3
}
EOF
}

start_nginx() { # NAME PORT
    local dir="$WORK/$1"
    timeout 10 nginx "${NGINX_E[@]}" -t -q -p "$dir" -c "$dir/nginx.conf" >"$dir/check.log" 2>&1 \
        || { cat "$dir/check.log" >&2; die "nginx rejected the config of $1 ($dir/nginx.conf)"; }
    start_server "$1" "$2" "$dir/stderr.log" nginx "${NGINX_E[@]}" -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
}

# intermission_conf NAME PORT THREADS [tls]: with "tls", PORT is an HTTPS listener with the
# harness's certificate ($TLS_CERT, $TLS_KEY) and there is no plaintext listener.
intermission_conf() {
    local dir="$WORK/$1" listen="\"127.0.0.1:$2\""
    mkdir -p "$dir"
    [[ ${4:-} == tls ]] && listen=""
    cat >"$dir/config.toml" <<EOF
# Written by benches/load.sh for the server "$1".
[proxy]
listen = [$listen]
threads = $3
max_connections = $CONN_LIMIT

[upstream]
servers = ["${UPSTREAM_URL:-http://127.0.0.1:$PORT_UP}"]
ca_file = "${UPSTREAM_CA:-}"

[health]
interval = "5s"

[log]
access_log = false
level = "warn"

[control]
socket = "$dir/control.sock"
state_file = "$dir/state.json"
EOF
    if [[ ${4:-} == tls ]]; then
        cat >>"$dir/config.toml" <<EOF

[tls]
listen = ["127.0.0.1:$2"]

[[tls.certificates]]
cert = "$TLS_CERT"
key = "$TLS_KEY"
EOF
    fi
}

start_intermission() { # NAME PORT
    local dir="$WORK/$1"
    timeout 10 "$BIN" check -c "$dir/config.toml" >"$dir/check.log" 2>&1 \
        || { cat "$dir/check.log" >&2; die "intermission check rejected $dir/config.toml"; }
    start_server "$1" "$2" "$dir/stderr.log" "$BIN" run -c "$dir/config.toml"
}

probe() { # PORT PATH [HEADER] -> JSON line
    local hdr=()
    [[ -n ${3:-} ]] && hdr=(-H "$3")
    timeout 20 python3 "$LOAD_DIR/probe.py" "$1" "$2" "${hdr[@]}" --wait 5
}

json_field() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval("d"+sys.argv[2]))' "$1" "$2"; }

expect_probe() { # WHAT PORT PATH STATUS BODY_BYTES(or -) [HEADER]
    local out status body
    out=$(probe "$2" "$3" "${6:-}") || die "$1: no answer on 127.0.0.1:$2$3"
    status=$(json_field "$out" '["status"]')
    body=$(json_field "$out" '["body_bytes"]')
    [[ $status == "$4" ]] || die "$1: 127.0.0.1:$2$3 answered $status, expected $4: $out"
    [[ $5 == - || $body == "$5" ]] || die "$1: 127.0.0.1:$2$3 sent a $body-byte body, expected $5: $out"
    printf '%s' "$out"
}

# ---------------------------------------------------------------------------------- rows
declare -A ROW_LABEL=() ROW_PORT=() ROW_PATH=() ROW_CONNS=() ROW_HDR=() ROW_PROC=() ROW_CLIENT=()
declare -A ROW_TWPORT=() ROW_SCHEME=()
add_row() { # ID LABEL CONNS METRIC DIRECT_REF NGINX_REF SERVER EXPECT GROUP PORT PATH [HEADER]
    ROW_LABEL[$1]=$2; ROW_CONNS[$1]=$3; ROW_PROC[$1]=$7; ROW_PORT[$1]=${10}; ROW_PATH[$1]=${11}
    ROW_HDR[$1]=${12:-}; ROW_CLIENT[$1]=wrk; ROW_TWPORT[$1]=$PORT_UP; ROW_SCHEME[$1]=http
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\twrk\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" >>"$RES/rows.tsv"
}
# HTTPS rows: h2load, HTTP/2 over TLS, H2_CONNS connections x H2_STREAMS concurrent streams.
H2_CONNS=16
H2_STREAMS=8
add_h2_row() { # ID LABEL DIRECT_REF NGINX_REF SERVER GROUP PORT PATH TIME_WAIT_PORT
    ROW_LABEL[$1]=$2; ROW_CONNS[$1]="${H2_CONNS}×${H2_STREAMS}"; ROW_PROC[$1]=$5; ROW_PORT[$1]=$7
    ROW_PATH[$1]=$8; ROW_HDR[$1]=""; ROW_CLIENT[$1]=h2load; ROW_TWPORT[$1]=$9
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\th2load\n' "$1" "$2" "${ROW_CONNS[$1]}" rps "$3" "$4" "$5" 200 "$6" >>"$RES/rows.tsv"
}

run_row() { # ID REP SECONDS
    local id=$1 rep=$2 secs=$3 proc=${ROW_PROC[$1]} client=${ROW_CLIENT[$1]}
    local out="$RES/runs/$1.$2" raw="$RES/runs/$1.$2.${ROW_CLIENT[$1]}"
    local hdr=() cmd=() tw0 tw1 c0 c1 t0 t1 a0 a1 k0 k1 m0 m1 u0 u1 i0 i1
    [[ -n ${ROW_HDR[$id]} ]] && hdr=(-H "${ROW_HDR[$id]}")
    if [[ $client == h2load ]]; then
        # HTTP/2 over TLS (h2 by ALPN); h2load does not verify the certificate.
        cmd=(h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$secs" "https://127.0.0.1:${ROW_PORT[$id]}${ROW_PATH[$id]}")
    else
        cmd=(wrk -t1 -c"${ROW_CONNS[$id]}" -d"${secs}s" --latency "${hdr[@]}"
            "${ROW_SCHEME[$id]}://127.0.0.1:${ROW_PORT[$id]}${ROW_PATH[$id]}")
    fi
    if ! alive "$proc"; then
        printf 'server %s is not running\n' "$proc" >"$raw"
        return 0
    fi
    tw0=$(time_wait "${ROW_TWPORT[$id]}"); c0=$(cpu_ticks "$proc"); a0=$(all_server_ticks); k0=$(child_ticks); m0=$(machine_ticks)
    u0=$(cpu_ticks up); i0=$(idle_ticks)
    t0=$(date +%s%N)
    timeout --kill-after=5 $((secs + 30)) "${cmd[@]}" >"$raw" 2>&1 \
        || note "$client exited with an error on '${ROW_LABEL[$id]}' (run $rep): $(tail -n 1 "$raw")"
    t1=$(date +%s%N); m1=$(machine_ticks); k1=$(child_ticks); a1=$(all_server_ticks); c1=$(cpu_ticks "$proc")
    u1=$(cpu_ticks up); i1=$(idle_ticks)
    tw1=$(time_wait "${ROW_TWPORT[$id]}")
    # up: the upstream nginx's CPU % (what a proxy costs its neighbour); idle: the machine's
    # idle time in % of all its cores.
    printf 'tw=%s cpu=%s other=%s rss=%s up=%s idle=%s\n' $((tw1 > tw0 ? tw1 - tw0 : 0)) \
        "$(pct $((c1 - c0)) $((t1 - t0)))" "$(pct $(((m1 - m0) - (a1 - a0) - (k1 - k0))) $((t1 - t0)))" \
        "$(rss_kib "$proc")" "$(pct $((u1 - u0)) $((t1 - t0)))" "$(pct $((i1 - i0)) $((t1 - t0)) "$(nproc)")" \
        >"$out.extra"
    if ! alive "$proc"; then
        note "server $proc ($proc) DIED during '${ROW_LABEL[$id]}' run $rep; last log lines: $(tail -n 5 "$WORK/$proc/stderr.log" | tr '\n' ' ')"
    fi
    if [[ $rep -gt 0 ]]; then
        if [[ $client == h2load ]]; then
            say "  ${ROW_LABEL[$id]} [h2 ${ROW_CONNS[$id]}] run $rep: $(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1 req\/s/p' "$raw")"
        else
            say "  ${ROW_LABEL[$id]} [${ROW_CONNS[$id]}c] run $rep: $(awk '/Requests\/sec/ {print $2 " req/s"}' "$raw")"
        fi
    fi
}

measure() { # ROW_IDS... : one warm-up each, then REPS interleaved rounds
    local id rep
    for id in "$@"; do run_row "$id" 0 "$WARMUP"; done
    for ((rep = 1; rep <= REPS; rep++)); do
        for id in "$@"; do run_row "$id" "$rep" "$DURATION"; done
    done
}

# ---------------------------------------------------------------------------------- setup
read -r PORT_UP PORT_NGX1 PORT_NGX2 PORT_N503 PORT_INT1 PORT_INT2 PORT_HELD PORT_BARE PORT_NGXH <<<"$(free_ports 9)"

# Upstream bodies: exactly 100 bytes for `/`, static files for the body rows.
BODY100=$(printf 'intermission load harness: the upstream answer, 100 bytes with padding %029d' 0)
[[ ${#BODY100} -eq 100 ]] || die "internal: upstream body is ${#BODY100} bytes"
head -c 1024 /dev/zero | tr '\0' 'k' >"$WORK/www/b1k"
head -c 65536 /dev/zero | tr '\0' 'm' >"$WORK/www/b64k"
head -c 1048576 /dev/zero | tr '\0' 'g' >"$WORK/www/b1m"
chmod 644 "$WORK"/www/*

say "temporary directory $WORK; open-file limit $NOFILE; connection limit $CONN_LIMIT"
nginx_conf up 1 "    server {
        listen 127.0.0.1:$PORT_UP backlog=4096;
        location = / { default_type text/plain; return 200 \"$BODY100\"; }
        location ~ ^/b(1k|64k|1m)\$ { root $WORK/www; }
        # What a proxy forwarded, for the like-for-like check below: the head's length and
        # the forwarding headers' values.
        location = /head { default_type text/plain; return 200 \"\$request_length|\$http_host|\$http_x_forwarded_for|\$http_x_forwarded_proto|\$http_x_forwarded_host|\$http_x_real_ip\"; }
    }"
start_nginx up "$PORT_UP"

intermission_conf int1 "$PORT_INT1" 1
intermission_conf int2 "$PORT_INT2" 2
intermission_conf held "$PORT_HELD" 1
start_intermission int1 "$PORT_INT1"
start_intermission int2 "$PORT_INT2"
start_intermission held "$PORT_HELD"
BARE=0
if [[ -x $BARE_BIN ]]; then
    mkdir -p "$WORK/bare"
    start_server bare "$PORT_BARE" "$WORK/bare/stderr.log" "$BARE_BIN" "127.0.0.1:$PORT_BARE" "127.0.0.1:$PORT_UP"
    BARE=1
else
    note "no ceiling row: $BARE_BIN not found (build it with cargo build --release --example bare_relay, or drop --no-build)"
fi
HOLD_MESSAGE="We are upgrading our database. Orders placed before 09:00 are safe. Back in about 45 minutes."
timeout 20 python3 "$LOAD_DIR/control.py" "$WORK/held/control.sock" on --message "$HOLD_MESSAGE" >"$WORK/held/on.json" \
    || die "could not switch maintenance on through $WORK/held/control.sock: $(cat "$WORK/held/on.json")"
HELD_PROBE=$(expect_probe "intermission held page" "$PORT_HELD" / 503 - "Accept: text/html")
HELD_BODY=$(json_field "$HELD_PROBE" '["body_bytes"]')
[[ $(json_field "$HELD_PROBE" '["headers"].get("x-intermission-mode")') == maintenance ]] \
    || die "intermission held: not a maintenance response: $HELD_PROBE"
[[ $(json_field "$HELD_PROBE" '["headers"].get("content-type","")') == text/html* ]] \
    || die "intermission held: Accept: text/html did not get the HTML page: $HELD_PROBE"

# nginx's 503 page: HTML of the same size as intermission's page (2 KB when that is far off).
N503_SIZE=$HELD_BODY
((N503_SIZE >= 1024 && N503_SIZE <= 16384)) || N503_SIZE=2048
python3 - "$N503_SIZE" >"$WORK/n503.html" <<'EOF'
import sys
size = int(sys.argv[1])
page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Down for maintenance</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'></head><body><main>"
        "<h1>We will be back soon</h1><p>We are upgrading our database. Orders placed before 09:00 are "
        "safe. Back in about 45 minutes.</p></main></body></html>")
pad = size - len(page) - len("<!---->\n")
if pad < 0:
    sys.exit("page template larger than the target size")
sys.stdout.write(page[:-len("</body></html>")] + "<!--" + "x" * pad + "-->" + "</body></html>\n")
EOF
[[ $(wc -c <"$WORK/n503.html") -eq $N503_SIZE ]] || die "internal: nginx 503 page is not $N503_SIZE bytes"
N503_STRING=$(cat "$WORK/n503.html")
nginx_conf n503 1 "    server {
        listen 127.0.0.1:$PORT_N503 backlog=4096;
        location / {
            default_type text/html;
            add_header Retry-After 300 always;
            add_header Cache-Control no-store always;
            return 503 \"$N503_STRING
\";
        }
    }"
PROXY_BLOCK='
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream large bodies through memory buffers, as intermission does, never via disk.
            proxy_max_temp_file_size 0;
        }'
nginx_conf ngx1 1 "    upstream app { server 127.0.0.1:$PORT_UP; keepalive 128; }
    server {
        listen 127.0.0.1:$PORT_NGX1 backlog=4096;$PROXY_BLOCK
    }"
nginx_conf ngx2 2 "    upstream app { server 127.0.0.1:$PORT_UP; keepalive 128; }
    server {
        listen 127.0.0.1:$PORT_NGX2 backlog=4096;$PROXY_BLOCK
    }"
# ngx1 sends the upstream `Host: app` alone; intermission sends the client's `Host` and the
# forwarding headers SPEC and README promise, which cost the upstream some 40 % more
# instructions to parse (docs/performance-history.md, helper-222). ngxh is ngx1 made to
# forward the same: a like-for-like row beside the headline's plain nginx. `$http_host` is
# the client's Host as sent, port included, as intermission forwards it (`$host` drops the
# port). In the location: a location with a proxy_set_header of its own inherits none from
# the server block.
PROXY_BLOCK_H=${PROXY_BLOCK/'proxy_set_header Connection "";'/'proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;'}
[[ $PROXY_BLOCK_H != "$PROXY_BLOCK" ]] || die "internal: no forwarding headers in ngxh's proxy block"
nginx_conf ngxh 1 "    upstream app { server 127.0.0.1:$PORT_UP; keepalive 128; }
    server {
        listen 127.0.0.1:$PORT_NGXH backlog=4096;$PROXY_BLOCK_H
    }"
start_nginx ngx1 "$PORT_NGX1"
start_nginx ngxh "$PORT_NGXH"
start_nginx ngx2 "$PORT_NGX2"
start_nginx n503 "$PORT_N503"

# HTTPS: a self-signed P-256 certificate made now, shared by the TLS upstream (direct row), nginx
# terminating TLS (1 worker, proxying to `up` over plain HTTP with keepalive, as ngx1) and
# intermission terminating TLS (threads=1, forwarding to `up` as int1).
read -r PORT_UPT PORT_NGXT PORT_INTT <<<"$(free_ports 3)"
mkdir -p "$WORK/tls"
TLS_CERT="$WORK/tls/cert.pem"
TLS_KEY="$WORK/tls/key.pem"
timeout 30 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$TLS_KEY" -out "$TLS_CERT" >"$WORK/tls/openssl.log" 2>&1 \
    || { cat "$WORK/tls/openssl.log" >&2; die "openssl could not make the test certificate"; }
timeout 10 openssl x509 -in "$TLS_CERT" -noout -text 2>/dev/null | grep -q 'prime256v1' \
    || die "the test certificate is not P-256 ($TLS_CERT)"
chmod 644 "$TLS_CERT"
chmod 600 "$TLS_KEY"
# nginx 1.25.1 replaced `listen ... http2` by the `http2` directive.
NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if printf '%s\n' 1.25.1 "${NGINX_VERSION:-0}" | sort -V -C; then
    TLS_LISTEN="ssl"; HTTP2_LINE="
        http2 on;"
else
    TLS_LISTEN="ssl http2"; HTTP2_LINE=""
fi
TLS_BLOCK="
        ssl_certificate $TLS_CERT;
        ssl_certificate_key $TLS_KEY;
        ssl_protocols TLSv1.2 TLSv1.3;$HTTP2_LINE"
nginx_conf upt 1 "    server {
        listen 127.0.0.1:$PORT_UPT $TLS_LISTEN backlog=4096;$TLS_BLOCK
        location = / { default_type text/plain; return 200 \"$BODY100\"; }
    }"
nginx_conf ngxt 1 "    upstream app { server 127.0.0.1:$PORT_UP; keepalive 128; }
    server {
        listen 127.0.0.1:$PORT_NGXT $TLS_LISTEN backlog=4096;$TLS_BLOCK$PROXY_BLOCK
    }"
start_nginx upt "$PORT_UPT"
start_nginx ngxt "$PORT_NGXT"
intermission_conf intt "$PORT_INTT" 1 tls
start_intermission intt "$PORT_INTT"

# An `https://` upstream: a TLS upstream speaking HTTP/1.1 only (as `upt`, without h2), behind
# nginx (1 worker, keepalive 128, TLS sessions reused, as its defaults do) and intermission
# (threads=1, the certificate trusted by `ca_file`), both listening in plain HTTP: what
# forwarding to an application that terminates TLS itself costs each. HTTP/1.1 on both legs,
# since nginx speaks nothing else to a server (intermission would choose h2 by ALPN).
read -r PORT_UPS PORT_NGXS PORT_INTS <<<"$(free_ports 3)"
nginx_conf ups 1 "    server {
        listen 127.0.0.1:$PORT_UPS ssl backlog=4096;$(sed 's/^ *http2 on;$//' <<<"$TLS_BLOCK")
        location = / { default_type text/plain; return 200 \"$BODY100\"; }
    }"
nginx_conf ngxs 1 "    upstream app { server 127.0.0.1:$PORT_UPS; keepalive 128; }
    server {
        listen 127.0.0.1:$PORT_NGXS backlog=4096;${PROXY_BLOCK/http:\/\/app/https://app}
    }"
start_nginx ups "$PORT_UPS"
start_nginx ngxs "$PORT_NGXS"
UPSTREAM_URL="https://127.0.0.1:$PORT_UPS" UPSTREAM_CA="$TLS_CERT" intermission_conf ints "$PORT_INTS" 1
start_intermission ints "$PORT_INTS"

say "checking every row answers as expected"
UP_PROBE=$(expect_probe "upstream" "$PORT_UP" / 200 100)
for s in NGX1 NGXH NGX2 INT1 INT2 NGXS INTS; do
    port_var="PORT_$s"
    expect_probe "$s" "${!port_var}" / 200 100 >/dev/null
done
((BARE)) && expect_probe "bare relay" "$PORT_BARE" / 200 100 >/dev/null
for b in 1k:1024 64k:65536 1m:1048576; do
    for s in UP NGX1 INT1; do
        port_var="PORT_$s"
        expect_probe "$s /b${b%%:*}" "${!port_var}" "/b${b%%:*}" 200 "${b#*:}" >/dev/null
    done
done
N503_PROBE=$(expect_probe "nginx 503" "$PORT_N503" / 503 "$N503_SIZE" "Accept: text/html")
HELD_PROBE=$(expect_probe "intermission held page" "$PORT_HELD" / 503 - "Accept: text/html")
[[ -n $(json_field "$N503_PROBE" '["headers"].get("retry-after","")') ]] || die "nginx 503 has no Retry-After"
[[ -n $(json_field "$HELD_PROBE" '["headers"].get("retry-after","")') ]] || die "intermission held has no Retry-After"

# What each forwarding row's proxy writes to the upstream for wrk's request (`GET /` with
# `Host` alone), read back from the upstream's /head: the head's length (/head's request line
# is 4 bytes longer than /'s: taken off) and the forwarding headers' values. ngxh must carry
# the same ones as intermission, or its row is no like-for-like comparison.
FWD_NAMES=(Host X-Forwarded-For X-Forwarded-Proto X-Forwarded-Host X-Real-IP)
forwarded_head() { # WHAT PORT -> "N B (Host: ..., X-Forwarded-For: ..., ...)"
    local body="$WORK/head-$2.txt" fields i text="" bytes
    timeout 20 python3 "$LOAD_DIR/probe.py" "$2" /head --wait 5 --body-out "$body" >/dev/null \
        || die "$1: no answer on 127.0.0.1:$2/head"
    IFS='|' read -r -a fields <"$body" || true
    bytes=${fields[0]:-}
    [[ $bytes =~ ^[0-9]+$ ]] || die "$1: the upstream's /head answered '$(head -c 200 "$body")'"
    for ((i = 0; i < ${#FWD_NAMES[@]}; i++)); do
        if [[ -n ${fields[i + 1]:-} ]]; then text+="${text:+, }${FWD_NAMES[i]}: ${fields[i + 1]}"; fi
    done
    printf '%s B (%s)' $((bytes - 4)) "$text"
}
fwd_names() { sed 's/^[^(]*(//; s/)$//; s/: [^,]*//g' <<<"$1"; }
HEAD_UP=$(forwarded_head "upstream" "$PORT_UP")
HEAD_NGX1=$(forwarded_head "nginx proxy" "$PORT_NGX1")
HEAD_NGXH=$(forwarded_head "nginx proxy with the forwarding headers" "$PORT_NGXH")
HEAD_INT1=$(forwarded_head "intermission proxy" "$PORT_INT1")
[[ $(fwd_names "$HEAD_NGXH") == "$(fwd_names "$HEAD_INT1")" ]] \
    || note "nginx with the forwarding headers (ngxh) and intermission forward different headers: ngxh $HEAD_NGXH; intermission $HEAD_INT1"

# One h2 request over TLS: a 2xx with the upstream's 100-byte body, h2 chosen by ALPN.
# Prints "protocol, cipher, key exchange, ALPN" as h2load saw them.
expect_h2() { # WHAT PORT
    local out tls
    out=$(timeout 20 h2load -n1 -c1 -m1 "https://127.0.0.1:$2/" 2>&1) \
        || die "$1: h2load failed against https://127.0.0.1:$2/: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
    grep -q '^Application protocol: h2$' <<<"$out" \
        || die "$1: https://127.0.0.1:$2/ did not negotiate h2 by ALPN: $(grep -iE 'protocol|error|fail' <<<"$out" | tr '\n' ' ')"
    grep -qE '^status codes: 1 2xx' <<<"$out" \
        || die "$1: https://127.0.0.1:$2/ did not answer 2xx: $(grep -E '^(status codes|requests):' <<<"$out" | tr '\n' ' ')"
    [[ $(sed -n 's/.*B (\([0-9]*\)) data$/\1/p' <<<"$out") == 100 ]] \
        || die "$1: https://127.0.0.1:$2/ did not send the 100-byte body: $(grep '^traffic:' <<<"$out")"
    tls=$(awk -F': ' '/^TLS Protocol:/ {p = $2} /^Cipher:/ {c = $2} /^Server Temp Key:/ {k = $2}
        /^Application protocol:/ {a = $2} END {printf "%s, %s, %s, ALPN %s", p, c, k, a}' <<<"$out")
    printf '%s' "$tls"
}
TLS_UPT=$(expect_h2 "TLS upstream" "$PORT_UPT")
TLS_NGXT=$(expect_h2 "nginx TLS proxy" "$PORT_NGXT")
TLS_INTT=$(expect_h2 "intermission TLS" "$PORT_INTT")
[[ $TLS_NGXT == "$TLS_INTT" ]] \
    || note "nginx and intermission negotiated different TLS parameters (h2load): nginx $TLS_NGXT; intermission $TLS_INTT"

record_rss idle up ngx1 ngxh ngx2 n503 int1 int2 held upt ngxt intt ups ngxs ints

size_text() { # PROBE_JSON
    printf '%s B (head %s + body %s)' "$(json_field "$1" '["total_bytes"]')" \
        "$(json_field "$1" '["head_bytes"]')" "$(json_field "$1" '["body_bytes"]')"
}

# ---------------------------------------------------------------------------------- meta
{
    printf 'command\t%s\n' "$COMMAND_LINE"
    printf 'date\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'nproc\t%s\n' "$(nproc)"
    printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || echo unknown)"
    printf 'kernel\tLinux %s\n' "$(uname -r)"
    printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/^nginx version: //')"
    printf 'wrk\t%s\n' "$(wrk -v 2>&1 | head -n 1 | sed 's/ *Copyright.*//' || true)"
    printf 'h2load\t%s\n' "$(h2load --version 2>&1 | head -n 1 || true)"
    printf 'rustc\t%s\n' "$(rustc --version 2>/dev/null || echo 'rustc not found')"
    printf 'python\t%s\n' "$(python3 -c 'import platform; print(platform.python_version())')"
    commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null || true) ]]; then
        commit="$commit + uncommitted changes"
    fi
    printf 'commit\t%s\n' "$commit"
    printf 'reps\t%s\nduration\t%s\nwarmup\t%s\n' "$REPS" "$DURATION" "$WARMUP"
    printf 'nofile\t%s\nconn_limit\t%s\nidle_conns\t%s\n' "$NOFILE" "$CONN_LIMIT" "$IDLE"
    printf 'size_up\t%s\n' "$(size_text "$UP_PROBE")"
    printf 'size_n503\t%s\n' "$(size_text "$N503_PROBE")"
    printf 'size_held\t%s\n' "$(size_text "$HELD_PROBE")"
    printf 'head_up\t%s\n' "$HEAD_UP"
    printf 'head_ngx1\t%s\n' "$HEAD_NGX1"
    printf 'head_ngxh\t%s\n' "$HEAD_NGXH"
    printf 'head_int1\t%s\n' "$HEAD_INT1"
    printf 'h2load_cmd\th2load -t1 -c%s -m%s -D %s https://127.0.0.1:PORT/\n' "$H2_CONNS" "$H2_STREAMS" "$DURATION"
    printf 'tls_cert\t%s\n' "self-signed P-256 (prime256v1), CN=localhost, SAN DNS:localhost + IP:127.0.0.1, made at run time by openssl req -x509 -newkey ec"
    printf 'tls_nginx\t%s\n' "listen ... $TLS_LISTEN, ssl_protocols TLSv1.2 TLSv1.3, other ssl_* settings default"
    printf 'tls_upt\t%s\n' "$TLS_UPT"
    printf 'tls_ngxt\t%s\n' "$TLS_NGXT"
    printf 'tls_intt\t%s\n' "$TLS_INTT"
} >"$RES/meta.tsv"

# ---------------------------------------------------------------------------------- run
HTML="Accept: text/html"
# ID LABEL CONNS METRIC DIRECT_REF NGINX_REF SERVER EXPECT GROUP PORT PATH [HEADER]
add_row direct "direct to upstream (the limit)" 64 rps direct "" up 200 main "$PORT_UP" /
add_row ngx1 "nginx proxy, 1 worker" 64 rps direct ngx1 ngx1 200 main "$PORT_NGX1" /
# Like-for-like, informational: the issue's target stays against ngx1 (report.py prints
# intermission's ratio to both).
add_row ngxh "nginx proxy, 1 worker, forwarding the same headers as intermission" 64 rps direct ngxh ngxh 200 main "$PORT_NGXH" /
add_row int1 "intermission proxy, threads=1" 64 rps direct ngx1 int1 200 main "$PORT_INT1" /
add_row n503 "nginx \`return 503\`, HTML + Retry-After" 64 rps direct n503 n503 503 main "$PORT_N503" / "$HTML"
add_row held "intermission held (maintenance page)" 64 rps direct n503 held 503 main "$PORT_HELD" / "$HTML"
add_row ngx2 "nginx proxy, 2 workers" 64 rps direct ngx2 ngx2 200 main "$PORT_NGX2" /
add_row int2 "intermission proxy, threads=2" 64 rps direct ngx2 int2 200 main "$PORT_INT2" /
MAIN_ROWS=(direct ngx1 ngxh int1 n503 held ngx2 int2)
if ((BARE)); then
    add_row bare "bare relay: the ceiling (no features)" 64 rps direct ngx1 bare 200 main "$PORT_BARE" /
    MAIN_ROWS=(direct ngx1 ngxh int1 bare n503 held ngx2 int2)
fi

SCALE_ROWS=()
bodies=(1k 64k)
((QUICK)) || bodies+=(1m)
for b in "${bodies[@]}"; do
    add_row "direct_$b" "direct, $b body" 64 mibps "direct_$b" "" up 200 scale "$PORT_UP" "/b$b"
    add_row "ngx1_$b" "nginx 1 worker, $b body" 64 mibps "direct_$b" "ngx1_$b" ngx1 200 scale "$PORT_NGX1" "/b$b"
    add_row "int1_$b" "intermission threads=1, $b body" 64 mibps "direct_$b" "ngx1_$b" int1 200 scale "$PORT_INT1" "/b$b"
    SCALE_ROWS+=("direct_$b" "ngx1_$b" "int1_$b")
done
if ((!QUICK)); then
    add_row direct_c1024 "direct to upstream" 1024 rps direct_c1024 "" up 200 scale "$PORT_UP" /
    add_row ngx1_c1024 "nginx proxy, 1 worker" 1024 rps direct_c1024 ngx1_c1024 ngx1 200 scale "$PORT_NGX1" /
    add_row int1_c1024 "intermission proxy, threads=1" 1024 rps direct_c1024 ngx1_c1024 int1 200 scale "$PORT_INT1" /
    SCALE_ROWS+=(direct_c1024 ngx1_c1024 int1_c1024)
fi

say "forwarding and holding rows: ${#MAIN_ROWS[@]} rows x ($REPS x ${DURATION}s + ${WARMUP}s warm-up)"
measure "${MAIN_ROWS[@]}"
record_rss after_main up ngx1 ngxh ngx2 n503 int1 int2 held

say "scaling rows: ${#SCALE_ROWS[@]} rows"
measure "${SCALE_ROWS[@]}"
record_rss after_scale up ngx1 int1

# HTTPS: h2 over TLS with h2load, against the TLS upstream, nginx and intermission.
add_h2_row direct_tls "direct to TLS upstream, h2 (the limit)" direct_tls "" upt https "$PORT_UPT" / "$PORT_UPT"
add_h2_row ngxt "nginx TLS proxy, 1 worker, h2" direct_tls ngxt ngxt https "$PORT_NGXT" / "$PORT_UP"
add_h2_row intt "intermission TLS, threads=1, h2" direct_tls ngxt intt https "$PORT_INTT" / "$PORT_UP"
# HTTP/1.1 over TLS with wrk (which offers no ALPN), against the same three servers.
add_row direct_tls1 "direct to TLS upstream, HTTP/1.1 (the limit)" 64 rps direct_tls1 "" upt 200 https "$PORT_UPT" /
add_row ngxt1 "nginx TLS proxy, 1 worker, HTTP/1.1" 64 rps direct_tls1 ngxt1 ngxt 200 https "$PORT_NGXT" /
add_row intt1 "intermission TLS, threads=1, HTTP/1.1" 64 rps direct_tls1 ngxt1 intt 200 https "$PORT_INTT" /
ROW_SCHEME[direct_tls1]=https; ROW_SCHEME[ngxt1]=https; ROW_SCHEME[intt1]=https
ROW_TWPORT[direct_tls1]=$PORT_UPT
TLS_ROWS=(direct_tls ngxt intt direct_tls1 ngxt1 intt1)
say "HTTPS rows (h2load, then wrk, over TLS): ${#TLS_ROWS[@]} rows x ($REPS x ${DURATION}s + ${WARMUP}s warm-up)"
measure "${TLS_ROWS[@]}"
record_rss after_https upt ngxt intt

# Forwarding to an `https://` upstream (HTTP/1.1 over TLS on the upstream leg only).
add_row ngxs "nginx proxy to an https:// upstream, 1 worker" 64 rps "" ngxs ngxs 200 upstreams "$PORT_NGXS" /
add_row ints "intermission proxy to an https:// upstream, threads=1" 64 rps "" ngxs ints 200 upstreams "$PORT_INTS" /
ROW_TWPORT[ngxs]=$PORT_UPS; ROW_TWPORT[ints]=$PORT_UPS
UPS_ROWS=(ngxs ints)
say "https:// upstream rows: ${#UPS_ROWS[@]} rows x ($REPS x ${DURATION}s + ${WARMUP}s warm-up)"
measure "${UPS_ROWS[@]}"
record_rss after_upstreams ups ngxs ints

# Memory: idle keep-alive connections held open against each proxy (1 worker / 1 thread).
mem_test() { # LABEL SERVER PORT
    local label=$1 server=$2 port=$3 out="$WORK/idle-$2.txt" pid before with after i ready closing
    alive "$server" || { note "memory test skipped for $label: not running"; return 0; }
    before=$(rss_kib "$server")
    timeout --kill-after=5 300 python3 "$LOAD_DIR/idle_conns.py" "$port" -n "$IDLE" --max-time 240 >"$out" 2>"$out.err" &
    pid=$!
    ALL_PIDS+=("$pid")
    for ((i = 0; i < 2400; i++)); do
        grep -q '^READY' "$out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    with=$(rss_kib "$server")
    # `timeout` passes SIGTERM on to the client, which then reports and closes.
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    sleep 1
    after=$(rss_kib "$server")
    ready=$(grep '^READY' "$out" || echo "client did not get ready: $(head -c 300 "$out.err" | tr '\n' ' ')")
    closing=$(grep '^CLOSING' "$out" || true)
    [[ -s $out.err ]] && note "idle client against $label said: $(head -n 3 "$out.err" | tr '\n' ' ')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$before" "$with" "$after" "$ready" "$closing" >>"$RES/mem.tsv"
    say "  memory $label: $before -> $with KiB with the connections ($ready $closing)"
    alive "$server" || note "server $server DIED during the memory test; last log lines: $(tail -n 5 "$WORK/$server/stderr.log" | tr '\n' ' ')"
}
# Fresh servers (same configs as ngx1 and int1), so that what earlier rows left in the heap
# does not count; stopped right after.
stop_server() { # NAME
    local pid=${SPID[$1]} i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    unset "SPID[$1]"
}
say "memory: $IDLE idle keep-alive connections, against fresh servers"
read -r PORT_NGXM PORT_INTM <<<"$(free_ports 2)"
nginx_conf ngxm 1 "    upstream app { server 127.0.0.1:$PORT_UP; keepalive 128; }
    server {
        listen 127.0.0.1:$PORT_NGXM backlog=4096;$PROXY_BLOCK
    }"
start_nginx ngxm "$PORT_NGXM"
intermission_conf intm "$PORT_INTM" 1
start_intermission intm "$PORT_INTM"
expect_probe "ngxm" "$PORT_NGXM" / 200 100 >/dev/null
expect_probe "intm" "$PORT_INTM" / 200 100 >/dev/null
sleep 1
mem_test "nginx proxy, 1 worker" ngxm "$PORT_NGXM"
stop_server ngxm
mem_test "intermission proxy, threads=1" intm "$PORT_INTM"
stop_server intm

# Toggle under load: maintenance on and off 10 times a second on int1 while wrk runs.
say "toggle under load: ${TOGGLE_SECS}s, on/off 10 times a second"
if alive int1; then
    timeout --kill-after=5 $((TOGGLE_SECS + 30)) python3 "$LOAD_DIR/control.py" "$WORK/int1/control.sock" \
        toggle --hz 10 --duration "$TOGGLE_SECS" >"$WORK/toggle-ctl.txt" 2>&1 &
    tpid=$!
    ALL_PIDS+=("$tpid")
    timeout --kill-after=5 $((TOGGLE_SECS + 30)) wrk -t1 -c64 -d"${TOGGLE_SECS}s" --latency -s "$LOAD_DIR/count.lua" \
        "http://127.0.0.1:$PORT_INT1/" -- 100 >"$WORK/toggle-wrk.txt" 2>&1 || note "wrk failed in the toggle test: $(tail -n 2 "$WORK/toggle-wrk.txt" | tr '\n' ' ')"
    wait "$tpid" 2>/dev/null || true
    count=$(grep '^COUNT' "$WORK/toggle-wrk.txt" || echo "COUNT missing")
    tline=$(grep '^TOGGLE' "$WORK/toggle-ctl.txt" || echo "TOGGLE missing: $(tail -n 2 "$WORK/toggle-ctl.txt" | tr '\n' ' ')")
    sockerr=$(grep 'Socket errors' "$WORK/toggle-wrk.txt" | sed 's/^ *//' || true)
    reqs=$(grep -E '^ +[0-9]+ requests in' "$WORK/toggle-wrk.txt" | sed 's/^ *//' || true)
    unexpected=$(sed -n 's/.*unexpected=\([0-9]*\).*/\1/p' <<<"$count")
    ctlerr=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$tline")
    nsock=$(awk '/Socket errors/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i} END {print s + 0}' "$WORK/toggle-wrk.txt")
    verdict="PASS"
    [[ ${unexpected:-x} == 0 && ${ctlerr:-x} == 0 && $nsock == 0 ]] || verdict="FAIL"
    {
        printf 'wrk -t1 -c64 -d%ss against intermission threads=1: %s\n' "$TOGGLE_SECS" "${reqs:-no summary}"
        printf 'socket errors: %s\n' "${sockerr:-none}"
        printf 'responses: %s\n' "$count"
        printf 'control: %s\n' "$tline"
        printf 'state file after the test: %s bytes\n' "$(wc -c <"$WORK/int1/state.json" 2>/dev/null || echo '?')"
        printf '%s: socket errors %s, unexpected responses %s, control errors %s (all must be 0)\n' \
            "$verdict" "$nsock" "${unexpected:-?}" "${ctlerr:-?}"
    } >"$RES/toggle.txt"
    say "  toggle: $verdict"
    alive int1 || note "intermission int1 DIED during the toggle test; last log lines: $(tail -n 5 "$WORK/int1/stderr.log" | tr '\n' ' ')"
else
    note "toggle test skipped: intermission int1 is not running"
fi

# What the servers logged (intermission at warn, nginx at crit).
# A mode change is logged once at warn by design: counted, not quoted.
for s in int1 int2 held intm intt; do
    modes=$(grep -c 'state::controller: mode ' "$WORK/$s/stderr.log" || true)
    others=$(grep -v 'state::controller: mode ' "$WORK/$s/stderr.log" | grep -c . || true)
    ((${modes:-0} == 0)) || note "intermission $s logged ${modes} mode-change lines (one per switch, expected)"
    ((${others:-0} == 0)) || note "intermission $s logged $others other lines, first: $(grep -v 'state::controller: mode ' "$WORK/$s/stderr.log" | head -n 3 | cut -c1-300 | tr '\n' ' ')"
done
for s in up ngx1 ngxh ngx2 n503 ngxm upt ngxt; do
    if [[ -s $WORK/$s/error.log ]]; then
        note "nginx $s error.log: $(head -n 3 "$WORK/$s/error.log" | cut -c1-300 | tr '\n' ' ')"
    fi
done

# ---------------------------------------------------------------------------------- report
if [[ -n $OUT ]]; then
    python3 "$LOAD_DIR/report.py" "$RES" | tee "$OUT"
else
    python3 "$LOAD_DIR/report.py" "$RES"
fi

#!/usr/bin/env python3
"""Memory a proxy holds per client that asks for a large body and never reads it.

    python3 benches/load/stalled_clients.py --bin target/release/intermission
    python3 benches/load/stalled_clients.py --bin A --bin B --nginx --reps 3 -n 500

Starts an upstream nginx serving a static body (16 MiB by default: a smaller one fits whole
in the loopback sockets' buffers, and nothing stalls in the proxy) on 127.0.0.1, then, for each
proxy (every --bin, an intermission release binary, and with --nginx an nginx reverse proxy
configured as benches/load.sh configures it) and each protocol (HTTP/1.1, and HTTP/2 with prior
knowledge in cleartext), starts the proxy, warms it with a few whole downloads, opens N client
connections that each send one GET for the body and then never read, waits until the proxy's
RSS settles, and prints the RSS it gained per stalled client. The HTTP/2 client is hand-made:
the preface, a SETTINGS with the largest INITIAL_WINDOW_SIZE, a connection WINDOW_UPDATE to
the largest window and one HEADERS (HPACK literals), so that only the server's send buffers and
the sockets limit what is sent. Proxies run one worker each. Only 127.0.0.1 is used; every
process started is stopped by its PID.
"""

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


NGINX_HTTP = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log crit;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    sendfile on;
{body}
}}
"""


def start_nginx(work, name, body):
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_HTTP.format(dir=d, body=body))
    user = "user root;\n" if os.geteuid() == 0 else ""
    if user:
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(user + text)
    return subprocess.Popen(
        ["nginx", "-p", d, "-c", conf, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(d, "stderr.log"), "w"),
    )


def start_intermission(work, name, binary, port, up_port):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "config.toml")
    with open(conf, "w") as f:
        f.write(
            f"""[proxy]
listen = ["127.0.0.1:{port}"]
threads = 1
max_connections = 5000

[upstream]
servers = ["http://127.0.0.1:{up_port}"]

[health]
interval = "5s"

[log]
access_log = false
level = "warn"

[control]
socket = "{d}/control.sock"
state_file = "{d}/state.json"
"""
        )
    return subprocess.Popen(
        [binary, "run", "-c", conf],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(d, "stderr.log"), "w"),
    )


# ------------------------------------------------------------------------------ clients


def h1_request(port, path):
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(index, value):
    # Literal header field without indexing, indexed name (RFC 7541 §6.2.2), no Huffman.
    v = value.encode()
    assert index < 15 and len(v) < 127
    return bytes([index, len(v)]) + v


def h2_open(port, path):
    """A connection that has asked for `path` on stream 1 and will read nothing more."""
    s = socket.create_connection(("127.0.0.1", port))
    biggest = (1 << 31) - 1
    settings = struct.pack(">HI", 0x4, biggest)  # SETTINGS_INITIAL_WINDOW_SIZE
    s.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(0x4, 0, 0, settings)
        + frame(0x8, 0, 0, struct.pack(">I", biggest - 65535))
    )
    # The server's SETTINGS is acknowledged, as a client must, before the request goes.
    got = b""
    while True:
        while len(got) < 9:
            more = s.recv(65536)
            if not more:
                raise RuntimeError("h2: closed before SETTINGS")
            got += more
        length = int.from_bytes(got[:3], "big")
        kind, flags = got[3], got[4]
        while len(got) < 9 + length:
            got += s.recv(65536)
        got = got[9 + length :]
        if kind == 0x4 and not flags & 0x1:
            break
    block = (
        b"\x82"  # :method GET
        + b"\x86"  # :scheme http
        + hpack_literal(4, path)
        + hpack_literal(1, f"127.0.0.1:{port}")
    )
    s.sendall(frame(0x4, 0x1, 0, b"") + frame(0x1, 0x5, 1, block))  # END_STREAM|END_HEADERS
    return s


def open_stalled(proto, port, path):
    if proto == "h2":
        return h2_open(port, path)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(h1_request(port, path))
    return s


def download(proto, port, path, size):
    """One whole download, to warm the proxy (and check that the body arrives)."""
    got = 0
    if proto == "h2":
        with h2_open(port, path) as s:
            buf, done = b"", False
            while not done:
                more = s.recv(1 << 20)
                if not more:
                    break
                buf += more
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                    if kind == 0x0:
                        got += length
                        done |= bool(flags & 0x1)
                    buf = buf[9 + length :]
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(h1_request(port, path).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            while True:
                b = s.recv(1 << 20)
                if not b:
                    break
                got += len(b)
    if got < size:
        raise RuntimeError(f"warm-up download ({proto}) got {got} bytes, wanted at least {size}")


def settle(pids, limit=60.0, quiet=1.5):
    """RSS once it has not grown by more than 0.5 % for `quiet` seconds."""
    last, since, start = rss_kib(pids), time.monotonic(), time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(0.25)
        now = rss_kib(pids)
        if now > last * 1.005:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return max(now, last)
    return rss_kib(pids)


def measure(proto, port, pids, n, batches, path, size):
    """RSS before, then after each batch of `n` stalled clients (all kept open)."""
    for _ in range(3):
        download(proto, port, path, size)
    time.sleep(0.5)
    seen = [rss_kib(pids())]
    socks = []
    try:
        for _ in range(batches):
            for _ in range(n):
                socks.append(open_stalled(proto, port, path))
            seen.append(settle(pids()))
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    return seen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", action="append", default=[], help="an intermission binary (repeatable)")
    ap.add_argument("--nginx", action="store_true", help="also measure an nginx reverse proxy")
    ap.add_argument("-n", type=int, default=500, help="stalled clients (default 500)")
    ap.add_argument("--size", type=int, default=16 << 20,
        help="body bytes (default 16 MiB: the sockets on 127.0.0.1 take a few MiB before a write waits)")
    ap.add_argument("--proto", choices=["h1", "h2", "both"], default="both")
    ap.add_argument(
        "--batches",
        type=int,
        default=1,
        help="batches of N, each measured once the one before has stalled: the later ones"
        " show what a client costs once the memory freed by those before can be reused",
    )
    ap.add_argument("--reps", type=int, default=1, help="fresh proxy per repetition")
    args = ap.parse_args()
    if not args.bin and not args.nginx:
        ap.error("nothing to measure: give --bin and/or --nginx")

    work = tempfile.mkdtemp(prefix="stalled-")
    procs = []
    try:
        with open(os.path.join(work, "big"), "wb") as f:
            f.write(os.urandom(args.size))
        # The health check's GET /.
        with open(os.path.join(work, "index.html"), "w") as f:
            f.write("ok\n")
        up_port = free_port()
        up = start_nginx(
            work,
            "up",
            f"    server {{ listen 127.0.0.1:{up_port} backlog=4096; root {work}; }}",
        )
        procs.append(up)
        wait_port(up_port, up)
        protos = ["h1", "h2"] if args.proto == "both" else [args.proto]
        subjects = [("intermission " + b, b) for b in args.bin]
        if args.nginx:
            subjects.append(("nginx", None))
        print(f"# {args.batches} x {args.n} stalled clients, body {args.size} bytes; KiB of RSS per client")
        for rep in range(args.reps):
            for label, binary in subjects:
                for proto in protos:
                    port = free_port()
                    if binary:
                        p = start_intermission(work, f"i{rep}", binary, port, up_port)
                        pids = lambda p=p: [p.pid]
                    else:
                        # As benches/load.sh's ngx1, plus HTTP/2 with prior knowledge.
                        p = start_nginx(
                            work,
                            f"n{rep}",
                            f"""    upstream app {{ server 127.0.0.1:{up_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096{' http2' if proto == 'h2' else ''};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}""",
                        )
                        pids = lambda p=p: children(p.pid)
                    procs.append(p)
                    try:
                        wait_port(port, p)
                        seen = measure(proto, port, pids, args.n, args.batches, "/big", args.size)
                        each = "  ".join(
                            f"{(b - a) / args.n:7.1f}" for a, b in zip(seen, seen[1:])
                        )
                        print(
                            f"{label:40s} {proto}  rss {seen[0] / 1024:6.1f} -> {seen[-1] / 1024:6.1f} MiB"
                            f"  KiB/client by batch: {each}",
                            flush=True,
                        )
                    finally:
                        p.send_signal(signal.SIGTERM)
                        try:
                            p.wait(10)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            p.wait()
                        procs.remove(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Hold N idle HTTP/1.1 keep-alive connections open against 127.0.0.1:PORT (bounded).

Used by benches/load.sh for the memory row: it opens N connections one after another, sends one
`GET PATH HTTP/1.1` keep-alive request on each, reads the whole response, and keeps every
connection open. Then it prints one line

    READY opened=N ok=N failed=N seconds=S nofile=LIMIT

and waits for SIGUSR1, SIGTERM or SIGINT, or at most --max-time seconds. Before closing it
checks how many connections the server has closed meanwhile and prints

    CLOSING held_seconds=S still_open=N closed_by_peer=N

then closes everything and exits 0 (1 when it could not open a single connection).

With --tls, each connection is HTTPS (HTTP/1.1 by ALPN, the certificate not verified), for
the memory an idle TLS connection costs.

Only 127.0.0.1 is ever contacted. The soft RLIMIT_NOFILE is raised up to the hard limit.
"""

import argparse
import errno
import resource
import select
import signal
import socket
import ssl
import sys
import time

HOST = "127.0.0.1"


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            print(f"idle_conns: could not raise RLIMIT_NOFILE to {target}: {e}", file=sys.stderr)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def read_response(sock):
    """Reads one response (Content-Length or chunked); returns the status code."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a chunked body")
            rest += chunk
    elif length is not None:
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            rest += chunk
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=int, help="TCP port on 127.0.0.1")
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--path", default="/")
    ap.add_argument("--max-time", type=float, default=120.0, help="hold at most this long (s)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-connection I/O timeout (s)")
    ap.add_argument("--max-failures", type=int, default=200, help="give up after this many failures")
    ap.add_argument("--tls", action="store_true", help="HTTPS (HTTP/1.1 by ALPN, not verified)")
    args = ap.parse_args()
    if not 1 <= args.connections <= 200000:
        ap.error("--connections must be between 1 and 200000")

    # Block the signals first: they are collected with sigtimedwait, never lost.
    waited = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)

    nofile = raise_nofile(args.connections + 64)
    if nofile < args.connections + 16:
        print(f"idle_conns: RLIMIT_NOFILE is {nofile}, too low for {args.connections} connections",
              file=sys.stderr)
        return 1

    request = (f"GET {args.path} HTTP/1.1\r\nHost: {HOST}:{args.port}\r\n"
               "User-Agent: intermission-load-idle\r\nConnection: keep-alive\r\n\r\n").encode()
    tls = None
    if args.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["http/1.1"])
    socks = []
    ok = failed = 0
    started = time.monotonic()
    deadline = started + args.max_time
    while len(socks) + failed < args.connections and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(args.timeout)
        try:
            s.connect((HOST, args.port))
            if tls:
                s = tls.wrap_socket(s, server_hostname="localhost")
            s.sendall(request)
            status = read_response(s)
        except (OSError, ConnectionError, ValueError, IndexError) as e:
            failed += 1
            s.close()
            if failed <= 5:
                print(f"idle_conns: connection {len(socks) + failed}: {e}", file=sys.stderr)
            if failed >= args.max_failures:
                print("idle_conns: too many failures, stopping", file=sys.stderr)
                break
            if isinstance(e, OSError) and e.errno == errno.EADDRNOTAVAIL:
                break
            continue
        socks.append(s)
        if status == 200:
            ok += 1
    opened_in = time.monotonic() - started
    print(f"READY opened={len(socks)} ok={ok} failed={failed} seconds={opened_in:.2f} nofile={nofile}",
          flush=True)

    held_from = time.monotonic()
    remaining = max(0.0, deadline - held_from)
    if socks and remaining > 0:
        signal.sigtimedwait(waited, remaining)
    held = time.monotonic() - held_from

    # A socket the server has closed is readable and reads as EOF (or fails with a reset). Over
    # TLS, where a peek cannot be made, an idle socket that became readable was closed (its
    # close_notify, or its end).
    poller = select.poll()
    by_fd = {}
    for s in socks:
        s.setblocking(False)
        poller.register(s.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        by_fd[s.fileno()] = s
    closed = 0
    for fd, _ in poller.poll(0):
        if tls:
            closed += 1
            continue
        try:
            if by_fd[fd].recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except OSError:
            closed += 1
    print(f"CLOSING held_seconds={held:.1f} still_open={len(socks) - closed} closed_by_peer={closed}",
          flush=True)
    for s in socks:
        s.close()
    return 0 if socks else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""One HTTP/1.1 request to 127.0.0.1:PORT, for benches/load.sh's sanity checks.

  probe.py PORT PATH [-H 'Name: value' ...] [--wait SECONDS] [--body-out FILE]

Prints one JSON object: status, head_bytes, body_bytes, total_bytes and a few headers
(content-type, retry-after, x-intermission-mode, connection). With --wait, retries the
connection until the port answers or the time is up. Exit 0 when a response was read.
Only 127.0.0.1 is ever contacted.
"""

import argparse
import json
import socket
import sys
import time

HOST = "127.0.0.1"
SHOWN = ("content-type", "retry-after", "x-intermission-mode", "connection", "cache-control")


def fetch(port, path, headers, timeout):
    """A keep-alive request like wrk's; the response is read by Content-Length (or chunks)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}"] + headers
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"no complete response head ({len(data)} bytes read)")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        head_lines = head.decode("latin-1").split("\r\n")
        status = int(head_lines[0].split()[1])
        found = {}
        chunked = False
        length = None
        for line in head_lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name in SHOWN:
                found[name] = value.strip()
            if name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            if name == "content-length":
                length = int(value.strip())
        while True:
            if chunked and body.endswith(b"0\r\n\r\n"):
                break
            if not chunked and length is not None and len(body) >= length:
                break
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            body += chunk
    finally:
        s.close()
    return {
        "status": status,
        "head_bytes": len(head) + 4,
        "body_bytes": len(body),
        "total_bytes": len(head) + 4 + len(body),
        "chunked": chunked,
        "headers": found,
    }, body


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=int)
    ap.add_argument("path")
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--wait", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--body-out")
    args = ap.parse_args()
    deadline = time.monotonic() + args.wait
    while True:
        try:
            result, body = fetch(args.port, args.path, args.header, args.timeout)
            break
        except (OSError, ConnectionError, ValueError, IndexError) as e:
            if time.monotonic() >= deadline:
                print(f"probe: 127.0.0.1:{args.port}{args.path}: {e}", file=sys.stderr)
                return 1
            time.sleep(0.1)
    if args.body_out:
        with open(args.body_out, "wb") as f:
            f.write(body)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

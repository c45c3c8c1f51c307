#!/usr/bin/env python3
"""Talks to intermission's control socket (one JSON object per line, AF_UNIX) for benches/load.sh.

  control.py SOCKET on --message TEXT [--until +2h]
        switch maintenance on (with an announced end); exit 1 when refused
  control.py SOCKET off | status          one command; prints the reply line
  control.py SOCKET toggle --hz 10 --duration 10 [--message TEXT]
        on, then off half a period later, HZ times a second for DURATION seconds, over one
        persistent connection (reconnecting after a failure); ends with `off` and prints

        TOGGLE cycles=N commands=N errors=N reconnects=N p50_ms=X p99_ms=X max_ms=X final=MODE

        An error is a reply with "ok": false, no reply within --timeout, or a lost connection.

No socat needed. Exit 0 when every command was accepted, 1 otherwise.
"""

import argparse
import json
import socket
import sys
import time


class Control:
    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def connect(self):
        self.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s
        self.buf = b""

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def call(self, obj):
        """Sends one request; returns the parsed reply (raises OSError/ValueError)."""
        if self.sock is None:
            self.connect()
        self.sock.sendall(json.dumps(obj).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed without a reply")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)


def one(ctl, obj):
    try:
        reply = ctl.call(obj)
    except (OSError, ValueError) as e:
        print(f"control: {obj.get('cmd')}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    if not reply.get("ok"):
        print(f"control: {obj.get('cmd')} refused: {reply.get('error')}", file=sys.stderr)
        return 1
    return 0


def percentile(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def toggle(ctl, hz, duration, message):
    period = 1.0 / hz
    errors = reconnects = commands = cycles = 0
    latencies = []
    start = time.monotonic()
    end = start + duration
    k = 0
    while True:
        for half, obj in ((0, {"cmd": "on", "message": message}), (1, {"cmd": "off"})):
            at = start + k * period + half * period / 2
            if at >= end:
                break
            now = time.monotonic()
            if at > now:
                time.sleep(at - now)
            t0 = time.monotonic()
            commands += 1
            try:
                reply = ctl.call(obj)
                if not reply.get("ok"):
                    errors += 1
                    if errors <= 5:
                        print(f"control: {obj['cmd']} refused: {reply.get('error')}", file=sys.stderr)
            except (OSError, ValueError) as e:
                errors += 1
                if errors <= 5:
                    print(f"control: {obj['cmd']}: {e}", file=sys.stderr)
                try:
                    ctl.connect()
                    reconnects += 1
                except OSError:
                    pass
            latencies.append((time.monotonic() - t0) * 1000.0)
        else:
            cycles += 1
            k += 1
            continue
        break
    final = "?"
    try:
        reply = ctl.call({"cmd": "off"})
        commands += 1
        if not reply.get("ok"):
            errors += 1
        status = ctl.call({"cmd": "status"})
        final = status.get("state", {}).get("mode", "?")
    except (OSError, ValueError) as e:
        errors += 1
        print(f"control: final off/status: {e}", file=sys.stderr)
    print(f"TOGGLE cycles={cycles} commands={commands} errors={errors} reconnects={reconnects} "
          f"p50_ms={percentile(latencies, 50):.2f} p99_ms={percentile(latencies, 99):.2f} "
          f"max_ms={max(latencies or [0.0]):.2f} final={final}", flush=True)
    return 0 if errors == 0 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("command", choices=["on", "off", "status", "toggle"])
    ap.add_argument("--message", default="Planned maintenance (load test).")
    ap.add_argument("--until", help="announced end of `on`: RFC 3339 or +DURATION")
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    if not 0 < args.hz <= 1000 or not 0 < args.duration <= 3600:
        ap.error("--hz must be in (0, 1000] and --duration in (0, 3600]")
    ctl = Control(args.socket, args.timeout)
    try:
        ctl.connect()
    except OSError as e:
        print(f"control: cannot connect to {args.socket}: {e}", file=sys.stderr)
        return 1
    try:
        if args.command == "on":
            on = {"cmd": "on", "message": args.message}
            if args.until is not None:
                on["until"] = args.until
            return one(ctl, on)
        if args.command == "toggle":
            return toggle(ctl, args.hz, args.duration, args.message)
        return one(ctl, {"cmd": args.command})
    finally:
        ctl.close()


if __name__ == "__main__":
    sys.exit(main())

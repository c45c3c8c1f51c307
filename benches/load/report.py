#!/usr/bin/env python3
"""Turns the raw results of benches/load.sh into the markdown report (stdout).

  report.py RESULTS_DIR

RESULTS_DIR holds (all written by load.sh):
  meta.tsv   key<TAB>value: date, machine, versions, settings
  rows.tsv   id<TAB>label<TAB>conns<TAB>metric<TAB>direct_ref<TAB>nginx_ref<TAB>proc<TAB>expect<TAB>group
             <TAB>client (wrk or h2load; wrk when absent)
  runs/ID.REP.wrk    wrk's output of one measured run (REP 0 is the warm-up, not counted)
  runs/ID.REP.h2load h2load's output, for the HTTPS rows (h2 over TLS)
  runs/ID.REP.extra  key=value words: tw (TIME_WAIT sockets added), cpu (proxy CPU %), other
                     (other processes' CPU %), rss (KiB), up (the upstream nginx's CPU %), idle
                     (the machine's idle time, % of all cores)
  rss.tsv    proc<TAB>phase<TAB>KiB   (phase: idle, after_<group>)
  mem.tsv    target<TAB>before<TAB>with<TAB>after_close<TAB>READY line<TAB>CLOSING line
  toggle.txt the COUNT, TOGGLE and wrk summary lines of the toggle test
  notes.txt  anything odd the harness saw, one line each
"""

import os
import re
import statistics
import sys

UNITS_TIME = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
UNITS_SIZE = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def parse_wrk(text):
    r = {"rps": None, "bps": None, "p99": None, "errors": 0, "non2xx": 0, "requests": None,
         "error_text": ""}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", text)
    if m:
        r["bps"] = float(m.group(1)) * UNITS_SIZE[m.group(2)]
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    if m:
        r["p99"] = float(m.group(1)) * UNITS_TIME[m.group(2)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["errors"] = sum(int(x) for x in m.groups())
        r["error_text"] = m.group(0).replace("Socket errors: ", "")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        r["requests"] = int(m.group(1))
    return r


def parse_h2load(text):
    """h2load prints no percentiles: the latency figures kept are the mean and the max of its
    "time for request" line (per request, i.e. per stream)."""
    r = {"rps": None, "bps": None, "p99": None, "mean": None, "max": None, "errors": 0,
         "non2xx": 0, "requests": None, "error_text": ""}
    m = re.search(r"^finished in [\d.]+m?s, ([\d.]+) req/s, ([\d.]+)([KMGT]?B)/s", text, re.M)
    if m:
        r["rps"] = float(m.group(1))
        r["bps"] = float(m.group(2)) * UNITS_SIZE[m.group(3)]
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text, re.M)
    if m:
        total, started, done, ok, failed, errored, timeout = (int(x) for x in m.groups())
        r["requests"] = done
        # h2load's "failed" already counts the errored and timed-out requests.
        r["errors"] = failed
        if failed:
            r["error_text"] = f"failed {failed} (errored {errored}, timeout {timeout})"
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if m:
        r["non2xx"] = sum(int(x) for x in m.groups()[2:])
    m = re.search(r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data", text, re.M)
    if m and r["requests"]:
        r["head_bytes"] = int(m.group(2)) / r["requests"]
    m = re.search(r"^time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)",
                  text, re.M)
    if m:
        r["max"] = float(m.group(3)) * UNITS_TIME[m.group(4)]
        r["mean"] = float(m.group(5)) * UNITS_TIME[m.group(6)]
    if r["rps"] is not None and r["requests"] == 0:
        r["rps"] = None  # connected to nothing
    return r


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def fmt_int(x):
    return "—" if x is None else f"{x:,.0f}"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.3f}"


def main():
    d = sys.argv[1]
    meta = dict((k, v) for k, v, *_ in read_tsv(os.path.join(d, "meta.tsv")))
    rows = read_tsv(os.path.join(d, "rows.tsv"))
    rss = {}
    for proc, phase, kib in read_tsv(os.path.join(d, "rss.tsv")):
        rss[(proc, phase)] = int(kib)

    # Per row: medians over the measured reps (REP >= 1).
    stats = {}
    runs_dir = os.path.join(d, "runs")
    for row in rows:
        rid = row[0]
        client = row[9] if len(row) > 9 and row[9] else "wrk"
        parse = parse_h2load if client == "h2load" else parse_wrk
        reps = []
        rep = 1
        while os.path.exists(os.path.join(runs_dir, f"{rid}.{rep}.{client}")):
            with open(os.path.join(runs_dir, f"{rid}.{rep}.{client}")) as f:
                w = parse(f.read())
            extra = {}
            path = os.path.join(runs_dir, f"{rid}.{rep}.extra")
            if os.path.exists(path):
                with open(path) as f:
                    for word in f.read().split():
                        k, _, v = word.partition("=")
                        extra[k] = v
            w["tw"] = int(extra.get("tw", "0") or 0)
            w["cpu"] = float(extra.get("cpu", "nan") or "nan")
            w["other"] = float(extra.get("other", "nan") or "nan")
            w["rss"] = int(extra["rss"]) if extra.get("rss", "").isdigit() else None
            w["up"] = float(extra.get("up", "nan") or "nan")
            w["idle"] = float(extra.get("idle", "nan") or "nan")
            reps.append(w)
            rep += 1
        ok = [w for w in reps if w["rps"] is not None]
        s = {"n": len(reps), "ok": len(ok), "client": client}
        if ok:
            rps = [w["rps"] for w in ok]
            s["rps"] = statistics.median(rps)
            s["min"], s["max"] = min(rps), max(rps)
            s["spread"] = (s["max"] - s["min"]) / s["rps"] if s["rps"] else 0
            bps = [w["bps"] for w in ok if w["bps"] is not None]
            s["mibps"] = statistics.median(bps) / 1024 ** 2 if bps else None
            p99 = [w["p99"] for w in ok if w["p99"] is not None]
            s["p99"] = statistics.median(p99) if p99 else None
            means = [w["mean"] for w in ok if w.get("mean") is not None]
            s["mean"] = statistics.median(means) if means else None
            maxes = [w["max"] for w in ok if w.get("max") is not None]
            s["lat_max"] = statistics.median(maxes) if maxes else None
            heads = [w["head_bytes"] for w in ok if w.get("head_bytes") is not None]
            s["head_bytes"] = statistics.median(heads) if heads else None
            s["errors"] = sum(w["errors"] for w in ok)
            s["error_text"] = "; ".join(w["error_text"] for w in ok if w["error_text"])
            s["non2xx"] = sum(w["non2xx"] for w in ok)
            s["requests"] = sum(w["requests"] or 0 for w in ok)
            s["tw"] = statistics.median(w["tw"] for w in ok)
            cpu = [w["cpu"] for w in ok if w["cpu"] == w["cpu"]]
            s["cpu"] = statistics.median(cpu) if cpu else None
            # CPU time per request: steadier than req/s when the cores are shared or stolen,
            # since a slower run costs the same per request.
            per_req = [w["cpu"] / 100 / w["rps"] * 1e6 for w in ok
                       if w["cpu"] == w["cpu"] and w["rps"]]
            s["us_per_req"] = statistics.median(per_req) if per_req else None
            up = [w["up"] / 100 / w["rps"] * 1e6 for w in ok if w["up"] == w["up"] and w["rps"]]
            s["up_us"] = statistics.median(up) if up else None
            idle = [w["idle"] for w in ok if w["idle"] == w["idle"]]
            s["idle"] = statistics.median(idle) if idle else None
            other = [w["other"] for w in ok if w["other"] == w["other"]]
            s["other"] = max(other) if other else None
            s["rss_after"] = ok[-1]["rss"]
        stats[rid] = s

    def value(rid, metric):
        s = stats.get(rid, {})
        return s.get("mibps") if metric == "mibps" else s.get("rps")

    out = []
    p = out.append
    p("# intermission load harness report")
    p("")
    p(f"- command: `{meta.get('command', '?')}`")
    p(f"- date: {meta.get('date', '?')}; machine: {meta.get('nproc', '?')} cores "
      f"({meta.get('cpu', '?')}), {meta.get('kernel', '?')}")
    p(f"- intermission {meta.get('commit', '?')}; {meta.get('rustc', '?')}")
    p(f"- {meta.get('nginx', '?')}; {meta.get('wrk', '?')}; {meta.get('h2load', '?')}; "
      f"Python {meta.get('python', '?')}")
    p(f"- client: `wrk -t1 -cN -d{meta.get('duration', '?')}s --latency`, rows interleaved, "
      f"repetitions: {meta.get('reps', '?')} after a {meta.get('warmup', '?')}s warm-up, medians; "
      f"RLIMIT_NOFILE {meta.get('nofile', '?')}, nginx worker_connections / intermission "
      f"max_connections {meta.get('conn_limit', '?')}")
    if any(len(r) > 9 and r[9] == "h2load" for r in rows):
        p(f"- HTTPS rows (conns `C×M`: connections × concurrent streams on each): `{meta.get('h2load_cmd', '?')}`, "
          "HTTP/2 over TLS (ALPN), interleaved and repeated like the other rows; certificate: "
          f"{meta.get('tls_cert', '?')}; nginx: {meta.get('tls_nginx', '?')}; negotiated (h2load): "
          f"TLS upstream {meta.get('tls_upt', '?')} / nginx {meta.get('tls_ngxt', '?')} / "
          f"intermission {meta.get('tls_intt', '?')}")
    p(f"- responses: upstream `/` {meta.get('size_up', '?')}; nginx 503 {meta.get('size_n503', '?')}; "
      f"intermission held (Accept: text/html) {meta.get('size_held', '?')}")
    if meta.get("head_int1"):
        p(f"- forwarded to the upstream for wrk's `GET /` (`Host` alone), read back from the upstream: "
          f"direct {meta.get('head_up', '?')}; nginx {meta.get('head_ngx1', '?')}; nginx forwarding "
          f"the same headers {meta.get('head_ngxh', '?')}; intermission {meta.get('head_int1', '?')}")
    p("- The cores are shared by wrk, the upstream and the proxy: read the ratios, not the absolute "
      "figures. RSS is VmRSS summed over a server's processes (nginx master + workers).")
    p("")
    p("| row | conns | median req/s | min..max | MiB/s | × direct | × nginx | p99 ms | proxy CPU % "
      "| CPU µs/req (× nginx) | RSS KiB idle → after | notes |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    spread_warn = []
    busy = []
    for row in rows:
        rid, label, conns, metric, dref, nref, proc, expect, group = row[:9]
        s = stats.get(rid, {})
        notes = []
        if not s.get("ok"):
            p(f"| {label} | {conns} | no result | | | | | | | | | {s.get('n', 0)} runs, none parsed |")
            continue
        mine = value(rid, metric)
        rd = value(dref, metric) if dref and dref != rid else None
        rn = value(nref, metric) if nref and nref != rid else None
        ratio_d = mine / rd if rd else (1.0 if dref == rid else None)
        ratio_n = mine / rn if rn else (1.0 if nref == rid else None)
        if s["errors"]:
            notes.append(f"socket errors {s['errors']} ({s['error_text']})")
        if expect == "200" and s["non2xx"]:
            notes.append(f"**{s['non2xx']} non-2xx**")
        if expect == "503" and s["non2xx"] != s["requests"]:
            notes.append(f"**{s['requests'] - s['non2xx']} responses were not errors**")
        if s["tw"]:
            notes.append(f"upstream TIME_WAIT +{s['tw']:,.0f}/run")
        if s.get("head_bytes") is not None:
            notes.append(f"response headers {s['head_bytes']:.0f} B after HPACK")
        if s.get("other") is not None and s["other"] > 10:
            notes.append(f"busy machine: other processes took up to {s['other']:.0f} % CPU")
            busy.append(label)
        if s["ok"] < s["n"]:
            notes.append(f"{s['n'] - s['ok']} runs failed")
        if s["ok"] > 1 and s["spread"] > 0.10:
            notes.append(f"spread {s['spread'] * 100:.0f} %")
            spread_warn.append(label)
        idle = rss.get((proc, "idle"))
        after = s.get("rss_after")
        if after is None:
            after = rss.get((proc, f"after_{group}"))
        rss_text = f"{fmt_int(idle)} → {fmt_int(after)}" if idle is not None else "—"
        mib = f"{s['mibps']:,.1f}" if s.get("mibps") is not None else "—"
        p99 = f"{s['p99']:.2f}" if s.get("p99") is not None else "—"
        if s.get("client") == "h2load":
            # No percentiles from h2load: its mean and max request times instead, said so.
            mean = f"{s['mean']:.2f}" if s.get("mean") is not None else "—"
            mx = f"{s['lat_max']:.2f}" if s.get("lat_max") is not None else "—"
            p99 = f"mean {mean}, max {mx}"
        cpu = f"{s['cpu']:.0f}" if s.get("cpu") is not None else "—"
        us = s.get("us_per_req")
        us_text = f"{us:.1f}" if us is not None else "—"
        us_nginx = stats.get(nref, {}).get("us_per_req") if nref and nref != rid else None
        if us is not None and us_nginx:
            us_text += f" ({us / us_nginx:.2f})"
        p(f"| {label} | {conns} | {fmt_int(s['rps'])} | {fmt_int(s['min'])}..{fmt_int(s['max'])} | {mib} "
          f"| {fmt_ratio(ratio_d)} | {fmt_ratio(ratio_n)} | {p99} | {cpu} | {us_text} | {rss_text} "
          f"| {'; '.join(notes)} |")
    p("")
    p("× direct: against the direct row of the same body size and connections; × nginx: an "
      "intermission row against its matching nginx row (1 thread vs 1 worker, 2 vs 2, held page vs "
      "`return 503`; intermission's forwarding rows against plain nginx, which sends the upstream "
      "`Host` alone: the row forwarding the same headers is compared below the table). "
      "Body rows compare MiB/s (wrk's Transfer/sec). Proxy CPU %: the proxy's CPU "
      "time over the run's wall time (100 = one core; for direct rows, the upstream's). CPU µs/req: "
      "that CPU time per request (median over the repetitions), and for an intermission row its "
      "ratio to the matching nginx row's (below 1: cheaper per request than nginx); steadier than "
      "req/s when the cores are shared or stolen, but it counts only the proxy's own CPU: a proxy "
      "that makes its peers work harder is not charged for it. TIME_WAIT: "
      "sockets to/from the upstream's port left in TIME_WAIT per run (median): upstream "
      "connections closed instead of reused; for direct rows, wrk's own connections.")
    p("RSS after: right after the row's last run (the process has served the rows above it too).")
    # The target is intermission against plain nginx (ngx1), which sends the upstream
    # `Host` alone; ngxh forwards the headers intermission must (SPEC, README), which the
    # upstream pays to parse. Both ratios, the second for information only.
    like = [(ref, stats.get(ref, {})) for ref in ("ngx1", "ngxh")]
    mine = stats.get("int1", {})
    if mine.get("rps") and all(st.get("rps") for _, st in like):
        p("")
        p("Forwarding, intermission threads=1 against both nginx rows (req/s; CPU µs/req; upstream "
          "CPU µs/req):")
        p("")
        for ref, st in like:
            what = ("against plain nginx (`Host` alone to the upstream): the headline ratio, the "
                    "one the target is set against" if ref == "ngx1" else
                    "like-for-like, informational: against nginx forwarding the same headers "
                    "(`X-Forwarded-For`, `-Proto`, `-Host`, `X-Real-IP`, the client's `Host`)")
            cpu = (f"{mine['us_per_req'] / st['us_per_req']:.2f}×"
                   if mine.get("us_per_req") and st.get("us_per_req") else "—")
            up = f"{mine['up_us'] / st['up_us']:.2f}×" if mine.get("up_us") and st.get("up_us") else "—"
            p(f"- {what}: **{mine['rps'] / st['rps']:.3f}×** req/s; CPU {cpu}; upstream CPU {up}")
        base, full = like[0][1], like[1][1]
        p(f"- what the headers cost nginx: its req/s forwarding them {full['rps'] / base['rps']:.3f}× "
          "its req/s without")
        p("")
    if "bare" in stats:
        p("Bare relay: `benches/load/bare_relay.rs`, a relay with no features at all (no timeouts, "
          "health checks, metrics, retries or header rules; GET and Content-Length answers only) "
          "on the same tokio runtime flavour as intermission's threads=1. Its × nginx is the "
          "ceiling any relay reaches in this run, where wrk, the upstream and the proxy share the "
          "cores: a proxy's req/s moves with its peers' CPU as much as with its own.")
    if any(st.get("client") == "h2load" for st in stats.values()):
        p("HTTPS rows (h2load, h2 over TLS): × direct is against the TLS upstream (an nginx like "
          "`up` terminating TLS itself), × nginx is intermission against nginx terminating TLS with "
          "1 worker. h2load gives no percentiles: the p99 column holds the medians over the "
          "repetitions of its mean and max request times (ms, per stream) instead. Errors are "
          "h2load's failed requests (errored and timed-out ones included); TIME_WAIT is on the upstream's port for "
          "the proxies, on the TLS upstream's for the direct row (h2load's own connections). MiB/s "
          "is h2load's HTTP/2 traffic (frame headers, HPACK header blocks and bodies; no TLS "
          "overhead): servers that compress response headers differently differ there for the "
          "same responses (see the notes), so compare req/s.")
    if "intt1" in stats:
        p("HTTPS rows over HTTP/1.1 (wrk, which offers no ALPN): the same three servers, 64 "
          "keep-alive connections, one request at a time on each, as the plaintext rows.")
    if "ints" in stats:
        p("`https://` upstream rows: both proxies listen in plain HTTP and forward to an nginx "
          "terminating TLS and speaking HTTP/1.1 only (nginx speaks nothing else to a server), "
          "over kept connections (nginx: keepalive 128, TLS sessions reused; intermission: its "
          "pool, the certificate trusted by `upstream.ca_file`); no direct row. TIME_WAIT is on "
          "that upstream's port.")
    if busy:
        p("")
        p(f"**Other processes used the CPU** during: {', '.join(busy)} — these rows are not "
          "comparable; rerun on a quiet machine.")
    if spread_warn:
        p("")
        p(f"**min..max spread above 10 %** for: {', '.join(spread_warn)} — rerun before drawing "
          "conclusions (the machine may have been busy).")

    # What each forwarding proxy costs the upstream beside it, and the time the machine
    # idled: a proxy that is cheap itself but wakes its upstream more often, or leaves a core
    # idle while the other is the bottleneck, does not turn its saving into req/s.
    neighbours = [r for r in ("ngx1", "ngxh", "int1", "bare", "ngx2", "int2")
                  if stats.get(r, {}).get("up_us")]
    if neighbours:
        p("")
        p("## Cost to the neighbours (forwarding rows)")
        p("")
        p("| row | median req/s | proxy CPU µs/req | upstream CPU µs/req (× nginx) | machine idle % |")
        p("|---|---:|---:|---:|---:|")
        for rid in neighbours:
            s = stats[rid]
            ref = "ngx2" if rid in ("ngx2", "int2") else "ngx1"
            up_ref = stats.get(ref, {}).get("up_us")
            ratio = f" ({s['up_us'] / up_ref:.2f})" if up_ref and rid != ref else ""
            us = f"{s['us_per_req']:.1f}" if s.get("us_per_req") is not None else "—"
            idle = f"{s['idle']:.0f}" if s.get("idle") is not None else "—"
            label = next((row[1] for row in rows if row[0] == rid), rid)
            p(f"| {label} | {fmt_int(s['rps'])} | {us} | {s['up_us']:.1f}{ratio} | {idle} |")
        p("")
        p("Upstream CPU µs/req: the upstream nginx's CPU time per request served through the row's "
          "proxy (medians over the repetitions); machine idle: the share of all cores that idled "
          "during the run. wrk, the upstream and the proxy share the cores: the req/s a proxy "
          "reaches depends on what it costs them as much as on its own CPU (see "
          "`docs/performance-history.md`, \"Where the other core's time goes\").")

    mem = read_tsv(os.path.join(d, "mem.tsv"))
    if mem:
        p("")
        p(f"## Memory: {meta.get('idle_conns', '?')} idle keep-alive client connections")
        p("")
        p("| server | RSS KiB before | RSS KiB with the connections | per connection | RSS KiB after they close | client |")
        p("|---|---:|---:|---:|---:|---|")
        for r in mem:
            target, before, with_, after, ready, closing = (r + [""] * 6)[:6]
            opened = re.search(r"opened=(\d+)", ready)
            per = "—"
            if opened and int(opened.group(1)) and before.isdigit() and with_.isdigit():
                per = f"{(int(with_) - int(before)) * 1024 / int(opened.group(1)):,.0f} B"
            p(f"| {target} | {fmt_int(int(before)) if before.isdigit() else before} "
              f"| {fmt_int(int(with_)) if with_.isdigit() else with_} | {per} "
              f"| {fmt_int(int(after)) if after.isdigit() else after} | {ready} {closing} |")

        p("")
        p(f"Per connection: (with − before) ÷ connections opened. nginx allocates its "
          f"{meta.get('conn_limit', '?')} worker_connections slots when it starts, so its RSS before "
          "already holds them. Each connection sent one keep-alive `GET /` (forwarded) and then "
          "stayed idle; RSS was read 1 s after the last one opened. Fresh servers (configured as the "
          "1-worker / 1-thread rows) answered one request each before \"before\".")

    toggle = os.path.join(d, "toggle.txt")
    if os.path.exists(toggle):
        p("")
        p("## Toggle under load")
        p("")
        with open(toggle) as f:
            for line in f:
                line = line.rstrip()
                if line:
                    p(f"    {line}")

    notes = os.path.join(d, "notes.txt")
    if os.path.exists(notes) and os.path.getsize(notes):
        p("")
        p("## Seen during the run")
        p("")
        with open(notes) as f:
            for line in f:
                if line.strip():
                    p(f"- {line.rstrip()}")
    print("\n".join(out))


if __name__ == "__main__":
    main()

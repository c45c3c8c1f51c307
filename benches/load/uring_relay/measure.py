#!/usr/bin/env python3
"""measure.py ROUNDS DURATION PATH name=port:pid ...  -> one line per run, tab-separated."""
import re, subprocess, sys
rounds, dur, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
targets = [(a.split('=')[0],) + tuple(a.split('=')[1].split(':')) for a in sys.argv[4:]]
def cpu(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return int(f[11]), int(f[12])  # fields 14, 15 (utime, stime)
def lat_us(s):
    v, u = re.match(r'([\d.]+)(us|ms|s)', s).groups()
    return float(v) * {'us': 1, 'ms': 1e3, 's': 1e6}[u]
print('round\tname\treq_s\tp50_us\tp99_us\trequests\tuser_us_req\tsys_us_req\tcpu_us_req\terrors', flush=True)
for r in range(1, rounds + 1):
    for name, port, pid in targets:
        u0, s0 = cpu(pid)
        out = subprocess.run(['wrk', '-t1', '-c64', f'-d{dur}', '--latency',
                              f'http://127.0.0.1:{port}{path}'], capture_output=True, text=True).stdout
        u1, s1 = cpu(pid)
        rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
        n = int(re.search(r'(\d+) requests in', out).group(1))
        p50 = lat_us(re.search(r'(?m)^\s+50%\s+(\S+)', out).group(1))
        p99 = lat_us(re.search(r'(?m)^\s+99%\s+(\S+)', out).group(1))
        err = ' '.join(l.strip() for l in out.splitlines() if 'Socket errors' in l or 'Non-2xx' in l) or '-'
        us = lambda t: t * 10000 / n
        print(f'{r}\t{name}\t{rps:.0f}\t{p50:.0f}\t{p99:.0f}\t{n}\t{us(u1-u0):.2f}\t{us(s1-s0):.2f}\t{us(u1-u0+s1-s0):.2f}\t{err}', flush=True)

"""Sequential small GETs, one kept-alive HTTPS connection per path: the client the speed
issue measured with (Python's http.client, HTTP/1.1). The tunnel bench runs this beside its
own HTTP/2 client so the figures can be compared with the issue's.

Reads from standard input (never the command line, which other users can see):
  {"path": "/api/...", "warm_up": N, "samples": N,
   "targets": [{"name": ..., "url": "https://host:port[/prefix]", "ca_pem": ..., "token": ...}]}
and prints {"<name>": [nanoseconds, ...], ...}. Paths take turns, request by request, so drift
on a shared machine hits them alike. Exits non-zero with a message on any failed request.
"""

import http.client
import json
import socket
import ssl
import sys
import time
import urllib.parse

TIMEOUT_S = 10


def connect(target):
    url = urllib.parse.urlsplit(target["url"])
    ctx = ssl.create_default_context(cadata=target["ca_pem"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=TIMEOUT_S)
    conn.connect()
    # kubectl (Go's net/http) sets TCP_NODELAY; so does the bench's other client.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    headers = {"Authorization": "Bearer " + target["token"], "Accept": "application/json"}
    return conn, url.path.rstrip("/"), headers


def get(name, conn, prefix, path, headers):
    started = time.perf_counter_ns()
    conn.request("GET", prefix + path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    elapsed = time.perf_counter_ns() - started
    if resp.status != 200:
        sys.exit(f"GET {prefix + path} on {name}: HTTP {resp.status}: {body[:200]!r}")
    return elapsed


def main():
    cfg = json.load(sys.stdin)
    paths = [(t["name"],) + connect(t) for t in cfg["targets"]]
    for _ in range(cfg["warm_up"]):
        for name, conn, prefix, headers in paths:
            get(name, conn, prefix, cfg["path"], headers)
    samples = {name: [] for name, *_ in paths}
    for _ in range(cfg["samples"]):
        for name, conn, prefix, headers in paths:
            samples[name].append(get(name, conn, prefix, cfg["path"], headers))
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()

"""`queuechat serve --workers N`: N cluster nodes on this machine, behind the same gRPC and web ports.

Each worker is a fresh `queuechat serve` process (exec'd, never forked after grpc started), a node like
any other: the kernel spreads connections over them (SO_REUSEPORT) and PostgreSQL + NATS make them one
queuechat. This parent only starts them, passes SIGTERM/SIGINT on (each drains), and starts again one
that dies. Metrics ports cannot be shared (each node has its own figures): worker i serves /metrics on
the given port + i.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)
_FLAPPING = 5  # a worker that dies this many times in a row within 10 s of starting: give up


def child_args(argv: list[str]) -> list[str]:
    """The serve arguments without the ones the parent handles (--workers, --node-id, --metrics-listen, --demo-help)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--node-id", "--metrics-listen"):
            skip = "=" not in arg
            continue
        if arg == "--demo-help":
            continue
        out.append(arg)
    return out


def metrics_for(metrics_listen: str, i: int) -> str:
    """Worker i's --metrics-listen: every HOST:PORT moved up by i (port 0 stays any free port)."""
    out = []
    for entry in (e.strip() for e in metrics_listen.split(",")):
        if not entry or entry == "web":
            continue  # the web port is shared: which worker answers a scrape there is chance
        host, _, port = entry.rpartition(":")
        out.append(f"{host}:{int(port) + i}" if port.isdigit() and int(port) else entry)
    return ",".join(out)


def run_workers(argv: list[str], n: int, node_id: str | None, metrics_listen: str) -> int:
    from .cluster import default_node_id

    base = node_id or default_node_id()
    args = child_args(argv)
    env = {**os.environ, "QUEUECHAT_WORKERS": "1"}
    procs: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    failures: dict[int, int] = {}
    stopping = False

    def spawn(i: int) -> None:
        cmd = [sys.executable, "-m", "queuechat", *args, "--node-id", f"{base}-{i}"]
        cmd += ["--metrics-listen", metrics_for(metrics_listen, i)]
        procs[i] = subprocess.Popen(cmd, env=env)
        started[i] = time.monotonic()
        log.info("workers: started worker %d (pid %d, node %s-%d)", i, procs[i].pid, base, i)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(n):
        spawn(i)
    code = 0
    while procs:
        time.sleep(0.2)
        for i, p in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            del procs[i]
            if stopping:
                continue
            quick = time.monotonic() - started[i] < 10
            failures[i] = failures.get(i, 0) + 1 if quick else 1
            if failures[i] >= _FLAPPING:
                log.error("workers: worker %d keeps dying (exit %s); stopping all", i, rc)
                code = 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("workers: worker %d exited (%s); starting it again", i, rc)
            time.sleep(min(5.0, 0.5 * failures[i]))
            if not stopping:  # a SIGTERM during the pause: nobody would signal the new one
                spawn(i)
    return code

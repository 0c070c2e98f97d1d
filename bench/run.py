"""scripts/bench: queuechat under contact-centre load, against an in-memory relay in the same run.

Each phase gets a fresh server process (and the relay its own), driven by
bench/loadgen.py in another process. Ratios against the relay are the
figures to trust on a shared machine; absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-results"

TARGETS = {
    "relay_ratio": (">=", 0.5, "saturation throughput / relay"),
    "offer_p99_ms": ("<=", 50.0, "StartChat -> offer, p99"),
    "message_p99_ms": ("<=", 25.0, "message latency, p99"),
    "kib_per_stream": ("<=", 30.0, "server memory per open stream"),
    "attachment_ratio": (">=", 0.5, "20 MiB transfer / raw gRPC bytes"),
}

PROFILES = {
    "quick": dict(agents=20, chats=200, rate=40, interval=5.0, duration=8, sat_convs=20, sat_seconds=4,
                  counts=[100, 1000], repeat=1),
    # For the test suite: every phase, seconds in all; its figures mean nothing.
    "tiny": dict(agents=2, chats=6, rate=20, interval=0.5, duration=1, sat_convs=2, sat_seconds=1,
                 counts=[5, 10], repeat=1),
    "full": dict(agents=100, chats=1000, rate=40, interval=5.0, duration=30, sat_convs=50, sat_seconds=15,
                 counts=[100, 1000, 5000], repeat=3),
}


def config(agents: int, max_chats: int) -> str:
    lines = [
        "[settings]", "offer_timeout = 600", "stream_grace = 600",
        "[security]", "argon2_time_cost = 1", "argon2_memory_kib = 1024",
        # A load test is a flood by design.
        "[rate_limits]", "enabled = false",
        '[[queues]]', 'id = "q"', 'display_name = "Q"',
        '[[profiles]]', 'id = "p"', 'display_name = "P"', 'queues = ["q"]',
    ]
    for i in range(1, agents + 1):
        lines += ["[[agents]]", f'id = "agent{i}"', f'display_name = "Agent {i}"', 'password = "pw"',
                  'profiles = ["p"]', f"max_chats = {max_chats}"]
    return "\n".join(lines) + "\n"


@contextmanager
def process(cmd: list[str], ready: str):
    """Start a server process and yield (pid, port) once it logs that it listens."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    port = None
    for line in proc.stdout:
        m = re.search(ready, line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        raise RuntimeError(f"{cmd[:4]} did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
    try:
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(20)


@contextmanager
def queuechat(agents: int = 1, max_chats: int = 60):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(config(agents, max_chats))
        cmd = [sys.executable, "-m", "queuechat", "serve", "--config", str(cfg), "--data-dir", f"{tmp}/data",
               "--listen", "127.0.0.1:0"]
        if "--web-listen" in subprocess.run(cmd[:3] + ["serve", "--help"], capture_output=True, text=True).stdout:
            cmd += ["--web-listen", ""]
        with process(cmd, r"listening on port (\d+)") as srv:
            yield srv


@contextmanager
def relay():
    with process([sys.executable, str(ROOT / "bench" / "relay.py")], r"relay listening on port (\d+)") as srv:
        yield srv


def load(phase: str, pid: int, port: int, **kw) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "loadgen.py"), phase, "--target", f"127.0.0.1:{port}",
           "--server-pid", str(pid)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(profile: str) -> dict:
    p = PROFILES[profile]
    t0 = time.monotonic()
    res: dict = {"profile": profile, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"bench ({profile}): offers and messages ...", flush=True)
    with queuechat(p["agents"], math.ceil(p["chats"] / p["agents"]) + 1) as (pid, port):
        res["chat"] = load("chat", pid, port, agents=p["agents"], chats=p["chats"], rate=p["rate"],
                           interval=p["interval"], duration=p["duration"])
    print("bench: saturation ...", flush=True)
    with relay() as (pid, port):
        res["relay"] = load("saturation", pid, port, kind="relay", conversations=p["sat_convs"],
                            duration=p["sat_seconds"])
    with queuechat(max(1, p["sat_convs"] // 50), 60) as (pid, port):
        res["saturation"] = load("saturation", pid, port, conversations=p["sat_convs"], duration=p["sat_seconds"])
    print("bench: memory per stream ...", flush=True)
    with queuechat() as (pid, port):
        res["memory"] = load("memory", pid, port, counts=p["counts"])
    print("bench: attachments ...", flush=True)
    with relay() as (pid, port):
        res["raw_bytes"] = load("attachments", pid, port, repeat=p["repeat"])
    with queuechat() as (pid, port):
        res["attachments"] = load("attachments", pid, port, repeat=p["repeat"])
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def summary(res: dict) -> dict:
    mem = res["memory"]["kib_per_stream"]
    att, raw = res["attachments"], res["raw_bytes"]
    ratio = min(att["upload_mb_per_s"] / raw["upload_mb_per_s"], att["download_mb_per_s"] / raw["download_mb_per_s"])
    out = {
        "relay_ratio": res["saturation"]["msgs_per_s"] / res["relay"]["msgs_per_s"],
        "saturation_msgs_per_s": res["saturation"]["msgs_per_s"],
        "baseline_msgs_per_s": res["relay"]["msgs_per_s"],
        "server_cpu_s_per_1000_msgs": res["saturation"]["server_cpu_s_per_1000_msgs"],
        "offer_p50_ms": res["chat"]["offer_p50_ms"],
        "offer_p99_ms": res["chat"]["offer_p99_ms"],
        "message_p50_ms": res["chat"]["message_p50_ms"],
        "message_p99_ms": res["chat"]["message_p99_ms"],
        "kib_per_stream": mem[max(mem, key=int)],
        "kib_per_stream_at": {k: round(v, 1) for k, v in mem.items()},
        "attachment_mb_per_s": min(att["upload_mb_per_s"], att["download_mb_per_s"]),
        "attachment_upload_mb_per_s": att["upload_mb_per_s"],
        "attachment_download_mb_per_s": att["download_mb_per_s"],
        "raw_upload_mb_per_s": raw["upload_mb_per_s"],
        "raw_download_mb_per_s": raw["download_mb_per_s"],
        "attachment_ratio": ratio,
    }
    out["targets"] = {
        k: {"target": f"{op} {limit:g}", "value": round(out[k], 3), "met": out[k] >= limit if op == ">=" else out[k] <= limit}
        for k, (op, limit, _) in TARGETS.items()
    }
    return out


def markdown(res: dict, s: dict) -> str:
    c = res["chat"]
    rows = [
        ("Saturation, messages/s (persisted + fanned out)", f"{s['saturation_msgs_per_s']:.0f}"),
        ("Relay baseline, messages/s (in memory)", f"{s['baseline_msgs_per_s']:.0f}"),
        ("relay_ratio", f"{s['relay_ratio']:.2f}"),
        ("Server CPU s per 1,000 messages", f"{s['server_cpu_s_per_1000_msgs']:.3f}"),
        (f"Offer latency p50 / p99 ({c['chats']} chats, {c['agents']} agents), ms",
         f"{s['offer_p50_ms']:.1f} / {s['offer_p99_ms']:.1f}"),
        (f"Message latency p50 / p99 ({c['conversations']} conversations, one message / 5 s each), ms",
         f"{s['message_p50_ms']:.1f} / {s['message_p99_ms']:.1f}"),
        ("  customer -> agent p50 / p99, ms", f"{c['customer_to_agent_p50_ms']:.1f} / {c['customer_to_agent_p99_ms']:.1f}"),
        ("  agent -> customer p50 / p99, ms", f"{c['agent_to_customer_p50_ms']:.1f} / {c['agent_to_customer_p99_ms']:.1f}"),
    ]
    rows += [(f"Server memory per open stream at {n} chats, KiB", f"{v:.1f}") for n, v in s["kib_per_stream_at"].items()]
    rows += [
        ("20 MiB upload / raw gRPC bytes, MB/s",
         f"{s['attachment_upload_mb_per_s']:.0f} / {s['raw_upload_mb_per_s']:.0f}"),
        ("20 MiB download / raw gRPC bytes, MB/s",
         f"{s['attachment_download_mb_per_s']:.0f} / {s['raw_download_mb_per_s']:.0f}"),
    ]
    lines = [f"# queuechat benchmark ({res['profile']}, {res['started']}, {res['seconds']} s)", "",
             "| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {k} {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for k, t in s["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(["queuechat", "relay"], [s["saturation_msgs_per_s"], s["baseline_msgs_per_s"]], color=["#2a6", "#999"])
    axes[0].set_title(f"Saturation, msgs/s (ratio {s['relay_ratio']:.2f})")
    axes[1].bar(["offer p50", "offer p99", "msg p50", "msg p99"],
                [s["offer_p50_ms"], s["offer_p99_ms"], s["message_p50_ms"], s["message_p99_ms"]], color="#36c")
    axes[1].axhline(50, color="#c33", ls="--", lw=1)
    axes[1].axhline(25, color="#c93", ls=":", lw=1)
    axes[1].set_title("Latency, ms (targets dashed)")
    ns = sorted(s["kib_per_stream_at"], key=int)
    axes[2].plot([int(n) for n in ns], [s["kib_per_stream_at"][n] for n in ns], marker="o")
    axes[2].axhline(30, color="#c33", ls="--", lw=1)
    axes[2].set_xscale("log")
    axes[2].set_title("KiB per open stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a run of under a minute")
    ap.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=OUT, help="where results go (default bench-results/)")
    args = ap.parse_args(argv)
    profile = args.profile or ("quick" if args.quick else "full")
    res = run(profile)
    s = summary(res)
    out = args.out
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "raw" / f"{res['profile']}-{res['started']}.json").write_text(json.dumps(res, indent=2))
    (out / "latest.json").write_text(json.dumps({**s, "profile": res["profile"], "started": res["started"]}, indent=2))
    md = markdown(res, s)
    if profile == "full":
        (out / "latest.md").write_text(md)
        plot(s, out / "latest.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

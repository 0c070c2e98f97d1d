"""scripts/bench still runs every phase end to end and writes the keys it promises.

The tiny profile's figures mean nothing; speed is judged by scripts/bench itself.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "relay_ratio",
    "saturation_msgs_per_s",
    "baseline_msgs_per_s",
    "offer_p99_ms",
    "message_p99_ms",
    "kib_per_stream",
    "attachment_mb_per_s",
}


def test_bench_runs_every_phase_and_writes_latest_json(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--profile", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert set(latest) >= KEYS
    assert latest["saturation_msgs_per_s"] > 0 and latest["baseline_msgs_per_s"] > 0
    assert latest["attachment_mb_per_s"] > 0 and latest["kib_per_stream"] > 0
    assert set(latest["targets"]) == {"relay_ratio", "offer_p99_ms", "message_p99_ms", "kib_per_stream", "attachment_ratio"}
    assert all(isinstance(t["met"], bool) for t in latest["targets"].values())
    assert "| relay_ratio >= 0.5 |" in result.stdout

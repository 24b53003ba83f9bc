"""The long-run benchmark's quick form: 512 variants, resident memory must not grow.

The full form (20,000 variants, benchmarks/longrun.py) is run by hand; see its docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Growth bound, from the max RSS over the first 10% of records to the max over the last 10%.
# Everything a build keeps for its whole length is allocated before the first shard is done
# (model, decoded sources, batch working set); per shard it keeps only a ~200-byte sidecar
# dict. Measured growth is a few MiB (allocator noise). A leak of one batch's working set per
# batch (the tiny model's forward at batch 32 holds ~15 MiB) over the 14 later batches would
# add > 200 MiB; 48 MiB leaves room for allocator noise and still catches that.
MAX_GROWTH_MIB = 48


def test_longrun_quick(tmp_path):
    out = tmp_path / "longrun.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "longrun.py"), "--variants-total", "512", "--num-iter", "1",
         "--rdm-steps", "1", "--batch-size", "32", "--records-per-shard", "64", "--interval", "0.2",
         "--out-json", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak RSS" in proc.stdout and "RSS growth" in proc.stdout and "throughput" in proc.stdout
    data = json.loads(out.read_text())
    s = data["summary"]
    assert data["build"]["variants_total"] == 512 and data["build"]["shards"] == 8
    assert len(data["shards"]) == 8 and all(sh["variants_per_s"] > 0 for sh in data["shards"])
    assert 0 < s["variants_per_s"]["min"] <= s["variants_per_s"]["median"] <= s["variants_per_s"]["max"]
    assert s["peak_rss_mib"] >= s["rss_first_10pct_mib"] > 0
    assert s["rss_growth_mib"] < MAX_GROWTH_MIB, s
    assert out.with_suffix(".png").is_file()

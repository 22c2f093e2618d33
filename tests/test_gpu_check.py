"""The prepared GPU check's own plumbing, on the CPU (``--dry-run``): every step runs and reports."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_fills_its_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {r["step"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"environment", "test suite smoke on cpu", "train step, tiny", "decode, tiny",
                         "train->merge->verify->chat", "one layer, int4 kernel vs dequantize"}
    assert all(r["ok"] for r in rows.values())
    assert "passed" in rows["test suite smoke on cpu"]["result"]
    diff = float(rows["train->merge->verify->chat"]["result"].split("merge max|dlogit| ")[1].split(",")[0])
    assert diff <= 1e-3
    train = rows["train step, tiny"]["result"]
    assert "QA-LoRA " in train and " tok/s vs PEFT LoRA " in train and "peak memory" in train
    assert "both static cache + compiled" in rows["decode, tiny"]["result"]
    assert "| decode, tiny | yes |" in proc.stdout
    assert "m=1: kernel " in rows["one layer, int4 kernel vs dequantize"]["result"]

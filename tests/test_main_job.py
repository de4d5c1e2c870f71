"""README's first command, end to end: a real Ray head, coordinator, Serve app and real concurrent
`ray job submit` clients, in a temporary folder. Short schedules and two of the three bundled
concepts (on 2 cores a third concurrent job only adds its start-up); the flow is the real one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_report(tmp_path):
    out = tmp_path / "main"
    # the toy recipe's quiet penalty draws class pictures of every toy shape: 2 each here, not 8
    proc = subprocess.run([sys.executable, "jobs/main.py", "--out", str(out), "--steps", "3", "--gen-steps", "2",
                           "--num-images", "1", "--concepts", "2",
                           "--num-class-images", "2"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [c["name"] for c in report["concepts"]]
    slots = [c["slot"] for c in report["concepts"]]
    assert len(names) == 2 and len(set(slots)) == 2  # two live concepts on disjoint slots, trained concurrently
    assert set(report["jobs"].values()) == {"SUCCEEDED"}
    asked = [sorted(r["concepts"]) for r in report["requests"]]
    for subset in ([], *[[n] for n in names], sorted(names)):
        assert subset in asked
    assert all(r["status"] == 200 and r["images"] for r in report["requests"])
    assert all((out / p).exists() for r in report["requests"] for p in r["images"])
    rows = ["base, class prompt", "each concept alone", "all merged", "all merged, class prompt"]
    assert list(report["identity"]) == rows  # the sheet's rows in four lines, each a judge mean in [-1, 1]
    assert all(-1 <= m[k] <= 1 for m in report["identity"].values() for k in ("image_alignment", "shape_alignment"))
    assert "all merged, class prompt   IA " in proc.stdout
    removal = report["removal"]
    assert removal["generate_after_removal_status"] == 404 and removal["name"] not in removal["live_after"]
    assert (out / "contact_sheet.png").stat().st_size > 0
    token = (out / "state" / "admin_token").read_text().strip()
    assert token not in (out / "report.json").read_text() and token not in proc.stdout

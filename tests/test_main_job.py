"""README's first command, end to end: a real Ray head, coordinator, Serve app and real concurrent
`ray job submit` clients, in a temporary folder. Short schedules and two of the three bundled
concepts (on 2 cores a third concurrent job only adds its start-up); the flow is the real one."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blocklora.method.artifact import ConceptArtifact

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_report(tmp_path):
    out = tmp_path / "main"
    # the toy recipe's quiet penalty draws class pictures of every toy shape: 2 each here, not 8; an
    # erasure rate of neither the library's nor the toy recipe's, to see the flag reach the clients
    proc = subprocess.run([sys.executable, "jobs/main.py", "--out", str(out), "--steps", "3", "--gen-steps", "2",
                           "--num-images", "1", "--concepts", "2", "--erasure", "0.25",
                           "--num-class-images", "2"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [c["name"] for c in report["concepts"]]
    slots = [c["slot"] for c in report["concepts"]]
    assert len(names) == 2 and len(set(slots)) == 2  # two live concepts on disjoint slots, trained concurrently
    assert set(report["jobs"].values()) == {"SUCCEEDED"}
    kept = [ConceptArtifact.load(p) for p in (out / "state" / "concepts").glob("*.safetensors")]  # after the removal
    assert [a.meta.adapter.erasure for a in kept] == [0.25]  # the coordinator handed the rate out with the slot
    assert report["erasure"] == 0.25 and report["slots"] == 16
    asked = [sorted((c, 1.0) if isinstance(c, str) else (c["name"], c["weight"]) for c in r["concepts"])
             for r in report["requests"]]
    for subset in ([], *[[(n, 1.0)] for n in names], sorted((n, 1.0) for n in names),
                   sorted((n, 0.5) for n in names)):  # alone, summed and Eq. 5's α = 1/N
        assert subset in asked
    assert all(r["status"] == 200 and r["images"] for r in report["requests"])
    assert all((out / p).exists() for r in report["requests"] for p in r["images"])
    rows = ["base, class prompt", "each concept alone", "all merged, Eq. 5 (weights 1/2)", "all summed (weights 1)",
            "class prompt, all merged by Eq. 5"]
    assert list(report["identity"]) == rows  # the sheet's rows in five lines, each a judge mean in [-1, 1]
    assert all(-1 <= m[k] <= 1 for m in report["identity"].values() for k in ("image_alignment", "shape_alignment"))
    assert re.search(r"class prompt, all merged by Eq\. 5 +IA ", proc.stdout)
    removal = report["removal"]
    assert removal["generate_after_removal_status"] == 404 and removal["name"] not in removal["live_after"]
    assert (out / "contact_sheet.png").stat().st_size > 0
    token = (out / "state" / "admin_token").read_text().strip()
    assert token not in (out / "report.json").read_text() and token not in proc.stdout


def test_live_view_shows_each_jobs_own_newest_line_from_its_start():
    """The main job's live view: Ray's process prefix and WARNING lines dropped, the phase marks too, and
    a long line cut at its end, so what is left says whose line it is and what it is doing."""
    from jobs.main import MARKS_LINE, newest_line

    long = ("[ember] drawing 8 base pictures each of 5 more classes (circle, square, triangle, cross, heart) "
            "for the quiet penalty")
    log = ("reserved slot 0 for 'ember'\n\x1b[36m(RayTrainWorker pid=42)\x1b[0m " + long + "\n"
           "2026-11-28 05:33:08,236\tWARNING worker.py:1 -- something of Ray's\n" + MARKS_LINE + "{}\n"
           "[2026-12-07 19:03:39,623 I 29279 29279] logging.cc:303: Set ray log level from environment variable\n")
    shown = newest_line(log)
    assert shown.startswith("[ember] drawing 8 base pictures each of 5 more classes") and shown.endswith("…"), shown
    assert len(shown) == 110
    assert newest_line("") == "starting"

"""The main job: the whole federated flow on one machine, from an empty cluster to a contact sheet.

    python jobs/main.py [--out outputs/main] [--steps 600] [--keep]

Starts a Ray head on 127.0.0.1 (token authentication on), the coordinator and the Serve app (its
replicas look the coordinator up, and starting it beside the clients' jobs overran Serve's proxy
start timeout on 2 cores); submits one `ray job submit` client training job per bundled toy concept
(MAIN_CONCEPTS), concurrently; waits until they are live; asks the HTTP API (four requests
in flight, so different subsets share a batch) for each concept's class prompt on the bare base, its
prompt alone, with all merged by the paper's Eq. 5 (α = 1/N) and summed (α = 1), and its class prompt
with all merged by Eq. 5 (plus one prompt that names two);
removes one concept at runtime and shows it is refused; writes `contact_sheet.png`
(every generated picture labelled with its image and shape alignment to the concept, by the identity judge)
and `report.json` to --out; stops the cluster (unless --keep).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from blocklora.config import (  # noqa: E402
    AdapterConfig,
    GenerateConfig,
    PrecisionConfig,
    TrainConfig,
    add_flags,
    from_args,
    to_argv,
)
from blocklora.pipeline.generate import contact_sheet  # noqa: E402
from blocklora.toy.concepts import (  # noqa: E402
    ToyConcept,
    class_prompt,
    concept_from_json,
    eval_attributes,
    instance_prompt,
    reference_pictures,
    training_pictures,
)
from blocklora.toy.identity import load_identity_judge  # noqa: E402
from blocklora.toy.recipe import (  # noqa: E402
    TOY_BASE_ADAPTER,
    TOY_BASE_GENERATE,
    TOY_BASE_TRAIN,
    default_base_spec,  # noqa: E402
)
from devtools.job_profile import MARKS_LINE, marks_from_log, phase_seconds  # noqa: E402
from devtools.local_cluster import LocalCluster, free_port  # noqa: E402

EXAMPLES = REPO / "examples" / "concepts"
RAY_PREFIX = re.compile(r"^(\x1b\[[\d;]*m)*\([^)]*\)(\x1b\[[\d;]*m)*\s*")  # "(RayTrainWorker pid=…) ", coloured
RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \w+\.cc:\d+:")  # Ray's C++ logging
# In-distribution toy concepts (blocklora.toy.concepts), in the order --concepts takes them: two stars
# first, so the sheet shows whether two concepts of one class word stay apart when merged.
MAIN_CONCEPTS: tuple[str, ...] = ("ember", "frost", "lagoon", "rosa")
REFERENCES = 8  # reference pictures per concept for the sheet's image-alignment scores
CONCURRENT_REQUESTS = 4  # the Serve replica's default max_batch_size (serve/generator.py)


class Stage:
    """Prints a numbered stage with its duration, and records the duration for the report."""

    def __init__(self, timings: dict[str, float], total: int) -> None:
        self.timings, self.total, self.n = timings, total, 0

    def __call__(self, name: str) -> "Stage":
        self.n += 1
        self.name, self.t0 = name, time.monotonic()
        print(f"[{self.n}/{self.total}] {name} ...", flush=True)
        return self

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        dt = time.monotonic() - self.t0
        self.timings[self.name] = round(dt, 1)
        if exc[0] is None:
            print(f"      done in {dt:.1f} s", flush=True)


def run_side_by_side(cmds: dict[str, list[str]], env: dict, logs: Path, timeout: float = 600) -> None:
    """Start every script at once (one is fine), each writing to logs/NAME.log, and wait for them in
    order; the first failure stops the rest and is raised with the tail of its log."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in cmds.items():
            with open(logs / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        for name, proc in procs.items():
            if proc.wait(timeout) != 0:
                raise RuntimeError(f"{name} failed ({proc.returncode}):\n{(logs / f'{name}.log').read_text()[-3000:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def concepts_to_train(limit: int) -> list[dict]:
    """The first `limit` of MAIN_CONCEPTS, as their folders' concept.json plus the folder."""
    if limit > len(MAIN_CONCEPTS):
        raise SystemExit(f"--concepts {limit}: at most {len(MAIN_CONCEPTS)} ({', '.join(MAIN_CONCEPTS)})")
    missing = [n for n in MAIN_CONCEPTS[:limit] if not (EXAMPLES / n / "concept.json").is_file()]
    if missing:
        raise SystemExit(f"example concept folder(s) {missing} missing under {EXAMPLES}; "
                         "write them with `python jobs/toy/make_example_concepts.py`")
    return [json.loads((EXAMPLES / n / "concept.json").read_text()) | {"dir": EXAMPLES / n}
            for n in MAIN_CONCEPTS[:limit]]


def submit_clients(cluster: LocalCluster, concepts: list[dict], train_flags: list[str], out: Path,
                   http: httpx.Client, admin: dict[str, str]) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """One `ray job submit --no-wait` per concept, each registering with an invitation of its own
    person (`user-NAME`, POST /v1/invitations); concept name -> Ray job id, and -> its submit marks.
    One after another: the coordinator hands out slots in arrival order, so submitting all at once
    would give the concepts other slots (and the sheet other pictures) from run to run."""
    jobs, submitted = {}, {}
    for c in concepts:
        invited = http.post("/v1/invitations", json={"name": f"user-{c['name']}"}, headers=admin)
        invited.raise_for_status()
        job_id = f"client-{c['name']}-{int(time.time())}"
        t_submit = time.time()
        run_side_by_side({f"submit-{c['name']}": [
            "ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
            "--submission-id", job_id, "--no-wait", "--",
            "python", "jobs/client_train.py", "--images", str(c["dir"].relative_to(REPO)),
            "--class-word", c["class_word"], "--name", c["name"], *train_flags,
            "--invitation", invited.json()["code"], "--token-file", str(out / "clients" / f"{c['name']}.token"),
            "--storage-path", str(out / "clients" / "runs")]}, cluster.env, out / "logs")
        jobs[c["name"]] = job_id
        submitted[c["name"]] = {"t_submit": t_submit, "t_submitted": time.time()}
        print(f"      submitted {job_id}", flush=True)
    return jobs, submitted


def newest_line(log: str) -> str:
    """A client job's newest line, without Ray's process prefix: its step progress while it trains
    (`[name] step k/N  loss …  steps/s  ETA …`), else its own messages (reserved, uploading, live)."""
    lines = [RAY_PREFIX.sub("", ln).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines
             if ln and "WARNING" not in ln and not ln.startswith(MARKS_LINE) and not RAY_CORE_LOG.match(ln)]
    if not lines:
        return "starting"
    return lines[-1] if len(lines[-1]) <= 110 else lines[-1][:109] + "…"  # its start says whose and what


def wait_jobs(cluster: LocalCluster, jobs: dict[str, str], submitted: dict[str, dict[str, float]],
              timeout: float) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Poll until every job ends, printing each job's newest line when it changes (so a person sees
    every client's step, loss, speed and ETA); returns the jobs' statuses and phase timings."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    shown: dict[str, str] = {}
    phases: dict[str, dict[str, float]] = {}
    while time.monotonic() < deadline:
        for name, job_id in jobs.items():
            if name in phases:
                continue
            st = client.get_job_status(job_id)
            status[name] = str(st.value if hasattr(st, "value") else st)
            log = client.get_job_logs(job_id)
            line = f"{status[name]:9} {newest_line(log)}"
            if shown.get(name) != line:
                print(f"      {name:>10}: {line}", flush=True)
                shown[name] = line
            if st.is_terminal():
                marks = marks_from_log(log) or {}
                phases[name] = phase_seconds(marks | submitted[name] | {"t_done": time.time()})
        if len(phases) == len(jobs):
            failed = {n: s for n, s in status.items() if s != "SUCCEEDED"}
            if failed:
                tails = {n: client.get_job_logs(jobs[n])[-3000:] for n in failed}
                raise RuntimeError(f"client job(s) failed: {failed}\n"
                                   + "\n".join(f"--- {n}\n{t}" for n, t in tails.items()))
            return status, phases
        time.sleep(3)
    raise TimeoutError(f"client jobs not done after {timeout:.0f} s: {status}")


def generate(http: httpx.Client, body: dict) -> tuple[int, list[Image.Image], dict]:
    r = http.post("/v1/generate", json=body)
    if r.status_code != 200:
        return r.status_code, [], {"detail": r.json().get("detail")}
    if r.headers["content-type"].startswith("image/png"):
        return 200, [Image.open(io.BytesIO(r.content))], {"version": int(r.headers["x-blocklora-version"])}
    data = r.json()
    return 200, [Image.open(io.BytesIO(base64.b64decode(s))) for s in data["images"]], {"version": data["version"]}


def query_subsets(http: httpx.Client, concepts: list[ToyConcept], out: Path, num_images: int, steps: int,
                  guidance: float) -> tuple[list[dict], list[tuple[str, list[Image.Image]]], list[list[str]]]:
    """Per concept: its class prompt on the bare base, its prompt with it alone, with all merged by Eq. 5
    (α = 1/N) and summed (α = 1), and the class prompt with all merged by Eq. 5 (what merging leaks into
    the class); then one prompt that names two concepts (the subset it implies).

    Returns the report's request records, the contact sheet's rows (training pictures first) and each
    generated picture's image and shape alignment to the concept's reference pictures, as the sheet's notes."""
    judge = load_identity_judge()
    names = [c.name for c in concepts]
    refs = {c.name: reference_pictures(c, REFERENCES, seed=0) for c in concepts}
    eq5 = [{"name": n, "weight": 1 / len(names)} for n in names]
    stages = (("base, class prompt", [], class_prompt), ("each concept alone", None, instance_prompt),
              (f"all merged, Eq. 5 (weights 1/{len(names)})", eq5, instance_prompt),  # the sheet's font has no α
              ("all summed (weights 1)", names, instance_prompt),
              ("class prompt, all merged by Eq. 5", eq5, class_prompt))
    cells = [(label, c, {"prompt": make_prompt(c, eval_attributes(c, 1)[0]),
                         "concepts": [c.name] if subset is None else subset})
             for label, subset, make_prompt in stages for c in concepts]
    a, b = names[:2]
    # the last: both named in the prompt only
    bodies = [body for _, _, body in cells] + [{"prompt": f"{{{a}}} next to {{{b}}}", "concepts": []}]
    # in flight together, as many as a replica batches: requests for different subsets share one denoising loop
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        answers = list(pool.map(lambda i, body: _request(http, body, i, out, num_images, steps, guidance),
                                range(len(bodies)), bodies))
    rows = [("training pictures", [im for c in concepts for im in training_pictures(c)[:num_images]])]
    notes: list[list[str]] = [[]]
    results = []
    for (label, c, _), (_, images, result) in zip(cells, answers):
        if rows[-1][0] != label:
            rows.append((label, []))
            notes.append([])
        scores = judge.image_alignment(images, refs[c.name]).tolist() if images else []
        shapes = judge.shape_alignment(images, refs[c.name]).tolist() if images else []
        results.append(result | {"sheet_row": label, "concept": c.name, "image_alignment": scores,
                                 "shape_alignment": shapes})
        rows[-1][1].extend(images)
        notes[-1].extend(f"{c.name} IA {s:.2f} sh {h:.2f}" for s, h in zip(scores, shapes))
    results.append(answers[-1][2])
    return results, rows, notes


def row_means(requests: list[dict]) -> dict[str, dict[str, float]]:
    """Sheet row -> the judge's mean image and shape alignment over its pictures: what the sheet says in
    five lines (alone vs merged is what merging keeps; the class prompt after merging, what it leaks)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for r in requests:
        if "sheet_row" in r:
            row = rows.setdefault(r["sheet_row"], {"image_alignment": [], "shape_alignment": []})
            row["image_alignment"] += r["image_alignment"]
            row["shape_alignment"] += r["shape_alignment"]
    return {label: {k: round(sum(v) / len(v), 3) for k, v in row.items() if v} for label, row in rows.items()}


def _request(http: httpx.Client, body: dict, index: int, out: Path, num_images: int, steps: int,
             guidance: float) -> tuple[int, list[Image.Image], dict]:
    """One /v1/generate call; saves its images as images/{index}-{j}.png and returns its report record."""
    body = body | {"seed": 100, "steps": steps, "num_images": num_images, "guidance_scale": guidance}
    code, images, extra = generate(http, body)
    paths = []
    for j, img in enumerate(images):
        p = out / "images" / f"{index:02d}-{j}.png"
        img.save(p)
        paths.append(str(p.relative_to(out)))
    subset = ", ".join(c if isinstance(c, str) else f"{c['name']} x{c['weight']:.2f}" for c in body["concepts"])
    print(f"      {code} {body['prompt']!r} concepts=[{subset}] -> {len(images)} image(s)", flush=True)
    return code, images, {"prompt": body["prompt"], "concepts": body["concepts"], "status": code, "images": paths,
                          **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/main", help="report, contact sheet and state go here")
    ap.add_argument("--base-model", default=None, help="default: the project's pretrained toy base (else 'tiny')")
    ap.add_argument("--concepts", type=int, default=3, help="how many bundled example concepts to train")
    add_flags(ap, TrainConfig, TOY_BASE_TRAIN, skip=("resolution",))  # clients train at the base's resolution
    add_flags(ap, AdapterConfig, TOY_BASE_ADAPTER, only=("num_slots", "erasure"))  # the coordinator hands it out
    add_flags(ap, GenerateConfig, TOY_BASE_GENERATE, only=("guidance_scale",))
    add_flags(ap, PrecisionConfig)  # the coordinator's and the Serve replicas' base
    ap.add_argument("--gen-steps", type=int, default=TOY_BASE_GENERATE.steps,
                    help="denoising steps per generated image")
    ap.add_argument("--num-images", type=int, default=2, help="images per request")
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs the local Ray head advertises")
    ap.add_argument("--keep", action="store_true", help="leave the cluster, coordinator and HTTP app running")
    args = ap.parse_args()
    train = from_args(TrainConfig, args, ap)
    adapter = from_args(AdapterConfig, args, ap)
    sampling = from_args(GenerateConfig, args, ap, steps=args.gen_steps)
    precision = to_argv(from_args(PrecisionConfig, args, ap))

    out = Path(args.out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    base = args.base_model or default_base_spec()
    concepts = concepts_to_train(args.concepts)
    names = [c["name"] for c in concepts]
    timings: dict[str, float] = {}
    stage = Stage(timings, total=7)
    t_start = time.monotonic()
    print(f"the main job: {len(names)} clients train {train.steps} steps each (what a concept nobody drew needs to "
          "show alone), then the federation serves every subset; on 2 CPU cores about 8 minutes, most of it "
          "training (docs/results/main-job.md#time)", flush=True)
    report: dict = {"base_model": base, "steps": train.steps, "lr": train.lr, "token_lr": train.token_lr,
                    "slots": adapter.num_slots, "erasure": adapter.erasure, "guidance": sampling.guidance_scale,
                    "timings_s": timings}

    with stage("start a Ray head on 127.0.0.1 (token auth on)"):
        cluster = LocalCluster(num_cpus=args.num_cpus, auth_token_path=out / "state" / "ray_auth_token",
                               cwd=REPO).start()
        os.environ.update(cluster.auth_env)  # this process talks to the job API too
    try:
        port = free_port()
        # side by side: the app's replicas wait for the coordinator's name (it reads the base first), and
        # each script's start-up (imports, Serve's controller and replicas) overlaps the other's
        with stage(f"start the coordinator (base {base}, {adapter.num_slots} slots, erasure {adapter.erasure}) and "
                   f"the Serve app on http://127.0.0.1:{port}/v1"):
            run_side_by_side({
                "coordinator": [sys.executable, "jobs/start_coordinator.py", "--base-model", base,
                                *to_argv(adapter, skip=("blockwise", "freeze_a")),
                                "--state-dir", str(out / "state"), "--address", cluster.address, *precision],
                "serve": [sys.executable, "jobs/serve_up.py", "--address", cluster.address, "--port", str(port),
                          *precision]}, cluster.env, out / "logs")
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        admin = {"Authorization": f"Bearer {(out / 'state' / 'admin_token').read_text().strip()}"}

        with stage(f"train {len(names)} concepts concurrently with `ray job submit` ({train.steps} steps each)"):
            jobs, submitted = submit_clients(cluster, concepts, to_argv(train, skip=("resolution",)), out, http, admin)
            report["jobs"], report["client_phases_s"] = wait_jobs(cluster, jobs, submitted, timeout=3600)

        with stage("wait until every concept is live over HTTP"):
            deadline = time.monotonic() + 60
            while set(names) - {c["name"] for c in http.get("/v1/concepts").json()["concepts"]}:
                if time.monotonic() > deadline:
                    raise TimeoutError("concepts did not go live")
                time.sleep(0.5)
            live = http.get("/v1/concepts").json()
            report["concepts"], report["version_after_training"] = live["concepts"], live["version"]
            for c in live["concepts"]:
                print(f"      {c['name']}: slot {c['slot']}, trigger {' '.join(c['triggers'])} {c['class_word']}")

        with stage("generate for every subset over HTTP"):
            toys = [concept_from_json(c["dir"] / "concept.json") for c in concepts]
            report["requests"], rows, notes = query_subsets(http, toys, out, args.num_images, sampling.steps,
                                                            sampling.guidance_scale)
            report["identity"] = row_means(report["requests"])
            width = max(map(len, report["identity"]))
            for label, m in report["identity"].items():
                print(f"      {label:<{width}} IA {m.get('image_alignment', float('nan')):.2f}  "
                      f"shape {m.get('shape_alignment', float('nan')):.2f}")

        removed = names[-1]
        with stage(f"remove {removed!r} at runtime and ask for it again"):
            r = http.delete(f"/v1/concepts/{removed}", headers=admin)
            r.raise_for_status()
            t0 = time.monotonic()
            code, _, extra = generate(http, {"prompt": f"a photo of {{{removed}}}", "steps": 1})
            report["removal"] = {"name": removed, "delete_status": r.status_code, "version": r.json().get("version"),
                                 "generate_after_removal_status": code, "detail": extra.get("detail"),
                                 "refused_after_s": round(time.monotonic() - t0, 3),
                                 "live_after": [c["name"] for c in http.get("/v1/concepts").json()["concepts"]]}
            print(f"      DELETE -> {r.status_code}; /v1/generate with {{{removed}}} -> {code}: {extra.get('detail')}")

        with stage("write the contact sheet and the report"):
            columns = [n for n in names for _ in range(args.num_images)]
            contact_sheet(rows, notes=notes, columns=columns).save(out / "contact_sheet.png")
            timings["total"] = round(time.monotonic() - t_start, 1)
            (out / "report.json").write_text(json.dumps(report, indent=2))
    finally:
        if args.keep:
            print(f"cluster kept running: RAY_ADDRESS={cluster.address}, dashboard {cluster.dashboard_url}, "
                  f"token in {out / 'state' / 'ray_auth_token'}; stop it with: kill -- -{cluster.proc.pid}")
            print(f"the page: http://127.0.0.1:{port}/  (admin token for Remove: {out / 'state' / 'admin_token'})")
        else:
            cluster.stop()
    print(f"\nreport:        {out / 'report.json'}\ncontact sheet: {out / 'contact_sheet.png'}\n"
          f"total:         {timings['total']:.0f} s")


if __name__ == "__main__":
    main()

"""Bounded HTTP load with concepts churning underneath: every answer checked, memory watched.

    python -m benchmarks.load_test                 # own cluster on 127.0.0.1, 60 s, 4 clients
    python -m benchmarks.load_test --quick         # 20 s
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --address 127.0.0.1:6379 \
        --dashboard-url http://127.0.0.1:8265 --admin-token-file STATE/admin_token   # attach

Starts (or attaches to) a local cluster, the coordinator on the tiny base and the Serve app, makes
two stable concepts and one churning concept live, then runs N client threads for a fixed time,
each posting requests with a mixed subset of concepts, while an admin loop removes the churning
concept and uploads it again. Every 200 is compared with the image the single-process pipeline
merged with the same subset draws for the same seed (LiveMerge; a subset's image does not depend
on which other concepts are live). A 404 is expected only for a request naming the churning
concept while it is out. Reports requests served, latency p50/p99, statuses, wrong answers and the
RSS of the generator replicas at start and end; prints ONE JSON line and writes it to --out.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: 127.0.0.1 stays loopback

import httpx
import numpy as np
import psutil
import ray
import torch
from PIL import Image
from ray.util.state import list_actors

from benchmarks.common import RESULTS_DIR, emit, environment
from benchmarks.synthetic import random_artifact
from blocklora.config import AdapterConfig, GenerateConfig
from blocklora.method.merge import LiveMerge
from blocklora.method.slots import SlotSpace, phrase
from blocklora.pipeline.base import load_base
from blocklora.pipeline.generate import generate
from devtools.local_cluster import LocalCluster, free_port
from federation import coordinator

REPO = Path(__file__).resolve().parents[1]
ADAPTER = AdapterConfig(rank=2, num_slots=8)
NAMESPACE, NAME = "blocklora-load", "coordinator-load"
SAMPLING = {"steps": 2, "guidance_scale": 4.0}
STABLE, CHURN = ("stable-a", "stable-b"), "churn"
TOLERANCE = 2  # uint8 levels: the batch shape changes float rounding, never more (docs/serving.md)


def bodies() -> list[dict]:
    """Mixed subsets (none, one, two, three; listed or named in the prompt) at two seeds."""
    a, b = STABLE
    subsets = [[], [a], [b], [a, b], [CHURN], [a, CHURN], [a, b, CHURN]]
    out = []
    for seed in (1, 2):
        for s in subsets:
            prompt = "a photo of " + " and ".join(f"{{{n}}}" for n in s) if s else "a photo of a dog"
            out.append({"prompt": prompt, "seed": seed, **SAMPLING})
    return out


def reference(base, arts: dict, body: dict) -> np.ndarray:
    """The image the single-process pipeline merged with the request's concepts draws."""
    names = [n for n in arts if "{" + n + "}" in body["prompt"]]
    merged = LiveMerge(base, ADAPTER)
    merged.set([arts[n] for n in names])
    text = body["prompt"].format(**{n: phrase(arts[n]) for n in names})
    image = generate(base, text, GenerateConfig(width=base.resolution, height=base.resolution, seed=body["seed"],
                                                **SAMPLING))[0]
    merged.set([])
    return np.asarray(image, dtype=np.int16)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def replica_rss(dashboard_url: str) -> dict[int, int]:
    """pid -> RSS bytes of every live generator replica (this machine's processes)."""
    rows = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.pid: psutil.Process(a.pid).memory_info().rss for a in rows if "Generator" in (a.class_name or "")}


class Churn(threading.Thread):
    """The admin loop: remove the churning concept (admin token), then upload the same bytes again
    (owner token) into the slot it left, every `period` seconds."""

    def __init__(self, http: httpx.Client, actor, owner: str, admin: str, data: bytes, period: float) -> None:
        super().__init__(daemon=True)
        self.http, self.actor, self.owner, self.admin, self.data, self.period = http, actor, owner, admin, data, period
        self.stop, self.cycles, self.errors = threading.Event(), 0, []
        self.out = threading.Event()  # set while the concept is not live

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.out.set()
            r = self.http.delete(f"/v1/concepts/{CHURN}", headers={"Authorization": f"Bearer {self.admin}"})
            if r.status_code != 200:
                self.errors.append(f"DELETE {r.status_code} {r.text[:200]}")
            if self.stop.wait(self.period / 2):
                break
            ray.get(self.actor.reserve.remote(self.owner, CHURN, "dog"))
            r = self.http.post("/v1/concepts", content=self.data, headers={"Authorization": f"Bearer {self.owner}"})
            if r.status_code != 201:
                self.errors.append(f"POST {r.status_code} {r.text[:200]}")
            self.out.clear()
            self.cycles += 1


def run_load(url: str, dashboard_url: str, actor, admin: str, duration: float, clients: int,
             period: float) -> dict:
    base = load_base("tiny")
    space = SlotSpace.of(base, ADAPTER)
    http = httpx.Client(base_url=url, timeout=300)
    owner = coordinator.enrol(actor, admin, "load-test", quota=100)
    arts = {}
    for i, name in enumerate((*STABLE, CHURN)):
        slot = ray.get(actor.reserve.remote(owner, name, "dog")).slot
        arts[name] = random_artifact(name, slot, ADAPTER, base.fingerprint, space.layout, space.hidden, seed=i + 1,
                                     b_scale=0.5, class_word="dog")
        r = http.post("/v1/concepts", content=arts[name].to_bytes(), headers={"Authorization": f"Bearer {owner}"})
        r.raise_for_status()
    reqs = bodies()
    expected = [reference(base, arts, b) for b in reqs]
    for b in reqs[:3]:  # warm the replica up before the memory baseline
        http.post("/v1/generate", json=b).raise_for_status()
    rss_start = replica_rss(dashboard_url)

    results: list[tuple[int, int, float, bool | None]] = []  # (body, status, seconds, right?)
    lock, stop = threading.Lock(), threading.Event()
    churn = Churn(http, actor, owner, admin, arts[CHURN].to_bytes(), period)

    def client(k: int) -> None:
        rng = random.Random(k)
        while not stop.is_set():
            i = rng.randrange(len(reqs))
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/generate", json=reqs[i])
                status, content = r.status_code, r.content
            except httpx.HTTPError:
                status, content = 0, b""  # transport failure: counted, never a success
            dt = time.perf_counter() - t0
            right = None
            if status == 200:
                right = bool(np.abs(pixels(content) - expected[i]).max() <= TOLERANCE)
            elif status == 404:
                right = CHURN in reqs[i]["prompt"] and CHURN in content.decode(errors="replace")
            with lock:
                results.append((i, status, dt, right))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.monotonic()
    churn.start()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    churn.stop.set()
    for t in threads:
        t.join(timeout=300)
    churn.join(timeout=300)
    elapsed = time.monotonic() - t0
    rss_end = replica_rss(dashboard_url)
    http.close()

    statuses = collections.Counter(str(s) for _, s, _, _ in results)
    ok_lat = sorted(dt for _, s, dt, _ in results if s == 200)
    mb = lambda d: round(sum(d.values()) / 2**20, 1)  # noqa: E731
    return {
        "requests": len(results), "served_200": statuses.get("200", 0), "status_counts": dict(statuses),
        "wrong_answers": sum(1 for _, s, _, right in results if s == 200 and not right),
        "unexpected_404": sum(1 for _, s, _, right in results if s == 404 and not right),
        "expected_404_churn": sum(1 for _, s, _, right in results if s == 404 and right),
        "errors_5xx": sum(1 for _, s, _, _ in results if s >= 500), "transport_errors": statuses.get("0", 0),
        "p50_ms": round(1000 * statistics.median(ok_lat), 1) if ok_lat else None,
        "p99_ms": round(1000 * ok_lat[min(len(ok_lat) - 1, int(0.99 * len(ok_lat)))], 1) if ok_lat else None,
        "throughput_rps": round(len(ok_lat) / elapsed, 2), "elapsed_s": round(elapsed, 1),
        "churn_cycles": churn.cycles, "churn_errors": churn.errors,
        "replica_pids_same": sorted(rss_start) == sorted(rss_end),
        "replica_rss_mb_start": mb(rss_start), "replica_rss_mb_end": mb(rss_end),
        "replica_rss_growth_mb": round(mb(rss_end) - mb(rss_start), 1),
    }


def start_own(state_dir: Path, admin: str) -> tuple[LocalCluster, str]:
    """A private cluster on 127.0.0.1 with the coordinator and the app, the operator's way."""
    cluster = LocalCluster(num_cpus=2, cwd=REPO).start()
    os.environ.update(cluster.auth_env)
    port = free_port()
    env = {**cluster.env, "BLOCKLORA_ADMIN_TOKEN": admin}  # the child reads it; never printed
    for cmd in (["jobs/start_coordinator.py", "--base-model", "tiny", "--slots", str(ADAPTER.num_slots), "--rank",
                 str(ADAPTER.rank), "--state-dir", str(state_dir)],
                ["jobs/serve_up.py", "--host", "127.0.0.1", "--port", str(port)]):
        subprocess.run([sys.executable, *cmd, "--address", cluster.address, "--namespace", NAMESPACE,
                        "--coordinator" if "serve_up" in cmd[0] else "--name", NAME],
                       cwd=REPO, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return cluster, f"http://127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 s instead of --duration")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    p.add_argument("--churn-period", type=float, default=4.0, help="seconds between removals of the churning concept")
    p.add_argument("--url", help="attach to this app instead of starting a cluster (needs the next three)")
    p.add_argument("--address", help="Ray address of the attached cluster")
    p.add_argument("--dashboard-url", help="its dashboard, to find the replicas' processes")
    p.add_argument("--admin-token-file", help="the federation's admin token file")
    p.add_argument("--namespace", default=NAMESPACE)
    p.add_argument("--coordinator", default=NAME)
    p.add_argument("--out", default=str(RESULTS_DIR / "load_test.json"))
    args = p.parse_args()
    duration = 20.0 if args.quick else args.duration
    if args.duration <= 0 or args.clients < 1 or not 0 < duration <= 3600:
        p.error("--duration must be in (0, 3600] and --clients >= 1")

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the cluster we started
    cluster = None
    with tempfile.TemporaryDirectory(prefix="blocklora-load-") as tmp:
        try:
            if args.url:
                if not (args.address and args.dashboard_url and args.admin_token_file):
                    p.error("--url needs --address, --dashboard-url and --admin-token-file")
                url, address, dashboard = args.url, args.address, args.dashboard_url
                admin = Path(args.admin_token_file).read_text().strip()
            else:
                admin = os.urandom(24).hex()
                cluster, url = start_own(Path(tmp) / "state", admin)
                address, dashboard = cluster.address, cluster.dashboard_url
            ray.init(address=address, namespace=args.namespace, log_to_driver=False)
            actor = ray.get_actor(args.coordinator, namespace=args.namespace)
            result = run_load(url, dashboard, actor, admin, duration, args.clients, args.churn_period)
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.stop()
    result = {"benchmark": "load_test", "command": " ".join(["python -m benchmarks.load_test", *sys.argv[1:]]),
              "quick": args.quick, "duration_s": duration, "clients": args.clients, "base": "tiny",
              "adapter": {"rank": ADAPTER.rank, "num_slots": ADAPTER.num_slots}, "sampling": SAMPLING,
              "tolerance_uint8": TOLERANCE, **result, "env": environment("cpu", torch.float32)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    emit(result)


if __name__ == "__main__":
    main()

"""The concept library at scale (issue #37): concepts uploaded over HTTP by many clients into one
federation, then concurrent HTTP clients each asking a random slot-disjoint subset of them, at
replica concept-cache budgets of 10%, 50% and 100% of the library, with zero wrong pictures.

    python -m benchmarks.library_scale [--sizes 16 100 1000] [--clients 50] [--http-clients 16] \
        [--duration 30] [--quick]

On the tiny base (random weights: this measures the system, not pictures), K = 16 slots, rank 4,
synthetic concepts (random but well-formed artifacts) uploaded over real HTTP after a reservation
through the coordinator actor, as client jobs make them. At each library size of --sizes it records
upload throughput, the coordinator's RSS, the state folder's size, the coordinator's restart time
(killed, restarted by Ray, until it answers) and a listing page's latency, then asks for every
concept once (so the replica's cache is warm) and serves for --duration seconds at a cache budget of
the whole library; at the largest size then also at 50% and 10% (each after the same warm-up).
A sample of each phase's pictures is re-drawn in-process (the same concepts merged with LiveMerge,
the same seed) and must match within the suite's tolerance. Per-concept costs are fitted between
the two largest sizes and projected to 100,000 concepts.

Prints one JSON object; writes results.json, README.md and library_scale.png under
docs/results/library-scale/ (--out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
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

import httpx
import numpy as np
import psutil
import ray
import torch
from PIL import Image
from ray.util.state import list_actors

from benchmarks.common import RESULTS_DIR, emit, environment
from benchmarks.synthetic import random_artifact
from blocklora.config import AdapterConfig, FederationConfig, GenerateConfig
from blocklora.method.merge import LiveMerge
from blocklora.method.slots import SlotSpace, phrase
from blocklora.pipeline.base import load_base
from blocklora.pipeline.generate import generate
from devtools.local_cluster import LocalCluster, free_port
from federation import coordinator
from federation.registry import Registry
from federation.store import StateStore
from serve.uploads import ARRIVING

REPO = Path(__file__).resolve().parents[1]
NAMESPACE, NAME = "blocklora-library", "coordinator-library"
ADAPTER = AdapterConfig(rank=4, num_slots=16)
SAMPLING = {"steps": 2, "guidance_scale": 4.0}
TOLERANCE = 2  # uint8 levels, as tests/ and benchmarks/load_test.py allow for another batch shape
SAMPLED = 6  # pictures per serving phase re-drawn in-process
MAX_SUBSET = 8


def concept_name(i: int) -> str:
    return f"c{i:06d}"


class Library:
    """The federation under test: its concepts (name -> (slot, seed)) and how to rebuild any of them."""

    def __init__(self, base) -> None:
        self.base, self.space = base, SlotSpace.of(base, ADAPTER)
        self.concepts: dict[str, tuple[int, int]] = {}
        self.bytes_per_concept = 0  # of factors and trigger vectors, as a replica holds them (float32)

    def artifact(self, name: str, slot: int, seed: int):
        return random_artifact(name, slot, ADAPTER, self.base.fingerprint, self.space.layout, self.space.hidden,
                               seed, b_scale=0.5, class_word="thing")

    def subset(self, rng: random.Random) -> list[str]:
        """1-8 concepts in pairwise different slots."""
        by_slot: dict[int, list[str]] = {}
        for name, (slot, _) in self.concepts.items():
            by_slot.setdefault(slot, []).append(name)
        slots = rng.sample(sorted(by_slot), rng.randint(1, min(MAX_SUBSET, len(by_slot))))
        return [rng.choice(by_slot[s]) for s in slots]


def upload(lib: Library, http: httpx.Client, actor, tokens: list[str], start: int, stop: int) -> float:
    """Concepts start..stop-1, each reserved by its client (i mod clients) and uploaded over HTTP as
    many at a time as the ingress spools (ARRIVING), each client one upload at a time as the ingress asks
    (a second of one token's gets 429); uploads per second."""
    def one(i: int) -> None:
        name, token = concept_name(i), tokens[i % len(tokens)]
        grant = ray.get(actor.reserve.remote(token, name, "thing"))
        art = lib.artifact(name, grant.slot, i)
        r = http.post("/v1/concepts", content=art.to_bytes(), headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        lib.concepts[name] = (grant.slot, i)
        if not lib.bytes_per_concept:
            lib.bytes_per_concept = sum(t.numel() * 4 for t in art.tensors.values())

    lanes = min(ARRIVING, len(tokens))  # a client's uploads all go through one lane, in turn

    def lane(k: int) -> None:
        for i in range(start, stop):
            if (i % len(tokens)) % lanes == k:
                one(i)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, range(lanes)))
    return (stop - start) / (time.perf_counter() - t0)


def coordinator_pid(dashboard_url: str) -> int:
    rows = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return next(a.pid for a in rows if a.name == NAME)


def restart_seconds(actor, dashboard_url: str) -> float:
    """Kill the coordinator's process (Ray restarts it on its folder) and time until a new process
    answers with the same version: its whole start-up, state load included."""
    version, pid = ray.get(actor.version.remote()), coordinator_pid(dashboard_url)
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while True:
        try:
            if ray.get(actor.version.remote(), timeout=30) == version and coordinator_pid(dashboard_url) != pid:
                return time.perf_counter() - t0
        except (ray.exceptions.RayError, StopIteration):
            time.sleep(0.05)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def set_budget(cluster: LocalCluster, port: int, mb: float) -> None:
    """Re-run jobs/serve_up.py with another --concept-cache-mb: a user_config change, applied by the
    replica's reconfigure without a restart."""
    subprocess.run([sys.executable, "jobs/serve_up.py", "--address", cluster.address, "--host", "127.0.0.1", "--port",
                    str(port), "--namespace", NAMESPACE, "--coordinator", NAME, "--concept-cache-mb",
                    f"{math.ceil(mb * 1e6) / 1e6:.6f}"],  # rounded up: a 100% budget holds the whole library
                   cwd=REPO, env=cluster.env, check=True, timeout=600, stdout=subprocess.DEVNULL)


def reference(lib: Library, names: list[str], seed: int) -> np.ndarray:
    """The picture the single-process pipeline merged with `names` draws (what the replica must match)."""
    arts = [lib.artifact(n, *lib.concepts[n]) for n in names]
    merged = LiveMerge(lib.base, ADAPTER)
    merged.set(arts)
    text = "a photo of " + " and ".join(phrase(a) for a in arts)
    image = generate(lib.base, text, GenerateConfig(width=lib.base.resolution, height=lib.base.resolution, seed=seed,
                                                    **SAMPLING))[0]
    merged.set([])
    return np.asarray(image, dtype=np.int16)


def warm(lib: Library, http: httpx.Client, clients: int) -> None:
    """Ask for every concept once (slot-disjoint groups of up to 8, one step): the replica's cache
    then holds what its budget allows, so a phase measures steady state, not the first fetches."""
    by_slot: dict[int, list[str]] = {}
    for name, (slot, _) in sorted(lib.concepts.items()):
        by_slot.setdefault(slot, []).append(name)
    rounds = max(len(v) for v in by_slot.values())
    groups = [names[i:i + MAX_SUBSET] for r in range(rounds)
              for names in [[v[r] for v in by_slot.values() if r < len(v)]] for i in range(0, len(names), MAX_SUBSET)]
    body = lambda g: {"prompt": "a photo of " + " and ".join(f"{{{n}}}" for n in g), "steps": 1}  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for r in pool.map(lambda g: http.post("/v1/generate", json=body(g)), groups):
            r.raise_for_status()


def serve_phase(lib: Library, http: httpx.Client, clients: int, duration: float, seed: int) -> dict:
    """`clients` threads posting random subsets for `duration` s; latency, throughput, cache deltas,
    and SAMPLED pictures checked against the in-process pipeline."""
    before = http.get("/v1/healthz").json()["replica_cache"]
    results, samples, lock, stop = [], [], threading.Lock(), threading.Event()

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while not stop.is_set():
            names, s = lib.subset(rng), rng.randrange(2**31)
            body = {"prompt": "a photo of " + " and ".join(f"{{{n}}}" for n in names), "seed": s, **SAMPLING}
            t0 = time.perf_counter()
            r = http.post("/v1/generate", json=body)
            dt = time.perf_counter() - t0
            with lock:
                results.append((r.status_code, dt))
                if r.status_code == 200 and len(samples) < SAMPLED and rng.random() < 0.2:
                    samples.append((names, s, r.content))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - t0
    after = http.get("/v1/healthz").json()["replica_cache"]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    ok = sorted(dt for status, dt in results if status == 200)
    wrong = sum(int(np.abs(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
                           - reference(lib, names, s)).max() > TOLERANCE) for names, s, png in samples)
    return {"requests": len(results), "ok": len(ok), "non_200": len(results) - len(ok),
            "rps": round(len(ok) / elapsed, 2), "p50_ms": round(1000 * statistics.median(ok), 1) if ok else None,
            "p99_ms": round(1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1) if ok else None,
            "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
            "cache_held_end": after["held"], "cache_evictions": after["evictions"] - before["evictions"],
            "checked_pictures": len(samples), "wrong_pictures": wrong}


def per_concept(curve: list[dict], key: str) -> float:
    """Slope of `key` between the two largest sizes (the fixed costs cancel)."""
    a, b = curve[-2], curve[-1]
    return (b[key] - a[key]) / (b["concepts"] - a["concepts"])


def plot(curve: list[dict], budgets: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    n = [c["concepts"] for c in curve]
    axes[0].plot(n, [c["coordinator_rss_mb"] for c in curve], "o-", label="coordinator RSS (MB)")
    axes[0].plot(n, [c["state_dir_mb"] for c in curve], "s-", label="state folder (MB)")
    axes[0].set(xscale="log", yscale="log", xlabel="concepts in the library", title="memory and disk")
    axes[0].legend()
    axes[1].plot(n, [c["restart_s"] for c in curve], "o-", label="coordinator restart (s)")
    axes[1].plot(n, [c["upload_per_s"] / 10 for c in curve], "s-", label="uploads per s / 10")
    axes[1].set(xscale="log", xlabel="concepts in the library", title="restart and upload")
    axes[1].legend()
    pct = [b["budget_pct"] for b in budgets]
    axes[2].plot(pct, [b["cache_hit_rate"] for b in budgets], "o-", label="replica cache hit rate")
    axes[2].plot(pct, [b["rps"] / max(x["rps"] for x in budgets) for b in budgets], "s-", label="req/s (relative)")
    axes[2].set(xlabel="cache budget (% of the library)", ylim=(0, 1.05), title=f"serving {n[-1]:,} concepts")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_own(state_dir: Path, admin: str, cache_mb: float) -> tuple[LocalCluster, int]:
    """A private cluster on 127.0.0.1 with the coordinator and the app, the operator's way."""
    cluster = LocalCluster(num_cpus=2, cwd=REPO).start()
    os.environ.update(cluster.auth_env)
    port = free_port()
    env = {**cluster.env, "BLOCKLORA_ADMIN_TOKEN": admin}  # the child reads it; never printed
    subprocess.run([sys.executable, "jobs/start_coordinator.py", "--base-model", "tiny", "--slots",
                    str(ADAPTER.num_slots), "--rank", str(ADAPTER.rank), "--state-dir", str(state_dir), "--address",
                    cluster.address, "--namespace", NAMESPACE, "--name", NAME],
                   cwd=REPO, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
    set_budget(cluster, port, cache_mb)
    return cluster, port


def run(args: argparse.Namespace, state_dir: Path) -> dict:
    admin = os.urandom(24).hex()
    lib = Library(load_base("tiny"))
    cluster, port = start_own(state_dir, admin, 1024.0)
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        actor = coordinator.get(NAME, NAMESPACE)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        per_client = math.ceil(args.sizes[-1] / args.clients)
        tokens = [coordinator.enrol(actor, admin, f"person{k:03d}", quota=per_client) for k in range(args.clients)]
        curve, done = [], 0
        for size in args.sizes:
            rate = upload(lib, http, actor, tokens, done, size)
            done = size
            t0 = time.perf_counter()
            page = http.get("/v1/concepts", params={"limit": 100, "prefix": "c0"}).json()
            list_ms = 1000 * (time.perf_counter() - t0)
            assert page["total"] == size, page["total"]
            rss = psutil.Process(coordinator_pid(cluster.dashboard_url)).memory_info().rss
            point = {"concepts": size, "upload_per_s": round(rate, 1), "coordinator_rss_mb": round(rss / 2**20, 1),
                     "state_dir_mb": round(folder_bytes(state_dir) / 2**20, 2), "list_page_ms": round(list_ms, 1)}
            point["restart_s"] = round(restart_seconds(actor, cluster.dashboard_url), 2)
            library_mb = size * lib.bytes_per_concept / 2**20
            set_budget(cluster, port, library_mb)
            warm(lib, http, args.http_clients)
            point["serve_full_budget"] = serve_phase(lib, http, args.http_clients, args.duration, size)
            curve.append(point)
            print(json.dumps(point), flush=True)
        budgets = []
        for pct in (50, 10):
            set_budget(cluster, port, pct / 100 * args.sizes[-1] * lib.bytes_per_concept / 2**20)
            warm(lib, http, args.http_clients)
            budgets.append({"budget_pct": pct, **serve_phase(lib, http, args.http_clients, args.duration, pct)})
            print(json.dumps(budgets[-1]), flush=True)
        budgets.append({"budget_pct": 100, **curve[-1]["serve_full_budget"]})  # measured above
        budgets.sort(key=lambda b: b["budget_pct"])
        http.close()
    finally:
        ray.shutdown()
        cluster.stop()
    # the state load alone, in this process, on the folder the coordinator left: what a restart adds
    # per concept (the restart above is mostly a new process importing torch, and noisy on a shared box)
    t0 = time.perf_counter()
    Registry(lib.space, FederationConfig(), StateStore(state_dir)).close()
    load_s = time.perf_counter() - t0
    n = curve[-1]["concepts"]
    slopes = {key: per_concept(curve, key) for key in ("coordinator_rss_mb", "state_dir_mb")}
    slopes["restart_s"] = load_s / n  # an upper bound: the load's fixed cost counted per concept
    projection = {key: round(curve[-1][key] + slope * (100_000 - n), 1) for key, slope in slopes.items()}
    return {"curve": curve, "budgets": budgets, "bytes_per_concept_replica": lib.bytes_per_concept,
            "state_load_s": round(load_s, 2), "per_concept": slopes, "projected_at_100000": projection,
            "wrong_pictures": sum(p["serve_full_budget"]["wrong_pictures"] for p in curve)
            + sum(b["wrong_pictures"] for b in budgets if b["budget_pct"] != 100)}


def write_readme(result: dict, out: Path) -> None:
    rows = "\n".join(f"| {c['concepts']:,} | {c['upload_per_s']} | {c['coordinator_rss_mb']} | {c['state_dir_mb']} | "
                     f"{c['restart_s']} | {c['list_page_ms']} | {c['serve_full_budget']['rps']} | "
                     f"{c['serve_full_budget']['p50_ms']} / {c['serve_full_budget']['p99_ms']} | "
                     f"{c['serve_full_budget']['cache_hit_rate']} |" for c in result["curve"])
    budgets = "\n".join(f"| {b['budget_pct']}% | {b['rps']} | {b['p50_ms']} / {b['p99_ms']} | {b['cache_hit_rate']} | "
                        f"{b['cache_evictions']} | {b['wrong_pictures']} of {b['checked_pictures']} |"
                        for b in result["budgets"])
    p = result["projected_at_100000"]
    (out / "README.md").write_text(f"""# The concept library at scale

`{result['command']}` — generated; {result['env']['cpu_count']} CPUs, load {result['env']['load_avg_1min']:.1f} at the
start (the machine is shared), tiny base, K = {ADAPTER.num_slots}, rank {ADAPTER.rank}, {result['http_clients']} HTTP
clients for {result['duration_s']} s per phase, subsets of 1-{MAX_SUBSET} concepts in distinct slots,
{SAMPLING['steps']} denoising steps.

| concepts | uploads/s | coordinator RSS MB | state folder MB | restart s | list page ms | req/s | p50 / p99 ms \
| cache hit rate |
|---|---|---|---|---|---|---|---|---|
{rows}

At {result['curve'][-1]['concepts']:,} concepts, by the replica's cache budget (share of the library's factor bytes):

| budget | req/s | p50 / p99 ms | hit rate | evictions | wrong pictures |
|---|---|---|---|---|---|
{budgets}

The restart column is a new coordinator process from SIGKILL to its first answer, mostly Python and
torch starting on a loaded machine; the state load alone (records checked, every artifact file
hashed, collection members parsed), timed in-process on the final folder: {result['state_load_s']} s for
{result['curve'][-1]['concepts']:,} concepts. Per concept (RSS and folder: the slope between the two largest sizes;
restart: the state load / concepts), projected to 100,000 concepts: coordinator RSS
{p['coordinator_rss_mb']} MB, state folder {p['state_dir_mb']} MB, restart {p['restart_s']} s.

![library scale](library_scale.png)
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 100, 1000], help="library sizes to measure at")
    p.add_argument("--clients", type=int, default=50, help="people uploading (each its own client token)")
    p.add_argument("--http-clients", type=int, default=16, help="concurrent HTTP clients while serving")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each serving phase")
    p.add_argument("--quick", action="store_true", help="sizes 8 24, 4 clients, 3 HTTP clients, 5 s phases")
    p.add_argument("--out", default=str(RESULTS_DIR / "library-scale"))
    args = p.parse_args()
    if args.quick:
        args.sizes, args.clients, args.http_clients, args.duration = [8, 24], 4, 3, 5.0
    if len(args.sizes) < 2 or args.sizes != sorted(set(args.sizes)) or args.sizes[0] < 1 or args.clients < 1:
        p.error("--sizes needs two or more increasing sizes, and --clients >= 1")
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the cluster we started
    with tempfile.TemporaryDirectory(prefix="blocklora-library-") as tmp:
        result = run(args, Path(tmp) / "state")
    result = {"benchmark": "library_scale", "command": " ".join(["python -m benchmarks.library_scale", *sys.argv[1:]]),
              "sizes": args.sizes, "clients": args.clients, "http_clients": args.http_clients,
              "duration_s": args.duration, "base": "tiny",
              "adapter": {"rank": ADAPTER.rank, "num_slots": ADAPTER.num_slots},
              "sampling": SAMPLING, "tolerance_uint8": TOLERANCE, **result, "env": environment("cpu", torch.float32)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    plot(result["curve"], result["budgets"], out / "library_scale.png")
    write_readme(result, out)
    emit(result)


if __name__ == "__main__":
    main()

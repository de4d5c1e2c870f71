"""Serve the federation over HTTP: generation with any subset of the live concepts, under /v1.

    python jobs/serve_up.py --address auto --host 127.0.0.1 --port 8000 [--namespace blocklora] \
        [--coordinator blocklora-coordinator] [--replicas 1] [--api-key-file FILE] [--dtype float16] \
        [--concept-cache-mb 1024] \
        [--generator-resource serve_gpu --ingress-resource head_services]   # on a cluster.yaml cluster
        [--trusted-proxy 10.0.0.5]   # a reverse proxy whose X-Forwarded-For is believed

Needs a running cluster and the coordinator (jobs/start_coordinator.py), or one starting: its replicas
wait up to federation.coordinator.START_WAIT_S for the coordinator's name. The app keeps running after
this script exits; `serve shutdown` (or `serve.delete("blocklora")`) stops it. Docs: /v1/docs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a plain script
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
from ray import serve  # noqa: E402

import blocklora  # noqa: E402
import federation  # noqa: E402
import serve as serve_pkg  # noqa: E402
from blocklora.config import PrecisionConfig, add_flags, from_args  # noqa: E402
from federation.coordinator import DEFAULT_NAME, DEFAULT_NAMESPACE  # noqa: E402
from serve.app import AppArgs, build, start_http  # noqa: E402

APP_NAME = "blocklora"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="the coordinator's Ray namespace")
    p.add_argument("--coordinator", default=DEFAULT_NAME, help="the coordinator actor's name")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (one base copy each)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per generator replica")
    p.add_argument("--api-key-file", help="file holding the API key /v1/generate will require (default: open)")
    for name, kind in (("generator_resource", str), ("ingress_resource", str), ("max_pixel_steps", int),
                       ("concept_cache_mb", float)):
        field = AppArgs.model_fields[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default, help=field.description)
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS_OR_CIDR",
                   help=AppArgs.model_fields["trusted_proxies"].description + "; repeat for several")
    add_flags(p, PrecisionConfig)
    args = p.parse_args()

    api_key = Path(args.api_key_file).read_text().strip() if args.api_key_file else None
    # the code travels with the job (Serve replicas inherit its runtime_env): no install on the nodes
    code = [str(Path(m.__file__).parent) for m in (blocklora, federation, serve_pkg)]
    ray.init(address=args.address, log_to_driver=False, runtime_env={"py_modules": code})
    start_http(args.host, args.port)
    serve.run(build(AppArgs(coordinator=args.coordinator, namespace=args.namespace, api_key=api_key,
                            replicas=args.replicas, num_cpus=args.num_cpus, trusted_proxies=args.trusted_proxy,
                            generator_resource=args.generator_resource, ingress_resource=args.ingress_resource,
                            max_pixel_steps=args.max_pixel_steps, concept_cache_mb=args.concept_cache_mb,
                            dtype=from_args(PrecisionConfig, args, p).dtype)),
              name=APP_NAME, route_prefix="/")
    print(f"serving on http://{args.host}:{args.port}/v1 (docs: /v1/docs; the page: http://{args.host}:{args.port}/), "
          f"following coordinator {args.coordinator!r} in namespace {args.namespace!r}")


if __name__ == "__main__":
    main()

"""The application: the generator deployment bound into the ingress, from typed arguments.

    serve run --working-dir . serve.app:build coordinator=blocklora-coordinator namespace=blocklora
or `python jobs/serve_up.py`, which also pins the HTTP host and port and ships the code.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve import Application

from blocklora.config import PrecisionConfig
from federation.coordinator import DEFAULT_NAME, DEFAULT_NAMESPACE
from serve.generator import DEFAULT_CACHE_MB, Generator
from serve.ingress import Ingress
from serve.schemas import MAX_PIXEL_STEPS


class AppArgs(BaseModel):
    coordinator: str = Field(DEFAULT_NAME, description="name of the coordinator actor to follow")
    namespace: str = Field(DEFAULT_NAMESPACE, description="its Ray namespace")
    api_key: str | None = Field(None, min_length=32, description="if set, /v1/generate and /v1/lora need "
                                                                  "'Authorization: Bearer <key>'; at least 32 "
                                                                  "characters, random (secrets.token_urlsafe(32))")
    replicas: int = Field(1, ge=1, description="generator replicas, each with its own copy of the base")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per generator replica")
    device: str | None = Field(None, description="torch device of the replicas; default CUDA if present")
    generator_resource: str | None = Field(None, description="custom resource each generator replica takes one "
                                                             "unit of, e.g. serve_gpu on a cluster.yaml cluster "
                                                             "(default: none, any node)")
    ingress_resource: str | None = Field(None, description="custom resource the ingress takes a sliver of, e.g. "
                                                           "head_services to keep it on the head (default: any node)")
    dtype: str = Field(PrecisionConfig.dtype, description=dataclasses.fields(PrecisionConfig)[0].metadata["help"])
    max_pixel_steps: int = Field(MAX_PIXEL_STEPS, ge=1, description="most one /v1/generate request may cost: "
                                                                     "width x height x steps x images, each "
                                                                     "image-step weighted by how many native-size "
                                                                     "images it holds (attention is quadratic)")
    concept_cache_mb: float = Field(DEFAULT_CACHE_MB, ge=0, description="MiB of concept factors each generator "
                                                                        "replica holds (least recently used out)")
    trusted_proxies: list[str] = Field(default_factory=list, description="addresses or networks (CIDR) of reverse "
                                                                         "proxies in front of the HTTP port whose "
                                                                         "X-Forwarded-For is believed (default: "
                                                                         "none; an SSH tunnel adds no header)")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        return PrecisionConfig(dtype=dtype).dtype  # its ValueError names the allowed dtypes

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: list[str]) -> list[str]:
        for p in proxies:
            ipaddress.ip_network(p, strict=False)  # ValueError: "'x' does not appear to be an IPv4 or IPv6 network"
        return proxies


INGRESS_SHARE = 0.01  # of `ingress_resource`: the ingress is light, and the head's services share one unit
# Serve's HTTP proxy (uvicorn) replaces a request's client address by its X-Forwarded-For whenever the
# peer is 127.0.0.1 (uvicorn's default FORWARDED_ALLOW_IPS), so every local user, and everyone behind an
# SSH tunnel, could pose as any address. Started with this, it believes no forwarded header: the
# ingress reads them itself, from the proxies the operator names (`AppArgs.trusted_proxies`).
PROXY_ENV = {"FORWARDED_ALLOW_IPS": ""}
# glibc raises its mmap and trim thresholds (up to 32 MiB) each time a large block is freed, after which
# freed blocks stay in the heap: the ingress, which receives upload bodies as ~256 KB messages, kept
# hundreds of MB after a burst of uploads. Pinned at their defaults, every freed message goes back to
# the system (docs/security.md, issue #40.8); other C libraries ignore these variables.
INGRESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# Serve's replica life cycle, tuned for a small federation's few replicas (both are cheap polls):
# a stopping replica checks whether its requests are done every SHUTDOWN_POLL_S (Serve's 2 s is slept
# once even when none is left), and the controller pings each replica every HEALTH_POLL_S (Serve's
# 10 s): a replica that died is seen, and its replacement started, up to 8 s sooner.
SHUTDOWN_POLL_S, HEALTH_POLL_S = 0.5, 2.0
LIFE_CYCLE = {"graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S, "health_check_period_s": HEALTH_POLL_S}


def build(args: AppArgs) -> Application:
    """The app; with `generator_resource` / `ingress_resource` set, Ray places each part on the node
    type that advertises it (cluster.yaml: replicas on serve_gpu nodes, the ingress on the head)."""
    on = lambda name, amount: {"resources": {name: amount}} if name else {}  # noqa: E731
    generator = Generator.options(num_replicas=args.replicas, **LIFE_CYCLE,
                                  user_config={**Generator.user_config, "concept_cache_mb": args.concept_cache_mb},
                                  ray_actor_options={"num_cpus": args.num_cpus, **on(args.generator_resource, 1)})
    ingress = Ingress.options(**LIFE_CYCLE,
                              ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ENV},
                                                 **on(args.ingress_resource, INGRESS_SHARE)})
    return ingress.bind(generator.bind(args.coordinator, args.namespace, args.device, args.dtype),
                        args.coordinator, args.namespace, args.api_key, args.max_pixel_steps,
                        tuple(args.trusted_proxies))


def start_http(host: str, port: int, **options) -> None:
    """Start Serve's HTTP proxy on `host`:`port` the way this app needs it (PROXY_ENV); `options`:
    more `serve.start` arguments, e.g. proxy_location. Where Serve already runs on the cluster, its
    proxy is kept as it was started."""
    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": PROXY_ENV}}, **options)

"""cluster.yaml through Ray's own cluster-config validation (the code path `ray up` runs)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation():
    cfg = prepare_config(copy.deepcopy(CONFIG))
    validate_config(cfg)
    assert cfg["head_node_type"] == "head"
    assert {"client_gpu", "serve_gpu"} <= set(cfg["available_node_types"])


def test_validation_is_real():
    broken = copy.deepcopy(CONFIG)
    broken["available_node_types"]["client_gpu"]["resources"] = "four gpus"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_token_auth_on_every_ray_start_and_nothing_public():
    starts = [c for c in CONFIG["head_start_ray_commands"] + CONFIG["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert all("0.0.0.0" not in c for c in starts)
    ranges = [r["CidrIp"] for p in CONFIG["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert "0.0.0.0/0" not in ranges
    resources = {n: t["resources"] for n, t in CONFIG["available_node_types"].items()}
    assert resources["client_gpu"]["client_node"] == 1 and resources["serve_gpu"]["GPU"] >= 1


def test_local_cluster_reads_the_node_types_custom_resources():
    """What the local multi-node cluster (devtools.local_cluster) gives each node type."""
    from devtools.local_cluster import node_types
    assert node_types() == {"head": {"head_services": 1.0}, "client_gpu": {"client_node": 1.0},
                            "serve_gpu": {"serve_gpu": 1.0}}

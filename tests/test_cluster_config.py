"""cluster.yaml (and the Azure variant in docs/cluster.md) against Ray's own cluster-config schema,
plus the promises the docs make about it: the torch pin, V100-capable CUDA build, node types,
token authentication and the MLflow server.

Validation runs what `ray up` runs before it touches a cloud: ``prepare_config`` (merge the
provider's defaults) then ``validate_config`` (jsonschema against ``ray/autoscaler/ray-schema.json``
plus Ray's cross-field checks). The raw file is also checked against the schema directly, so a key
the defaults would paper over is still caught.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

# GPUs per instance type used in cluster.yaml and the docs' Azure variant (all V100).
V100_INSTANCES = {
    "p3.2xlarge": 1,
    "p3.8xlarge": 4,
    "p3.16xlarge": 8,
    "Standard_NC6s_v3": 1,
    "Standard_NC12s_v3": 2,
    "Standard_NC24s_v3": 4,
}
# PyTorch CUDA builds that still ship sm_70 kernels for torch 2.12–2.14 (RELEASE.md support matrix):
# the cu128 builds dropped Volta in 2.11, the cu13x builds never had it.
VOLTA_CUDA_BUILDS = {"cu126"}


def _load(path: Path = CLUSTER) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` checks before launching anything; returns the prepared config."""
    jsonschema.validate(config, SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _instance_type(node_type: dict) -> str:
    node_config = node_type["node_config"]
    return node_config.get("InstanceType") or node_config["azure_arm_parameters"]["vmSize"]


def _azure_variant() -> dict:
    """cluster.yaml with the docs' Azure block swapped in, as the docs tell users to do."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)
    azure = [yaml.safe_load(b) for b in blocks if "type: azure" in b]
    assert len(azure) == 1, "docs/cluster.md should hold exactly one Azure YAML block"
    return {**_load(), **azure[0]}


def _pinned(requirement_name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{re.escape(requirement_name)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml does not pin {requirement_name}==")


# --- schema -----------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation():
    prepared = _ray_up_checks(_load())
    assert prepared["head_node_type"] == "head"


def test_azure_variant_in_docs_passes_rays_own_validation():
    prepared = _ray_up_checks(_azure_variant())
    assert prepared["provider"]["type"] == "azure"


def _broken(mutate) -> dict:
    config = copy.deepcopy(_load())
    mutate(config)
    return config


BROKEN = [
    ("typo in a top-level key", lambda c: c.__setitem__("max_worker", c.pop("max_workers")),
     jsonschema.ValidationError),
    ("fractional GPU in a node type", lambda c: c["available_node_types"]["gpu_1xv100"]
     .__setitem__("resources", {"CPU": 8, "GPU": 0.5}), jsonschema.ValidationError),
    ("node type without resources", lambda c: c["available_node_types"]["gpu_4xv100"].pop("resources"),
     jsonschema.ValidationError),
    ("unknown key in a node type", lambda c: c["available_node_types"]["head"]
     .__setitem__("instance_type", "m5.2xlarge"), jsonschema.ValidationError),
    ("setup command that is not a string", lambda c: c["setup_commands"].append(["pip", "install"]),
     jsonschema.ValidationError),
    ("head type that does not exist", lambda c: c.__setitem__("head_node_type", "head_node"), ValueError),
    ("more minimum workers than the cap", lambda c: c["available_node_types"]["gpu_1xv100"]
     .__setitem__("min_workers", c["max_workers"] + 1), ValueError),
]


@pytest.mark.parametrize("mutate,error", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_copy_fails_validation(mutate, error):
    with pytest.raises(error):
        _ray_up_checks(_broken(mutate))


# --- node types -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [_load(), _azure_variant()], ids=["aws", "azure"])
def test_node_types_are_consistent(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    # The head runs drivers and MLflow only: GPU work must never be scheduled there.
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        instance = _instance_type(node_type)
        assert instance in V100_INSTANCES, f"{name}: {instance} is not a V100 instance"
        assert node_type["resources"]["GPU"] == V100_INSTANCES[instance], name
        # Autoscaling from zero: no GPU node is paid for while no job needs one.
        assert node_type.get("min_workers", 0) == 0, name
        assert node_type.get("max_workers", 0) >= 1, name
    assert {V100_INSTANCES[_instance_type(t)] for t in gpu_types.values()} >= {1, 4}


def test_worker_caps_fit_under_the_global_cap():
    config = _load()
    per_type = [t.get("max_workers", 0) for n, t in config["available_node_types"].items()
                if n != config["head_node_type"]]
    assert all(0 < m <= config["max_workers"] for m in per_type)
    assert 0 < config["idle_timeout_minutes"] <= 60


# --- installation -----------------------------------------------------------------------------


def _commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


def test_setup_installs_the_pinned_torch_release_from_a_volta_capable_cuda_index():
    pinned = _pinned("torch")
    torch_installs = [c for c in _load()["setup_commands"] if re.search(r"\btorch==", c)]
    assert len(torch_installs) == 1, torch_installs
    (cmd,) = torch_installs
    assert re.findall(r"\btorch==([\w.]+)", cmd) == [pinned], f"cluster.yaml installs {cmd}, pyproject pins {pinned}"
    index = re.search(r"--index-url\s+https://download\.pytorch\.org/whl/(cu\d+)\b", cmd)
    assert index, "torch must come from the PyTorch CUDA index, not PyPI's default (CUDA 13, no sm_70)"
    assert index.group(1) in VOLTA_CUDA_BUILDS


def test_setup_installs_igconda_after_torch():
    setup = _load()["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    igconda_at = next(i for i, c in enumerate(setup) if re.search(r"install .*-e\s+~/igconda\b", c))
    assert torch_at < igconda_at  # else pip resolves torch from PyPI first
    assert "~/igconda" in _load()["file_mounts"]


def test_local_ray_matches_the_version_the_cluster_installs():
    # The cluster gets Ray from pyproject's pin; `ray up`/`ray job submit` need the same release.
    assert ray.__version__ == _pinned("ray")


def test_no_command_uses_an_unpinned_torch_or_ray_install():
    for cmd in _commands(_load()):
        assert not re.search(r"install[^|;&]*\s(torch|ray)(\[[^\]]*\])?(\s|$)", cmd), cmd


# --- auth and services ------------------------------------------------------------------------


def test_token_authentication_is_on_for_every_node():
    config = _load()
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    everything = "\n".join(_commands(config))
    assert "RAY_AUTH_MODE=disabled" not in everything


def test_head_starts_ray_and_an_mlflow_server_with_sqlite_and_s3():
    head = "\n".join(_load()["head_start_ray_commands"])
    assert "ray start --head" in head
    mlflow = re.search(r"mlflow server (.*)", head)
    assert mlflow, "no mlflow server on the head"
    assert "--backend-store-uri sqlite:///" in mlflow.group(1)
    assert re.search(r"--(artifacts-destination|default-artifact-root) s3://", mlflow.group(1))


def test_docs_show_each_job_with_ray_job_submit():
    text = DOCS.read_text()
    for job in ("preprocess", "train", "tune", "infer", "pipeline"):
        assert re.search(rf"ray job submit --address http://\S+:8265 --working-dir \. -- \\\s*\n\s*"
                         rf"python -m ray_jobs\.{job} ", text), job
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "~/.ray/auth_token"):
        assert var in text


@pytest.mark.parametrize("config", [_load(), _azure_variant()], ids=["aws", "azure"])
def test_every_command_is_valid_bash(config):
    for cmd in _commands(config):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd}\n{result.stderr}"


def test_head_installs_boto3_for_the_autoscaler_and_mlflow_s3():
    # Ray's AWS defaults install boto3 in head_setup_commands; overriding them must keep it.
    assert any(re.search(r"install .*\bboto3\b", c) for c in _load()["head_setup_commands"])

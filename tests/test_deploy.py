"""The cluster files in cluster/deploy: the VM launcher config passes Ray's own validation, the KubeRay
RayJob is well formed, and both declare exactly the custom resources that the roles ask for
(`train.role_resources`); the RayJob's entrypoint is a valid `rlhf train` command."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.cli import parser
from cluster.launch import ROLE_RESOURCES
from core.config import load_config

pytestmark = pytest.mark.pure

DEPLOY = Path(__file__).parent.parent / "cluster" / "deploy"
ROOT = DEPLOY.parent.parent
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def test_the_vm_cluster_config_passes_ray_validation_and_hosts_every_role():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on anything Ray's schema refuses
    declared = {r for node in config["available_node_types"].values() for r in node["resources"]} - BUILTIN
    assert declared == set(ROLE_RESOURCES)


def test_the_rayjob_declares_every_role_and_runs_a_valid_train_command():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    declared = set()
    for group in groups:
        raw = group["rayStartParams"].get("resources")
        if raw:  # KubeRay's form: a quoted JSON object, quotes escaped
            declared |= set(json.loads(json.loads(raw)))
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["cpu"]
    assert declared == set(ROLE_RESOURCES)
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == {"learner", "generation"}

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster.cli", "train"]
    args = parser().parse_args(argv[3:])
    cfg = load_config(ROOT / args.config, args.overrides)
    assert cfg.train.role_resources and cfg.train.resume == "auto" and cfg.generation.device == "cuda"


def test_the_head_script_turns_token_authentication_on():
    script = (DEPLOY / "start_head.sh").read_text()
    subprocess.run(["bash", "-n", str(DEPLOY / "start_head.sh")], check=True)
    assert "RAY_AUTH_MODE=token" in script and "get-auth-token --generate" in script
    assert "RAY_JOB_STOP_WAIT_TIME_S" in script and "--metrics-export-port" in script

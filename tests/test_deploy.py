"""The container image and Kubernetes manifests, checked as far as this machine allows (no Docker
engine, no cluster): hadolint, kustomize rendering (kubectl's), Kubernetes schemas, cross-file
invariants, and the image's exact entrypoint command run as PID 1 and stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, EmulatorProcess, facade_env, free_port

from emulator.harness import wait_until_serving

K8S = ROOT / "deploy/k8s"
KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
DOCKERFILE = (ROOT / "Dockerfile").read_text()
KUBERNETES_VERSION = "1.33.0"


def manifests(kustomization: str = "") -> dict[str, dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s/<kustomization>` would apply, rendered by kustomize."""
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / kustomization)], check=True, capture_output=True, text=True
    ).stdout
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(rendered)}


def dockerfile_instruction(name: str) -> list[str]:
    return [
        line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")
    ]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_exec_form_entrypoint() -> None:
    assert dockerfile_instruction("USER")[-1] == "10001:10001"
    assert json.loads(dockerfile_instruction("ENTRYPOINT")[-1]) == ["python", "-m", "service"]
    assert len(dockerfile_instruction("FROM")) == 2  # build stage + runtime stage
    assert "PYTHONUNBUFFERED=1" in DOCKERFILE
    exposed = {int(p) for p in dockerfile_instruction("EXPOSE")[-1].split()}
    config = manifests()["ConfigMap/flexwebchat"]["data"]
    assert exposed == {int(config[k]) for k in ("GRPC_PORT", "METRICS_PORT", "HEALTH_PORT")}


@pytest.mark.parametrize("kustomization", ["", "single-replica"])
def test_rendered_manifests_are_valid_against_the_kubernetes_schema(kustomization: str) -> None:
    docs = manifests(kustomization)
    assert docs
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert set(manifests()) == {
        "ServiceAccount/flexwebchat",
        "ConfigMap/flexwebchat",
        "Deployment/flexwebchat",
        "Service/flexwebchat",
        "Service/flexwebchat-headless",
        "PodDisruptionBudget/flexwebchat",
        "NetworkPolicy/flexwebchat",
    }


def test_single_replica_overlay_drops_redis_and_the_disruption_budget() -> None:
    docs = manifests("single-replica")
    deployment = docs["Deployment/flexwebchat"]["spec"]
    [container] = deployment["template"]["spec"]["containers"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}  # never two in-process limiters at once
    assert {e["name"] for e in container["env"]} == {
        "TWILIO_API_KEY_FILE",
        "TWILIO_API_SECRET_FILE",
    }
    assert "PodDisruptionBudget/flexwebchat" not in docs


def test_deployment_is_hardened_and_probed_on_the_health_port() -> None:
    docs = manifests()
    spec = docs["Deployment/flexwebchat"]["spec"]["template"]["spec"]
    config = docs["ConfigMap/flexwebchat"]["data"]
    [container] = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == int(config["HEALTH_PORT"])
    assert container["readinessProbe"]["grpc"]["service"] == "flexwebchat.v1.WebChatService"
    drain = float(config["SHUTDOWN_DELAY_SECONDS"]) + float(config["SHUTDOWN_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] > drain
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


def test_credentials_are_files_from_the_secret() -> None:
    spec = manifests()["Deployment/flexwebchat"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = container["volumeMounts"][0]["mountPath"]
    assert set(env) == {"TWILIO_API_KEY_FILE", "TWILIO_API_SECRET_FILE", "REDIS_URL_FILE"}
    assert all(path.startswith(mount + "/") for path in env.values())
    assert spec["volumes"][0]["secret"]["secretName"] == "flexwebchat-credentials"
    assert container["image"] == "registry.example.com/flexwebchat:0.1.0"  # set by kustomization


def test_network_policy_allows_only_dns_https_and_redis_egress() -> None:
    policy = manifests()["NetworkPolicy/flexwebchat"]["spec"]
    ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6379)}


def test_the_images_entrypoint_runs_as_pid_1_and_drains_on_sigterm(
    upstream: EmulatorProcess, tmp_path: Path
) -> None:
    """The exact ENTRYPOINT, from /, with the image's environment, in a PID namespace of its own
    where it is PID 1 (as in a container), with credentials from files (as in Kubernetes)."""
    (tmp_path / "api-key").write_text("SK" + "0" * 32)
    (tmp_path / "api-secret").write_text("emulator-api-secret-signs-demo-tokens")
    health_port = free_port()
    env = facade_env(
        upstream.url,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        TWILIO_ACCOUNT_SID="",
        TWILIO_AUTH_TOKEN="",
        TWILIO_API_KEY_FILE=str(tmp_path / "api-key"),
        TWILIO_API_SECRET_FILE=str(tmp_path / "api-secret"),
        HEALTH_PORT=str(health_port),
        SHUTDOWN_DELAY_SECONDS="0.5",
    )
    command = json.loads(dockerfile_instruction("ENTRYPOINT")[-1])
    as_pid_1 = os.geteuid() == 0 and shutil.which("unshare") is not None
    if as_pid_1:
        command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *command]
    proc = subprocess.Popen(
        command, env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            assert wait_until_serving(health_pb2_grpc.HealthStub(channel), proc, timeout=20)  # type: ignore[arg-type]
        service_pid = _child_pid(proc.pid) if as_pid_1 else proc.pid
        if as_pid_1:
            status = Path(f"/proc/{service_pid}/status").read_text()
            [ns_pids] = [line for line in status.splitlines() if line.startswith("NSpid:")]
            assert ns_pids.split()[-1] == "1", "python runs as PID 1 in its namespace"
        os.kill(service_pid, signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode() if proc.stdout else ""
    messages = [json.loads(line)["msg"] for line in output.splitlines() if line.startswith("{")]
    assert messages[0] == "serving" and messages[-2:] == ["draining", "stopped"]


def _child_pid(pid: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


def test_the_docker_build_context_builds_the_package(tmp_path: Path) -> None:
    """What .dockerignore lets into the build context is enough for the image's `pip install .`."""
    context = tmp_path / "context"
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for name in allowed:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(source, context / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(context),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("flexwebchat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "service/__main__.py",
        "service/server.py",
        "flexwebchat/v1/webchat_pb2.py",
        "flexwebchat/v1/webchat_pb2_grpc.py",
        "flexwebchat/v1/webchat_pb2.pyi",
        "flexwebchat/v1/py.typed",
    ):
        assert expected in names

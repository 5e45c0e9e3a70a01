"""docker-compose.yml against the Compose specification, with Debian's ``docker-compose config`` (it validates
and renders without a Docker engine; none runs on these machines), and the deployment's promises checked on the
rendered file: redis, the node and a GPU worker sharing one data volume at one path, the Qdrant server the node
indexes into, Orthanc in its profile; every long-running service with a healthcheck and a pinned image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from config.loader import load_settings

REPO = Path(__file__).resolve().parent.parent


def compose_config(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose missing: run `make setup` (Debian package docker-compose)")
    return subprocess.run(["docker-compose", "-f", str(path), "config"], capture_output=True, text=True, timeout=60,
                          cwd=path.parent, check=False)


@pytest.fixture(scope="module")
def rendered() -> dict:
    result = compose_config(REPO / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_services_and_shared_storage(rendered: dict) -> None:
    services = rendered["services"]
    assert {"redis", "node", "worker"} <= set(services)
    node, worker = services["node"], services["worker"]

    def data_mounts(service: dict) -> set[tuple[str, str]]:
        """(source, target) of each mount; docker-compose 1.x renders the short 'src:dst:mode' form."""
        mounts = set()
        for volume in service["volumes"]:
            if isinstance(volume, str):
                source, target = volume.split(":")[:2]
            else:
                source, target = volume["source"], volume["target"]
            mounts.add((source, target))
        return mounts

    assert ("medfinder-data", "/data") in data_mounts(node) & data_mounts(worker)
    for key in ("MEDFINDER__PATHS__DATA_DIR", "MEDFINDER__WORKERS__BROKER_URL", "MEDFINDER__WORKERS__MODE"):
        assert node["environment"][key] == worker["environment"][key], key
    assert worker["environment"]["MEDFINDER__WORKERS__BROKER_URL"].startswith("redis://redis:")
    assert worker["environment"]["MEDFINDER__WORKERS__MODE"] == "distributed"
    published = [p if isinstance(p, str) else f"{p.get('published')}:{p.get('target')}" for p in node["ports"]]
    assert any(p.endswith(":11112") for p in published), published


def test_worker_reserves_a_gpu_and_consumes_the_gpu_queue(rendered: dict) -> None:
    worker = rendered["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["entrypoint"][:4] == ["celery", "-A", "workers", "worker"]
    assert "gpu" in worker["entrypoint"][worker["entrypoint"].index("-Q") + 1]
    assert worker["build"]["target"] == "gpu"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "AS gpu" in dockerfile and "onnxruntime-gpu==" in dockerfile


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check has teeth: an unknown service key is refused by the same command."""
    broken = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    broken["services"]["node"]["gpus_please"] = True
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = compose_config(path)
    assert result.returncode != 0
    assert "gpus_please" in result.stderr


def test_orthanc_service_is_pinned_and_wired_to_the_node(rendered: dict) -> None:
    """The orthanc profile: a pinned image with the Python plugin, its configuration from `medfinder orthanc
    config` mounted where the generated paths point, and the node sending results to it."""
    services = rendered["services"]
    orthanc, node = services["orthanc"], services["node"]
    image, _, tag = orthanc["image"].partition(":")
    assert image == "jodogne/orthanc-python" and tag and tag != "latest", orthanc["image"]
    assert orthanc["command"] == ["/etc/orthanc-medfinder/orthanc.json"]
    targets = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in orthanc["volumes"]}
    assert {"/etc/orthanc-medfinder", "/var/lib/orthanc/db"} <= targets
    assert "orthanc" in orthanc.get("profiles", [])
    environment = node["environment"]
    assert yaml.safe_load(environment["MEDFINDER__NODE__DESTINATIONS"]) == [
        {"ae_title": "ORTHANC", "host": "orthanc", "port": 4242}]
    assert environment["MEDFINDER__ORTHANC__URL"] == "http://orthanc:8042"
    assert environment["MEDFINDER__API__HTTP_BIND"] == "0.0.0.0"
    published = [p if isinstance(p, str) else f"{p.get('host_ip')}:{p.get('published')}:{p.get('target')}"
                 for p in orthanc["ports"]]
    assert any(p.startswith("127.0.0.1:") and p.split("/")[0].endswith(":8042") for p in published), published


LONG_RUNNING = ("redis", "qdrant", "node", "worker", "orthanc")


def _version(tag: str) -> tuple[int, ...]:
    return tuple(int(part) for part in tag.lstrip("v").split("."))


def test_every_image_is_pinned_and_every_service_has_a_healthcheck(rendered: dict) -> None:
    """A deployment that can be reproduced and supervised: exact image tags (no ``latest``, no bare major), and a
    healthcheck with a real command on each long-running service."""
    services = rendered["services"]
    assert set(LONG_RUNNING) <= set(services)
    for name, service in services.items():
        if "image" in service:
            tag = service["image"].partition(":")[2]
            assert tag and tag != "latest" and tag.count(".") >= 2, f"{name}: {service['image']} is not pinned"
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert {"interval", "timeout", "retries"} <= set(check), name
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert any("/api/v1/healthz" in part for part in services["node"]["healthcheck"]["test"])
    assert any("inspect ping" in part for part in services["worker"]["healthcheck"]["test"])
    assert any("/readyz" in part for part in services["qdrant"]["healthcheck"]["test"])


def test_the_node_indexes_into_the_qdrant_server(rendered: dict) -> None:
    """The full deployment: qdrant/qdrant pinned at 1.16.3 or later (data-loss fixes), storage on its own volume,
    the node's index settings pointing at it, and the node starting only once redis and qdrant are healthy."""
    services = rendered["services"]
    qdrant, node = services["qdrant"], services["node"]
    image, _, tag = qdrant["image"].partition(":")
    assert image == "qdrant/qdrant" and _version(tag) >= (1, 16, 3), qdrant["image"]
    targets = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in qdrant["volumes"]}
    assert "/qdrant/storage" in targets
    assert "qdrant-storage" in rendered["volumes"]
    environment = node["environment"]
    assert environment["MEDFINDER__INDEX__BACKEND"] == "qdrant"
    assert environment["MEDFINDER__INDEX__URL"] == "http://qdrant:6333"
    assert node["depends_on"] == {"redis": {"condition": "service_healthy"},
                                  "qdrant": {"condition": "service_healthy"}}
    assert services["worker"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["orthanc"]["depends_on"]["node"] == {"condition": "service_healthy"}
    assert "MEDFINDER__INDEX__BACKEND" not in services["worker"]["environment"], "workers never open the index"


def test_the_deploy_config_is_valid_settings(rendered: dict) -> None:
    """config/deploy/node.yaml with the compose environment on top loads as this version's settings, for the
    node and for the workers (as the containers load them)."""
    config = REPO / "config" / "deploy" / "node.yaml"
    for name in ("node", "worker"):
        environ = {k: str(v) for k, v in rendered["services"][name]["environment"].items()}
        settings = load_settings(config, environ=environ)
        assert settings.index.backend == "qdrant" and settings.index.url == "http://qdrant:6333", name
        assert settings.workers.mode == "distributed" and settings.paths.data_dir.as_posix().startswith("/data/")

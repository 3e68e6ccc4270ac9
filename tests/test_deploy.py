"""``deploy/``: every manifest loads, and what it says about canary matches canary.

Offline (no cluster, no Docker): each YAML document under ``deploy/`` is parsed, the rollout
files are checked with canary's own loader, and the ports, probes, token, selectors, Redis
address and mounted files the manifests name are checked against those rollout files, the
repository's Dockerfile and the `canary run` and fake-model command lines.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from canary.cli import build_parser
from canary.config import Config, load_config_text
from canary.config._models import is_loopback_host
from canary.runtime import ADVERTISE_ENV
from loadtest.fake_model import build_parser as fake_model_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"


# --- loading ---------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping: {doc!r}"
    return docs


def _k8s_documents() -> list[dict[str, Any]]:
    return [d for p in _yaml_files() if K8S in p.parents for d in _documents(p)]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _k8s_documents() if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _load_rollout(text: str, source: str) -> Config:
    """The rollout file as canary loads it (ConfigError, listing every issue, if invalid)."""
    return load_config_text(text, source)


def _k8s_rollout_text() -> str:
    text = _k8s("ConfigMap", "canary-rollout")["data"]["rollout.yaml"]
    assert isinstance(text, str)
    return text


def _compose() -> dict[str, Any]:
    (doc,) = _documents(COMPOSE)
    return doc


def _compose_rollout_path() -> Path:
    """The host file behind ``-c`` of the compose canary service (through its bind mount)."""
    service = _compose()["services"]["canary-1"]
    args = build_parser().parse_args(["run", *service["command"]])
    return _host_path(service, args.config)


def _rollouts() -> Iterator[tuple[str, str]]:
    yield "kubernetes", _k8s_rollout_text()
    yield "compose", _compose_rollout_path().read_text(encoding="utf-8")


def _port(value: Any) -> int:
    assert isinstance(value, int) and 0 < value < 65536, value
    return value


# --- every document --------------------------------------------------------------------------


def test_every_yaml_document_under_deploy_loads() -> None:
    files = _yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert "compose/compose.yaml" in names and "compose/prometheus.yml" in names
    kinds: list[str] = []
    for doc in _k8s_documents():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc
        # Namespace-less: `kubectl apply -n NAMESPACE` (or the current one) decides.
        assert "namespace" not in doc["metadata"], doc["metadata"]
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Secret"] + ["Service"] * 3
    )


def test_rollout_files_load_with_canarys_own_loader() -> None:
    for where, text in _rollouts():
        config = _load_rollout(text, where)
        assert config.state.backend == "redis"
        assert config.state.url == yaml.safe_load(text)["state"]["url"]


@pytest.mark.parametrize("where", ["kubernetes", "compose"])
def test_rollout_file_serves_off_loopback_with_a_token(where: str) -> None:
    config = _load_rollout(dict(_rollouts())[where], where)
    # Reached from other pods and containers (probes, Prometheus, the load balancer): wildcard
    # addresses; a public admin API needs a token, and these do not opt out of it.
    assert not is_loopback_host(config.proxy.listen[0])
    assert not is_loopback_host(config.admin.listen[0])
    assert config.admin.token_env == "CANARY_ADMIN_TOKEN"
    assert not config.admin.allow_public_without_token


# --- Kubernetes ------------------------------------------------------------------------------


def _canary_deployment() -> dict[str, Any]:
    return _k8s("Deployment", "canary")


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    return dict(found)


def _container_port(container: dict[str, Any], ref: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container's port number."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if isinstance(ref, str):
        assert ref in ports, f"no container port named {ref!r} in {sorted(ports)}"
        return _port(ports[ref])
    assert ref in ports.values(), f"{ref} is not a container port: {ports}"
    return _port(ref)


def _image_entrypoint() -> list[str]:
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    (line,) = [x for x in lines if x.startswith("ENTRYPOINT ")]
    entrypoint = json.loads(line.removeprefix("ENTRYPOINT "))
    assert isinstance(entrypoint, list)
    return [str(x) for x in entrypoint]


def test_deployment_runs_the_configmap_rollout_file_and_watches_it() -> None:
    deployment = _canary_deployment()
    assert deployment["spec"]["replicas"] == 3  # the scale-out; see its comment on safety
    container = _container(deployment, "canary")
    assert _image_entrypoint() == ["canary", "run"]  # so `args` are `canary run`'s
    args = build_parser().parse_args(["run", *container["args"]])
    assert args.watch_config is not None and args.watch_config > 0
    config_file = PurePosixPath(args.config)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (rollout,) = [
        name
        for name, v in volumes.items()
        if v.get("configMap", {}).get("name") == "canary-rollout"
    ]
    mount = mounts[rollout]
    # A directory mount: the kubelet updates it in place (a subPath mount never changes).
    assert "subPath" not in mount and mount.get("readOnly") is True
    assert PurePosixPath(mount["mountPath"]) == config_file.parent
    items = {i["path"]: i["key"] for i in volumes[rollout]["configMap"].get("items", [])}
    assert items.get(config_file.name, config_file.name) == "rollout.yaml"
    # Every mount has its volume.
    assert set(mounts) <= set(volumes)


def test_container_ports_and_probes_match_the_rollout_file() -> None:
    config = _load_rollout(_k8s_rollout_text(), "kubernetes")
    container = _container(_canary_deployment(), "canary")
    proxy_port, admin_port = config.proxy.listen[1], config.admin.listen[1]
    assert _container_port(container, "proxy") == proxy_port
    assert _container_port(container, "admin") == admin_port
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert _container_port(container, ready["port"]) == admin_port
    live = container["livenessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    assert _container_port(container, live["port"]) == admin_port
    if "startupProbe" in container:
        start = container["startupProbe"]["httpGet"]
        assert start["path"] == "/healthz"
        assert _container_port(container, start["port"]) == admin_port


def test_admin_token_comes_from_the_secret_under_the_token_env_name() -> None:
    config = _load_rollout(_k8s_rollout_text(), "kubernetes")
    container = _container(_canary_deployment(), "canary")
    env = {e["name"]: e for e in container["env"]}
    assert config.admin.token_env in env
    ref = env[config.admin.token_env]["valueFrom"]["secretKeyRef"]
    secret = _k8s("Secret", ref["name"])
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert ref["key"] in keys
    assert ref["key"] == config.admin.token_env
    assert not ref.get("optional", False)  # without it canary must not start


def test_each_pod_advertises_its_admin_api_for_forwarded_commands() -> None:
    """A follower forwards operator commands to the leader's advertised admin URL: the pod's
    own IP (downward API) on the rollout file's admin port."""
    config = _load_rollout(_k8s_rollout_text(), "kubernetes")
    env = {e["name"]: e for e in _container(_canary_deployment(), "canary")["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env[ADVERTISE_ENV]["value"] == f"http://$(POD_IP):{config.admin.listen[1]}"
    names = list(env)
    assert names.index("POD_IP") < names.index(ADVERTISE_ENV)  # $(POD_IP) is defined first


def test_every_container_has_resource_requests_and_limits() -> None:
    for name in ("canary", "canary-redis"):
        for container in _k8s("Deployment", name)["spec"]["template"]["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), (name, bound)


def _pods_selected(selector: dict[str, str]) -> list[dict[str, Any]]:
    """The Deployments whose pods carry every label of ``selector``."""
    return [
        d
        for d in _k8s_documents()
        if d["kind"] == "Deployment"
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def test_deployment_selectors_match_their_pods() -> None:
    for doc in _k8s_documents():
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize(
    ("service", "target"),
    [("canary", "proxy"), ("canary-admin", "admin"), ("canary-redis", "redis")],
)
def test_services_select_one_deployment_and_target_its_ports(service: str, target: str) -> None:
    doc = _k8s("Service", service)
    (deployment,) = _pods_selected(doc["spec"]["selector"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = doc["spec"]["ports"]
    assert port["targetPort"] == target
    _container_port(container, port["targetPort"])


def test_services_expose_the_rollout_file_ports() -> None:
    config = _load_rollout(_k8s_rollout_text(), "kubernetes")
    container = _container(_canary_deployment(), "canary")
    (proxy,) = _k8s("Service", "canary")["spec"]["ports"]
    assert _container_port(container, proxy["targetPort"]) == config.proxy.listen[1]
    admin = _k8s("Service", "canary-admin")
    (port,) = admin["spec"]["ports"]
    assert _container_port(container, port["targetPort"]) == config.admin.listen[1]
    notes = admin["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == config.admin.listen[1]
    assert notes["prometheus.io/path"] == "/metrics"


def test_pod_disruption_budget_keeps_two_canary_pods() -> None:
    pdb = _k8s("PodDisruptionBudget", "canary")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 2
    (deployment,) = _pods_selected(pdb["spec"]["selector"]["matchLabels"])
    assert deployment["metadata"]["name"] == "canary"
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]  # a drain can proceed


def test_redis_url_points_at_the_redis_service() -> None:
    url = urlsplit(str(_load_rollout(_k8s_rollout_text(), "kubernetes").state.url))
    assert url.scheme == "redis"
    service = _k8s("Service", "canary-redis")
    assert url.hostname == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    (deployment,) = _pods_selected(service["spec"]["selector"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].split(":")[0] == "redis" and container["image"].startswith("redis:7")
    assert _container_port(container, port["targetPort"]) == 6379


# --- compose ---------------------------------------------------------------------------------


_CANARY_SERVICES = ("canary-1", "canary-2", "canary-3")


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each bind mount; named volumes are left out."""
    out = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The host file a container path of ``service`` is bind-mounted from."""
    path = PurePosixPath(container_path)
    for source, target in _bind_mounts(service):
        target_path = PurePosixPath(target)
        if path == target_path or target_path in path.parents:
            return (COMPOSE_DIR / source / path.relative_to(target_path)).resolve()
    raise AssertionError(f"{container_path} is not mounted from the host")


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port of ``service``'s ``ports``."""
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).rsplit(":", 2)[-2:]
        out[int(container)] = int(host)
    return out


def test_compose_services_and_files_exist() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {
        "redis", "production", "candidate", *_CANARY_SERVICES, "nginx", "prometheus"
    }  # fmt: skip
    named = set(compose.get("volumes", {}))
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert context == ROOT
        for source, _ in _bind_mounts(service):
            assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: named volume {source!r} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency!r}"
    hosts = [p for s in services.values() for p in _published(s).values()]
    assert len(hosts) == len(set(hosts)), f"a host port is published twice: {sorted(hosts)}"


def test_compose_replicas_run_the_rollout_file_on_its_ports() -> None:
    compose = _compose()
    path = _compose_rollout_path()
    assert path == (COMPOSE_DIR / "canary" / "rollout.yaml").resolve()
    config = _load_rollout(path.read_text(encoding="utf-8"), str(path))
    ports = {config.proxy.listen[1], config.admin.listen[1]}
    for name in _CANARY_SERVICES:
        service = compose["services"][name]
        assert service["image"] == "canary:dev"
        args = build_parser().parse_args(["run", *service["command"]])
        assert _host_path(service, args.config) == path
        assert args.watch_config is not None
        assert set(_published(service)) == ports
        assert config.admin.token_env in service["environment"]
        assert {"redis", "production", "candidate"} <= set(service["depends_on"])


def test_compose_redis_url_and_model_endpoints_name_compose_services() -> None:
    compose = _compose()
    services = compose["services"]
    config = _load_rollout(_compose_rollout_path().read_text(encoding="utf-8"), "compose")
    url = urlsplit(str(config.state.url))
    assert url.scheme == "redis" and url.hostname in services and url.port == 6379
    assert services[url.hostname]["image"].startswith("redis:7")
    for rollout in config.rollouts:
        for arm in (rollout.production, rollout.candidate):
            for endpoint in arm.endpoints:
                where = urlsplit(endpoint)
                service = services[str(where.hostname)]
                assert service["entrypoint"] == ["python", "-m", "loadtest.fake_model"]
                args = fake_model_parser().parse_args(service["command"])
                assert args.port == where.port and args.host == "0.0.0.0"
                # The image holds canary only: the fake model is mounted into its working dir.
                module = PurePosixPath(service["working_dir"]) / "loadtest" / "fake_model.py"
                assert _host_path(service, str(module)) == ROOT / "loadtest" / "fake_model.py"


def test_prometheus_scrapes_every_replica_admin_port() -> None:
    service = _compose()["services"]["prometheus"]
    (config_file,) = [
        COMPOSE_DIR / s for s, t in _bind_mounts(service) if t == "/etc/prometheus/prometheus.yml"
    ]
    (prometheus,) = _documents(config_file)
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    admin_port = _load_rollout(_compose_rollout_path().read_text(), "compose").admin.listen[1]
    targets = {t for c in jobs["canary"]["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:{admin_port}" for name in _CANARY_SERVICES}
    assert jobs["canary"].get("metrics_path", "/metrics") == "/metrics"


def test_nginx_spreads_the_proxy_port_over_the_replicas() -> None:
    compose = _compose()
    service = compose["services"]["nginx"]
    (config_file,) = [
        COMPOSE_DIR / s for s, t in _bind_mounts(service) if t == "/etc/nginx/nginx.conf"
    ]
    text = config_file.read_text(encoding="utf-8")
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)
    assert upstream is not None
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(2), re.M))
    proxy_port = _load_rollout(_compose_rollout_path().read_text(), "compose").proxy.listen[1]
    assert servers == {(name, str(proxy_port)) for name in _CANARY_SERVICES}
    assert f"proxy_pass http://{upstream.group(1)};" in text
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", text, re.M)
    assert int(listen) in _published(service)


def test_readme_commands_name_files_that_exist() -> None:
    """The README's deployment commands use these paths; a rename must update it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Deploying", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"deploy/[\w./-]+", section))
    assert "deploy/compose/compose.yaml" in paths and "deploy/kubernetes/" in paths
    for path in paths:
        assert (ROOT / path.rstrip(".")).exists(), path
    services = set(_compose()["services"])
    for line in section.splitlines():
        if line.startswith("docker compose"):
            words = shlex.split(line, comments=True)
            assert words[2:4] == ["-f", "deploy/compose/compose.yaml"], line
            if words[4] == "up":  # the services it names exist
                assert {w for w in words[5:] if not w.startswith("-")} <= services, line

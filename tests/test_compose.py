"""compose.yaml, Dockerfile and .dockerignore, checked without Docker.

compose.yaml is validated against the Compose Specification's JSON Schema (a copy under tests/data, see
tests/data/README.md), then against what the schema cannot know: the commands are this project's entry
points with arguments their parsers accept, dependencies exist and wait on something meaningful, the
worker can be scaled, the image runs as a non-root user.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from atlas_common import check_amqp_url, split_urls

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
CLUSTER_NODES = ("rabbit-1", "rabbit-2", "rabbit-3")
INFRA = {"rabbitmq", "postgres", *CLUSTER_NODES}
CLUSTER_CONF = ROOT / "deploy" / "rabbitmq-cluster" / "rabbitmq.conf"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _project_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _services().items() if name not in INFRA}


def _scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert isinstance(scripts, dict)
    return scripts


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``depends_on`` in either form, as ``{target: condition}``."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_compose_file_matches_the_compose_specification() -> None:
    """compose.yaml is valid under the Compose Specification JSON Schema (draft 2020-12)."""
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_catches_a_broken_compose_file() -> None:
    """The schema check has teeth: an unknown service key and a bad depends_on condition are rejected."""
    compose = _compose()
    compose["services"]["worker"]["replicas_typo"] = 4
    compose["services"]["ingestor"]["depends_on"]["migrate"]["condition"] = "service_finished"
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    paths = {tuple(e.absolute_path) for e in validator.iter_errors(compose)}
    assert ("services", "worker") in paths
    assert ("services", "ingestor", "depends_on") in paths


@pytest.mark.parametrize("name", sorted(_project_services()))
def test_project_service_runs_a_real_entry_point(name: str) -> None:
    """The command is a console script (or python -m of a package here) whose parser accepts its arguments."""
    service = _project_services()[name]
    argv = _argv(service["command"])
    scripts = _scripts()
    if argv[:2] == ["python", "-m"]:
        package, args = argv[2], argv[3:]
        assert (ROOT / package / "__main__.py").is_file(), f"{name}: no package {package} with __main__"
        target = f"{package}.__main__:main"
    else:
        assert argv[0] in scripts, f"{name}: {argv[0]!r} is not one of {sorted(scripts)}"
        target, args = scripts[argv[0]], argv[1:]
    module_name, _, attr = target.partition(":")
    main = getattr(importlib.import_module(module_name), attr)
    assert callable(main)
    cli = importlib.import_module(main.__module__)
    build = getattr(cli, "build_parser", None) or getattr(cli, "_parser", None)
    assert build is not None, f"{name}: no argument parser found in {main.__module__}"
    parser = build()
    assert isinstance(parser, argparse.ArgumentParser)
    parser.parse_args(args)  # argparse exits (SystemExit 2) on an argument it does not accept


def test_project_services_share_the_image_and_environment() -> None:
    """Every project service builds ./Dockerfile and points at the compose services rabbitmq and postgres."""
    services = _services()
    assert (ROOT / "Dockerfile").is_file()
    for name, service in _project_services().items():
        assert service.get("build") == ".", name
        env = service["environment"]
        assert env["LOG_FORMAT"] == "json", name
        assert check_amqp_url(env["AMQP_URL"]) == env["AMQP_URL"], name
        for url in split_urls(env["AMQP_URL"]):  # one node, or every node of the cluster
            amqp = urlsplit(url)
            assert amqp.scheme == "amqp", name
            assert amqp.hostname in services, name
            assert amqp.port == 5672, name
        db = urlsplit(env["DATABASE_URL"])
        assert db.scheme == "postgresql", name
        assert db.hostname in services, name
        assert db.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"], name


def test_dependencies_exist_and_wait_on_something_meaningful() -> None:
    """Every depends_on target exists; service_healthy targets have a healthcheck, completed ones exit."""
    services = _services()
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            assert target in services, f"{name} depends on missing service {target}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s missing healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} must be one-shot"
    assert _depends_on(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ("worker", "ingestor"):
        deps = _depends_on(services[name])
        assert deps["migrate"] == "service_completed_successfully", name
        assert deps["rabbitmq"] == "service_healthy", name
    assert _depends_on(services["producer"])["rabbitmq"] == "service_healthy"


def test_infrastructure_has_healthchecks() -> None:
    """rabbitmq and postgres declare the healthchecks the other services wait on."""
    services = _services()
    assert services["rabbitmq"]["healthcheck"]["test"][1:] == ["rabbitmq-diagnostics", "-q", "ping"]
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "atlas"


def test_worker_is_scalable() -> None:
    """The worker can run as N replicas: no container_name, hostname or ports, and concurrency 32."""
    worker = _services()["worker"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, key
    argv = _argv(worker["command"])
    assert argv[argv.index("--concurrency") + 1] == "32"


def test_volumes_are_declared_and_jsonl_dir_is_the_mount() -> None:
    """Named volumes used by services are declared; the ingestor writes JSONL into its mounted volume."""
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
    assert "pgdata:/var/lib/postgresql/data" in compose["services"]["postgres"]["volumes"]
    ingestor = compose["services"]["ingestor"]
    assert f"jsonl:{ingestor['environment']['INGESTOR_JSONL_DIR']}" in ingestor["volumes"]


def test_demo_producer_is_behind_the_demo_profile() -> None:
    """The producer only runs with --profile demo, so a plain `up` never submits tasks by itself; the
    cluster's services only with --profile cluster; everything else is the plain single-node stack."""
    services = _services()
    assert services["producer"].get("profiles") == ["demo"]
    cluster = {name for name, svc in services.items() if svc.get("profiles") == ["cluster"]}
    assert cluster == {*CLUSTER_NODES, "ingestor-cluster", "worker-cluster"}
    assert all("profiles" not in svc for name, svc in services.items() if name not in {"producer", *cluster})
    assert _argv(services["producer"]["command"])[:4] == ["atlas-producer", "demo", "--count", "1000"]


def test_dockerfile_runs_as_non_root_without_dev_extras() -> None:
    """The image is python:3.11-slim, installs the project without dev extras and runs as user atlas."""
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1] not in {"root", "0", "0:0"}
    assert users[-1] == "atlas"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install --no-cache-dir \S+", runs)
    assert "[dev]" not in runs
    assert ("WORKDIR", "/app") in instructions
    [cmd] = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert cmd[0] in _scripts()


def test_dockerignore_keeps_the_context_small_but_buildable() -> None:
    """.dockerignore drops .venv, var, .git and caches, but keeps what `pip install .` needs."""
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "var", ".git", "**/__pycache__", ".mypy_cache", ".pytest_cache"} <= patterns
    kept = {"pyproject.toml", "README.md", "atlas_common", "schemas", "worker", "producer", "ingestor"}
    assert not kept & patterns
    assert not kept & {p.rstrip("/") for p in patterns}


# -- the cluster profile ---------------------------------------------------------------------------------


def _cluster_conf() -> dict[str, str]:
    """deploy/rabbitmq-cluster/rabbitmq.conf as key -> value (the sysctl-like format RabbitMQ reads)."""
    out: dict[str, str] = {}
    for raw in CLUSTER_CONF.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"not a key = value line: {raw!r}"
            assert key.strip() not in out, f"{key.strip()} set twice"
            out[key.strip()] = value.strip()
    return out


def test_cluster_profile_has_three_nodes_sharing_a_cookie() -> None:
    """rabbit-1..3: the broker image of the single-node stack, a host name each (the node name), a data
    volume each, one Erlang cookie, the cluster's rabbitmq.conf mounted, a healthcheck, AMQP on loopback."""
    services = _services()
    cookies, hostnames, volumes = set(), set(), set()
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["image"] == services["rabbitmq"]["image"], name
        assert node["hostname"] == name
        hostnames.add(node["hostname"])
        cookies.add(node["environment"]["RABBITMQ_ERLANG_COOKIE"])
        mounts = node["volumes"]
        assert f"./{CLUSTER_CONF.relative_to(ROOT)}:/etc/rabbitmq/conf.d/20-atlas-cluster.conf:ro" in mounts
        data = [m for m in mounts if m.endswith(":/var/lib/rabbitmq")]
        assert len(data) == 1, name
        volumes.add(data[0])
        assert node["healthcheck"]["test"][1:] == ["rabbitmq-diagnostics", "-q", "ping"]
        assert all(str(p).startswith("127.0.0.1:") for p in node.get("ports", [])), name
    assert len(hostnames) == len(volumes) == 3
    assert len(cookies) == 1
    [cookie] = cookies
    assert re.fullmatch(r"\$\{ATLAS_ERLANG_COOKIE:-[^}]{20,}\}", cookie), "a cookie the operator can set"


def test_cluster_conf_lists_every_node_for_classic_config_discovery() -> None:
    """The nodes find each other by classic-config peer discovery, and the list is exactly the three
    compose nodes (rabbit@<hostname>)."""
    conf = _cluster_conf()
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    services = _services()
    assert listed == {f"rabbit@{services[name]['hostname']}" for name in CLUSTER_NODES}
    assert conf["cluster_partition_handling"] == "pause_minority"
    assert conf["loopback_users.guest"] == "false"


def test_cluster_services_get_every_node_and_quorum_queues() -> None:
    """ingestor-cluster and worker-cluster run what ingestor and worker run, with all three nodes in
    AMQP_URL (the list tests/test_cluster.py gives its services), quorum queues, and wait for the three
    nodes, never for the single-node broker."""
    services = _services()
    for name, single in (("ingestor-cluster", "ingestor"), ("worker-cluster", "worker")):
        service, plain = services[name], services[single]
        assert service["command"] == plain["command"], name
        assert service["build"] == plain["build"], name
        env = service["environment"]
        hosts = [urlsplit(url).hostname for url in split_urls(env["AMQP_URL"])]
        assert hosts == list(CLUSTER_NODES), name
        assert env.get("ATLAS_QUEUE_TYPE", "quorum") == "quorum", name
        assert env["DATABASE_URL"] == plain["environment"]["DATABASE_URL"], name
        deps = _depends_on(service)
        assert "rabbitmq" not in deps, name
        assert deps == {
            "migrate": "service_completed_successfully",
            **dict.fromkeys(CLUSTER_NODES, "service_healthy"),
        }, name
    for key in ("container_name", "hostname", "ports"):
        assert key not in services["worker-cluster"], key
    ingestor = services["ingestor-cluster"]
    assert f"jsonl:{ingestor['environment']['INGESTOR_JSONL_DIR']}" in ingestor["volumes"]


def test_console_is_published_on_loopback_only() -> None:
    """The console (no login of its own) is reachable from the host's loopback, nowhere else."""
    console = _services()["console"]
    assert _argv(console["command"])[0] == "atlas-console"
    assert console["ports"], "the console publishes its port"
    for port in console["ports"]:
        assert str(port).startswith("127.0.0.1:"), port
    assert console["environment"]["CONSOLE_REQUEUE_ENABLED"].endswith(":-false}")

"""The reference deployment (docker-compose.yml, deploy/): what each service must have.

No Docker engine is needed: the compose file is read with PyYAML (which resolves the `<<:` merges
of the x-* extension fields the way compose does), the Dockerfiles, redis.conf and nginx.conf with
small parsers. `docker compose config` also runs where the compose CLI exists. The monitoring
configs (deploy/prometheus, deploy/grafana) are checked in test_dashboards.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
REDIS_CONF = ROOT / "deploy" / "redis.conf"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
MODEL_TARGET = "/models/model"
GPU_IDS = {"0", "1", "2", "3"}

# A reference to an environment variable: ${NAME}, ${NAME:-default}, ${NAME:?error} (compose) or
# $$NAME (a literal $NAME for the container's shell).
ENV_REF = r"(?:\$\{[A-Z_][A-Z0-9_]*(?::?[-?][^}]*)?\}|\$\$[A-Z_][A-Z0-9_]*)"


def required(name: str) -> str:
    """${NAME:?message}: compose refuses to start without NAME."""
    return rf"\$\{{{name}:\?[^}}]+\}}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name.startswith("worker")}


def api_replicas(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if re.fullmatch(r"api-\d+", name)}


def strings(node: object) -> list[str]:
    """Every string (keys included) anywhere in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


def parse_redis_conf(text: str) -> dict[str, list[str]]:
    """Directive -> its values, in file order (Redis applies the last one of most directives)."""
    conf: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), []).append(value.strip())
    return conf


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    return out


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(svc: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in long form, whichever syntax the file uses."""
    out = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            # a source such as ${MODEL_DIR:?msg} holds a colon of its own
            if vol.startswith("${"):
                end = vol.index("}") + 1
                parts = [vol[:end], *vol[end + 1 :].split(":")]
            source, target, *mode = parts
            out.append({"source": source, "target": target, "read_only": "ro" in mode})
        else:
            out.append(vol)
    return out


def published_ports(svc: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host ip, container port) of each published port."""
    out: list[tuple[str | None, str]] = []
    for port in svc.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port["target"])))
            continue
        port = str(port)
        # host_ip:published:target, with ${VAR:-default} allowed in published
        m = re.fullmatch(
            r"(?:(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):)?(?:([^:]*|\$\{[^}]*\}):)?(\d+)(?:/\w+)?", port
        )
        assert m, f"unrecognised port {port!r}"
        out.append((m.group(1), m.group(3)))
    return out


def dockerfile_of(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    return context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")


# --- redis ---------------------------------------------------------------------------------------


def test_redis_is_private_official_7_and_persistent(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7(?:[.-].*)?", redis["image"]), redis["image"]
    assert "build" not in redis
    assert "ports" not in redis, "Redis must not be published on the host"
    assert "network_mode" not in redis, "host networking would expose Redis"
    data = [m for m in mounts(redis) if m["target"] == "/data"]
    assert len(data) == 1 and data[0]["source"] in compose.get("volumes", {}), "a named volume for /data"


def test_redis_password_comes_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert re.fullmatch(required("REDIS_PASSWORD"), env_of(redis)["REDIS_PASSWORD"])
    command = redis["command"]
    command = " ".join(command) if isinstance(command, list) else command
    m = re.search(r"--requirepass\s+(\S+)", command)
    assert m, "redis-server must be started with --requirepass"
    assert re.fullmatch(rf"\"?{ENV_REF}\"?", m.group(1)), f"--requirepass {m.group(1)} is not a variable"
    assert "REDIS_PASSWORD" in m.group(1)


def test_redis_runs_deploy_redis_conf(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    command = " ".join(command) if isinstance(command, list) else command
    m = re.search(r"redis-server\s+(\S+\.conf)", command)
    assert m, "redis-server must be given a config file"
    conf_mounts = [v for v in mounts(redis) if v["target"] == m.group(1)]
    assert len(conf_mounts) == 1, f"{m.group(1)} is not mounted"
    assert (COMPOSE.parent / conf_mounts[0]["source"]).resolve() == REDIS_CONF
    assert conf_mounts[0].get("read_only") is True


def test_redis_conf_durability_and_no_secret() -> None:
    conf = parse_redis_conf(REDIS_CONF.read_text())
    assert conf["appendonly"][-1] == "yes"
    assert conf["appendfsync"][-1] == "everysec"
    assert conf["maxmemory-policy"][-1] == "noeviction"
    assert conf["protected-mode"][-1] == "yes"
    assert conf["dir"][-1] == "/data", "the AOF must land on the data volume"
    assert "requirepass" not in conf, "the password comes from the environment, never this file"
    assert "masterauth" not in conf
    assert not any(key == "user" for key in conf), "no ACL users with passwords in the file"


def test_parse_redis_conf() -> None:
    conf = parse_redis_conf("# c\nappendonly no\n\n  APPENDONLY yes  \nsave 900 1\nsave 60 100\n")
    assert conf == {"appendonly": ["no", "yes"], "save": ["900 1", "60 100"]}


def test_redis_healthcheck_pings_with_the_password(services: dict[str, dict[str, Any]]) -> None:
    health = services["redis"]["healthcheck"]
    test = health["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in test and "ping" in test.lower()
    assert re.search(r"(?:REDISCLI_AUTH=|-a\s+)\"?\$\$REDIS_PASSWORD", test), "ping must authenticate"
    assert not health.get("disable")


# --- workers -------------------------------------------------------------------------------------


def test_four_workers_one_distinct_gpu_each(services: dict[str, dict[str, Any]]) -> None:
    found: dict[str, str] = {}
    for name, svc in workers(services).items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: exactly one device reservation"
        dev = devices[0]
        assert dev.get("driver") == "nvidia", name
        assert dev.get("capabilities") == ["gpu"], name
        assert "count" not in dev, f"{name}: count and device_ids exclude each other"
        ids = dev.get("device_ids")
        assert isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str), f"{name}: {ids}"
        assert ids[0] not in found.values(), f"{name} shares GPU {ids[0]}"
        found[name] = ids[0]
        assert name == f"worker-gpu{ids[0]}"
        assert svc["command"] == ["localmoe", "worker", "--name", f"gpu{ids[0]}"], name
        assert "gpus" not in svc and "runtime" not in svc, f"{name}: GPUs only via device_ids"
        assert "CUDA_VISIBLE_DEVICES" not in env_of(svc), f"{name}: the reservation pins the GPU"
    assert set(found.values()) == GPU_IDS


def test_workers_differ_only_in_name_and_gpu(services: dict[str, dict[str, Any]]) -> None:
    """They come from one x-worker anchor; a hand-edited copy drifts."""

    def strip(svc: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in svc.items() if k not in ("command", "deploy")}
        dev = dict(svc["deploy"]["resources"]["reservations"]["devices"][0])
        dev.pop("device_ids")
        return {**rest, "device": dev}

    shapes = [strip(svc) for svc in workers(services).values()]
    assert len(shapes) == 4 and all(shape == shapes[0] for shape in shapes)
    assert dockerfile_of(next(iter(workers(services).values()))) == ROOT / "deploy" / "Dockerfile.worker"


# --- the model, dependencies, ports --------------------------------------------------------------


def test_model_is_mounted_read_only_everywhere(services: dict[str, dict[str, Any]]) -> None:
    users = {*api_replicas(services), *workers(services)}
    for name, svc in services.items():
        model = [m for m in mounts(svc) if m["target"] == MODEL_TARGET or "MODEL_DIR" in str(m["source"])]
        for m in model:
            assert m.get("read_only") is True, f"{name}: the model must be mounted read-only"
            assert m["target"] == MODEL_TARGET, name
            assert re.fullmatch(required("MODEL_DIR"), m["source"]), f"{name}: {m['source']}"
        if name in users:
            assert len(model) == 1, f"{name} needs the model"
            assert env_of(svc)["LOCALMOE_MODEL_DIR"] == MODEL_TARGET, name


def test_api_workers_and_flower_wait_for_a_healthy_redis(services: dict[str, dict[str, Any]]) -> None:
    for name in (*api_replicas(services), "flower", "webhooks", *workers(services)):
        depends = services[name].get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on must carry a condition"
        assert depends.get("redis", {}).get("condition") == "service_healthy", name


def test_processes_find_redis_with_the_password(services: dict[str, dict[str, Any]]) -> None:
    urls = {
        name: env_of(services[name])["LOCALMOE_REDIS_URL"]
        for name in (*api_replicas(services), "webhooks", "flower", *workers(services))
    }
    for name, url in urls.items():
        m = re.fullmatch(r"rediss?://:(.+)@redis:6379/\d+", url)
        assert m, f"{name}: {url}"
        assert re.fullmatch(required("REDIS_PASSWORD"), m.group(1)), f"{name}: {url}"


def test_published_ports_bind_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    published = {name: published_ports(svc) for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"nginx", "flower", "prometheus", "grafana"}, "only these reach the host"
    for name, ports in published.items():
        for host_ip, _target in ports:
            assert host_ip == "127.0.0.1", f"{name} is published beyond 127.0.0.1"
    assert published["nginx"] == [("127.0.0.1", "8000")]
    assert published["flower"] == [("127.0.0.1", "5555")]
    assert published["prometheus"] == [("127.0.0.1", "9090")]
    assert published["grafana"] == [("127.0.0.1", "3000")]
    # the API's usual port is nginx's now
    assert services["nginx"]["ports"] == ["127.0.0.1:${API_PORT:-8000}:8000"]


def test_published_ports_parser() -> None:
    svc = {"ports": ["127.0.0.1:${API_PORT:-8000}:8000", "8080:80", "9000", {"target": 1, "host_ip": "::1"}]}
    assert published_ports(svc) == [("127.0.0.1", "8000"), (None, "80"), (None, "9000"), ("::1", "1")]


# --- api and flower ------------------------------------------------------------------------------


def test_api_service(services: dict[str, dict[str, Any]]) -> None:
    replicas = api_replicas(services)
    assert set(replicas) == {"api-1", "api-2"}
    for name, api in replicas.items():
        assert dockerfile_of(api) == ROOT / "deploy" / "Dockerfile.api", name
        assert api.get("command", ["localmoe", "api"]) == ["localmoe", "api"], name
        env = env_of(api)
        assert env["LOCALMOE_API_HOST"] == "0.0.0.0", name
        assert env.get("LOCALMOE_API_PORT", "8000") == "8000", name
        test = api["healthcheck"]["test"]
        assert "/healthz" in " ".join(test if isinstance(test, list) else [test]), name
        assert not api["healthcheck"].get("disable"), name
    # one x-api-replica anchor: the replicas are the same service twice
    assert services["api-1"] == services["api-2"]


def test_flower_has_basic_auth_and_keeps_its_history(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    flower = services["flower"]
    assert flower["command"] == [
        "localmoe",
        "flower",
    ]  # localmoe/flower.py: auth, persistence, no enable_events
    env = env_of(flower)
    assert (env["LOCALMOE_FLOWER_HOST"], env["LOCALMOE_FLOWER_PORT"]) == (
        "0.0.0.0",
        "5555",
    )  # published on loopback
    auth = env["FLOWER_BASIC_AUTH"]
    user = r"(?:\$\{FLOWER_USER(?::-[^}]+)?\}|[\w.-]+)"
    assert re.fullmatch(rf"{user}:{required('FLOWER_PASSWORD')}", auth), auth
    (state,) = [m for m in mounts(flower) if m["target"] == env["LOCALMOE_HOME"] + "/flower"]
    assert state["source"] in compose["volumes"] and not state.get("read_only")
    runs = " ".join(a for i, a in parse_dockerfile(ROOT / "deploy" / "Dockerfile.api") if i == "RUN")
    assert re.search(r"install -d -o 10001 -g 10001 (-m \d+ )?[^&]*/var/lib/localmoe/flower", runs)


def test_every_process_sends_each_job_to_flower_by_default(services: dict[str, dict[str, Any]]) -> None:
    for name in (*api_replicas(services), "webhooks", *workers(services)):
        env = env_of(services[name])
        assert env["LOCALMOE_FLOWER__TASK_EVENTS"] == "${LOCALMOE_FLOWER__TASK_EVENTS:-true}", name
        assert "LOCALMOE_TASK_EVENTS" not in env and "FLOWER_ENABLE_EVENTS" not in env, name
    assert "FLOWER_ENABLE_EVENTS" not in env_of(services["flower"])


# --- no secrets ----------------------------------------------------------------------------------


def test_no_literal_secrets_in_compose(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in env_of(svc).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", key):
                assert re.fullmatch(ENV_REF, value), f"{name}: {key} holds a literal"
            elif key.endswith("_AUTH"):  # user:password
                assert re.fullmatch(rf"(?:{ENV_REF}|[\w.-]+):{ENV_REF}", value), (
                    f"{name}: {key} holds a literal"
                )
    for text in strings(compose):
        for m in re.finditer(r"--requirepass\s+(\S+)", text):
            assert re.fullmatch(rf"\"?{ENV_REF}\"?", m.group(1)), text
        for m in re.finditer(r"rediss?://([^@/\s]*)@", text):
            assert re.fullmatch(rf"[^:]*:{ENV_REF}", m.group(1)), text
        assert not re.search(r"(?i)requirepass\s+[^-\s\"$]", text), text


def test_literal_secret_checks_can_fail() -> None:
    leaky: dict[str, Any] = {"services": {"x": {"environment": {"REDIS_PASSWORD": "hunter2"}}}}
    with pytest.raises(AssertionError):
        test_no_literal_secrets_in_compose(leaky)
    for leaky in (
        {"services": {"x": {"command": "redis-server --requirepass hunter2"}}},
        {"services": {"x": {"environment": ["FLOWER_BASIC_AUTH=admin:hunter2"]}}},
        {"services": {"x": {"environment": {"URL": "redis://:hunter2@redis:6379/0"}}}},
    ):
        with pytest.raises(AssertionError):
            test_no_literal_secrets_in_compose(leaky)


# --- the services, their dependencies and secrets ------------------------------------------------


def test_the_services_of_one_box(services: dict[str, dict[str, Any]]) -> None:
    expected = {"redis", "nginx", "api-1", "api-2", "webhooks", "flower", "prometheus", "grafana"}
    assert set(services) == expected | {f"worker-gpu{i}" for i in sorted(GPU_IDS)}
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        assert "network_mode" not in svc and "privileged" not in svc, name
        if "build" not in svc:  # third-party images are pinned to a version
            assert re.fullmatch(r"[\w./-]+:v?\d+(?:\.\d+)*(?:-[\w.]+)?", svc["image"]), (
                f"{name}: {svc['image']}"
            )


def test_exporters_are_reached_on_the_compose_network_only(services: dict[str, dict[str, Any]]) -> None:
    exporters = {name: "9101" for name in workers(services)} | {"webhooks": "9100"}
    for name, port in exporters.items():
        svc = services[name]
        assert port in [str(p) for p in svc.get("expose", [])], f"{name}: expose {port}"
        assert "ports" not in svc, f"{name} must not be published"
        env = env_of(svc)
        assert env["LOCALMOE_METRICS__HOST"] == "0.0.0.0", f"{name}: the exporter binds loopback by default"
        assert port in (
            env.get("LOCALMOE_METRICS__WORKER_PORT"),
            env.get("LOCALMOE_METRICS__WEBHOOK_PORT"),
        ), name


def test_depends_on_carries_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must carry a condition"
        for dep, how in depends.items():
            assert dep in services, f"{name} depends on {dep}, which is no service"
            condition = how.get("condition")
            assert condition in ("service_healthy", "service_started", "service_completed_successfully"), name
            if condition == "service_healthy":
                health = services[dep].get("healthcheck", {})
                assert health.get("test") and not health.get("disable"), (
                    f"{dep} has no health check for {name}"
                )
    nginx = services["nginx"]["depends_on"]
    assert {k: v["condition"] for k, v in nginx.items()} == {
        "api-1": "service_healthy",
        "api-2": "service_healthy",
    }
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "depends_on" not in services["prometheus"], "Prometheus watches the others come up"


def test_published_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("redis", "nginx", "prometheus", "grafana", *api_replicas(services)):
        health = services[name]["healthcheck"]
        assert not health.get("disable"), name
        test = health["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries"):
            assert key in health, f"{name}: {key}"
    assert "/nginx-healthz" in " ".join(services["nginx"]["healthcheck"]["test"])
    assert "/-/ready" in " ".join(services["prometheus"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["grafana"]["healthcheck"]["test"])


def variable_refs(text: str) -> list[tuple[str, str]]:
    """(NAME, what follows it) for each ${NAME...} compose interpolates; $$ escapes are skipped."""
    return re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)([^}]*)\}", text)


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b")


def test_every_secret_is_required_from_the_environment(compose: dict[str, Any]) -> None:
    text = "\n".join(strings(compose))  # the values compose interpolates, not the comments
    refs = variable_refs(text)
    names = {name for name, _ in refs}
    assert {"REDIS_PASSWORD", "FLOWER_PASSWORD", "GRAFANA_PASSWORD", "LOCALMOE_METRICS_TOKEN_FILE"} <= names
    for name, rest in refs:
        if SECRET_NAME.search(name):
            assert rest.startswith(":?"), f"${{{name}{rest}}}: compose must refuse to start without {name}"
    grafana = env_of(compose["services"]["grafana"])
    assert re.fullmatch(required("GRAFANA_PASSWORD"), grafana["GF_SECURITY_ADMIN_PASSWORD"])
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false" and grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # compose secrets: a file named by a required variable, or a variable required elsewhere
    secrets = compose["secrets"]
    assert set(secrets) == {"metrics_token", "flower_password"}
    for name, secret in secrets.items():
        if "file" in secret:
            assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}", secret["file"]), (
                f"{name}: {secret['file']}"
            )
        else:
            assert re.search(required(secret["environment"]), text), (
                f"{name}: {secret['environment']} is optional"
            )
        users = [svc for svc, s in compose["services"].items() if name in s.get("secrets", [])]
        assert users == ["prometheus"], f"{name} is mounted into {users}"


def test_secret_checks_can_fail() -> None:
    assert variable_refs("a ${X_PASSWORD:-pw} $${Y} ${Z:?set}") == [("X_PASSWORD", ":-pw"), ("Z", ":?set")]
    assert SECRET_NAME.search("LOCALMOE_METRICS_TOKEN_FILE") and not SECRET_NAME.search("FLOWER_USER")


# --- nginx ---------------------------------------------------------------------------------------

Directive = tuple[str, list[str], list[Any]]  # name, arguments, children of a block


def parse_nginx(text: str) -> list[Directive]:
    """nginx.conf as a tree of (name, args, children); comments dropped, quotes kept out."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"(?m)#.*$", "", text))
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    for tok in tokens:
        if tok == ";":
            stack[-1].append((words[0], words[1:], []))
            words = []
        elif tok == "{":
            block: Directive = (words[0], words[1:], [])
            stack[-1].append(block)
            stack.append(block[2])
            words = []
        elif tok == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(tok.strip("\"'"))
    assert len(stack) == 1 and not words, "unbalanced braces"
    return stack[0]


def find(tree: list[Directive], name: str, *args: str) -> list[Directive]:
    return [d for d in tree if d[0] == name and (not args or d[1][: len(args)] == list(args))]


def seconds(value: str) -> int:
    m = re.fullmatch(r"(\d+)([smh]?)", value)
    assert m, value
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def test_parse_nginx() -> None:
    tree = parse_nginx('http { # c\n  map $a $b { default x; "" ""; }\n  server { listen 80; } }')
    (http,) = find(tree, "http")
    assert find(http[2], "server")[0][2] == [("listen", ["80"], [])]
    assert find(http[2], "map")[0][2] == [("default", ["x"], []), ("", [""], [])]


@pytest.fixture(scope="module")
def nginx_http() -> list[Directive]:
    (http,) = find(parse_nginx(NGINX_CONF.read_text()), "http")
    return http[2]


def test_nginx_balances_both_api_replicas(
    nginx_http: list[Directive], services: dict[str, dict[str, Any]]
) -> None:
    (upstream,) = find(nginx_http, "upstream")
    servers = [d[1][0] for d in find(upstream[2], "server")]
    assert sorted(servers) == [f"{name}:8000" for name in sorted(api_replicas(services))]
    (server,) = find(nginx_http, "server")
    (root,) = find(server[2], "location", "/")
    assert find(root[2], "proxy_pass") == [("proxy_pass", [f"http://{upstream[1][0]}"], [])]
    # nginx listens where compose publishes it
    listen = find(server[2], "listen")[0][1][0]
    assert published_ports(services["nginx"]) == [("127.0.0.1", listen)]


def test_nginx_passes_websockets_and_sse_through(nginx_http: list[Directive]) -> None:
    (server,) = find(nginx_http, "server")
    (root,) = find(server[2], "location", "/")
    settings = {d[0]: d[1] for d in root[2] if d[0] != "proxy_set_header"}
    headers = {d[1][0].lower(): d[1][1] for d in find(root[2], "proxy_set_header")}
    assert settings["proxy_http_version"] == ["1.1"]
    assert settings["proxy_buffering"] == ["off"], "SSE: every token passed on as it comes"
    assert settings.get("proxy_cache", ["off"]) == ["off"]
    assert headers["upgrade"] == "$http_upgrade"
    connection = headers["connection"]
    if connection != "upgrade":  # a map that says upgrade for upgrade requests
        (mapping,) = find(nginx_http, "map", "$http_upgrade", connection)
        assert ("default", ["upgrade"], []) in mapping[2]
    assert seconds(settings["proxy_read_timeout"][0]) >= 3600, "streams stay open while a job runs"
    assert seconds(settings["proxy_send_timeout"][0]) >= 3600
    assert headers["host"] == "$host" and "x-forwarded-for" in headers
    assert not find(server[2], "gzip", "on") and not find(nginx_http, "gzip", "on"), "gzip buffers SSE"


def test_file_uploads_reach_every_replica_through_nginx(
    nginx_http: list[Directive], services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    """POST /v1/files takes up to limits.max_file_bytes (200 MB): nginx must let it through, and
    both replicas must keep files in one named volume (a file uploaded to one is read from the other)."""
    (server,) = find(nginx_http, "server")
    (files,) = find(server[2], "location", "=", "/v1/files")
    (size,) = find(files[2], "client_max_body_size")
    assert size[1][0].endswith("m") and int(size[1][0][:-1]) > 200
    (upstream,) = find(nginx_http, "upstream")
    assert find(files[2], "proxy_pass") == [("proxy_pass", [f"http://{upstream[1][0]}"], [])]
    assert find(files[2], "proxy_request_buffering") == [("proxy_request_buffering", ["off"], [])]
    for name, api in api_replicas(services).items():
        target = env_of(api)["LOCALMOE_FILES_DIR"]
        (volume,) = [m for m in mounts(api) if m["target"] == target]
        assert volume["source"] in compose["volumes"] and not volume.get("read_only"), name
    steps = parse_dockerfile(ROOT / "deploy" / "Dockerfile.api")
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(rf"install -d -o 10001 -g 10001 (-m \d+ )?{re.escape(target)}", runs), (
        "owned by the API's user"
    )


def test_nginx_serves_its_health_check_and_hides_metrics(
    nginx_http: list[Directive], services: dict[str, dict[str, Any]]
) -> None:
    (server,) = find(nginx_http, "server")
    assert find(server[2], "location", "=", "/nginx-healthz")
    assert find(server[2], "location", "=", "/metrics"), "Prometheus scrapes the replicas, not nginx"
    nginx = services["nginx"]
    conf = [m for m in mounts(nginx) if m["target"] == "/etc/nginx/nginx.conf"]
    assert len(conf) == 1 and conf[0]["read_only"] is True
    assert (COMPOSE.parent / conf[0]["source"]).resolve() == NGINX_CONF


# --- Dockerfiles ---------------------------------------------------------------------------------


def test_every_dockerfile_exists_and_runs_as_non_root(services: dict[str, dict[str, Any]]) -> None:
    built = {name: dockerfile_of(svc) for name, svc in services.items() if "build" in svc}
    assert set(built) >= {*api_replicas(services), *workers(services)}
    for name, path in built.items():
        assert path.is_file(), f"{name}: {path} is missing"
        steps = parse_dockerfile(path)
        users = [args for instr, args in steps if instr == "USER"]
        assert users, f"{path.name}: no USER"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name} runs as root"
        last_user = max(i for i, (instr, _) in enumerate(steps) if instr == "USER")
        assert all(instr != "RUN" for instr, _ in steps[last_user + 1 :]), "USER must come after the RUNs"
        text = path.read_text()
        assert not re.search(r"(?i)requirepass|password\s*=", text), f"{path.name} names a secret"
        hosts = re.findall(r"[a-z][a-z0-9+.-]*://([^/:\s'\"]+)", text)
        assert set(hosts) <= {"127.0.0.1", "localhost"}, f"{path.name} names hosts {hosts}"
    # images that share a tag must be built from the same Dockerfile
    by_image: dict[str, set[Path]] = {}
    for name, path in built.items():
        by_image.setdefault(services[name].get("image", name), set()).add(path)
    assert all(len(paths) == 1 for paths in by_image.values()), by_image


def test_api_dockerfile() -> None:
    steps = parse_dockerfile(ROOT / "deploy" / "Dockerfile.api")
    text = " ".join(f"{i} {a}" for i, a in steps)
    froms = [a for i, a in steps if i == "FROM"]
    arg_defaults = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults.get(m.group(1), ""), froms[-1])
    assert re.match(r"python:3\.11-slim", base), base
    health = [a for i, a in steps if i == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "python" in health[0]
    assert "curl" not in health[0] and "wget" not in health[0]
    assert [a for i, a in steps if i == "CMD"][-1] == '["localmoe", "api"]'
    assert re.search(r"LOCALMOE_API_HOST=0\.0\.0\.0", text)
    # no CUDA torch in the API image: torch is filtered out of the dependencies, the project is
    # installed without them, and no pip command names torch
    assert "!= 'torch'" in text and "pip install --no-deps ." in text
    for cmd in (c for i, a in steps if i == "RUN" for c in a.split("&&")):
        assert not ("pip install" in cmd and re.search(r"\btorch\b", cmd)), cmd


def test_worker_dockerfile() -> None:
    steps = parse_dockerfile(ROOT / "deploy" / "Dockerfile.worker")
    arg_defaults = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    froms = [a for i, a in steps if i == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults.get(m.group(1), ""), froms[-1])
    assert re.fullmatch(r"nvidia/cuda:1[23]\.\d+(\.\d+)?-(base|runtime)-ubuntu2[24]\.04", base), base
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"pip install[^&]*torch==", runs), "torch (CUDA) is installed"
    assert "torch.version.cuda" in runs, "the build fails on a CPU-only torch"
    assert [a for i, a in steps if i == "CMD"][-1] == '["localmoe", "worker"]'


def test_dockerignore_keeps_the_context_small() -> None:
    lines = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", ".gpu", ".pytest_cache", ".mypy_cache", ".ruff_cache", "**/__pycache__"):
        assert entry in lines, entry


# --- docker compose itself, where it exists ------------------------------------------------------


def _compose_cli() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker compose version` failed: {e}"
    if probe.returncode != 0:
        first = (probe.stderr.strip().splitlines() or ["no output"])[0]
        return f"the docker compose plugin is missing (`docker compose version`: {first})"
    return None


def test_docker_compose_config(tmp_path: Path) -> None:
    reason = _compose_cli()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME")}
    token = tmp_path / "metrics-token"
    token.write_text("lm-dummy\n")
    env.update(
        REDIS_PASSWORD="dummy-redis-pw",
        FLOWER_PASSWORD="dummy-flower-pw",
        GRAFANA_PASSWORD="dummy-grafana-pw",
        LOCALMOE_METRICS_TOKEN_FILE=str(token),
        MODEL_DIR=str(tmp_path),
    )
    (tmp_path / "empty.env").write_text("")  # a .env beside the compose file must not fill the gaps
    cmd = [
        "docker",
        "compose",
        "-f",
        str(COMPOSE),
        "--project-directory",
        str(ROOT),
        "--env-file",
        str(tmp_path / "empty.env"),
        "config",
        "-q",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for missing in (
        "REDIS_PASSWORD",
        "FLOWER_PASSWORD",
        "GRAFANA_PASSWORD",
        "LOCALMOE_METRICS_TOKEN_FILE",
        "MODEL_DIR",
    ):
        partial = {k: v for k, v in env.items() if k != missing}
        run = subprocess.run(cmd, env=partial, capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and missing in run.stderr, (
            f"compose must refuse to start without {missing}"
        )


# --- systemd (deploy/systemd/) -------------------------------------------------------------------

SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = {
    "localmoe.service",
    "localmoe-api@.service",
    "localmoe-worker@.service",
    "localmoe-webhooks.service",
    "localmoe-flower.service",
}


def _unit(path: Path) -> dict[str, list[str]]:
    """key → every value it is given, across sections (unit files repeat keys such as Environment)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_units_run_as_a_service_user_over_var_lib_and_stop_as_a_group() -> None:
    assert {p.name for p in SYSTEMD.glob("*.service")} == UNITS
    for name in UNITS:
        unit = _unit(SYSTEMD / name)
        assert unit["User"] == ["localmoe"] and unit["StateDirectory"] == ["localmoe"], name
        assert "LOCALMOE_HOME=/var/lib/localmoe" in unit["Environment"], name
        assert unit["KillMode"] == ["control-group"] and unit["Restart"] == ["on-failure"], name
        assert unit["WantedBy"] == ["multi-user.target"], name
    up = _unit(SYSTEMD / "localmoe.service")
    assert up["ExecStart"] == ["/opt/localmoe/.venv/bin/localmoe up"]
    assert up["RestartPreventExitStatus"] == ["2"]  # another `up` on this home, or a port taken
    assert "CUDA_VISIBLE_DEVICES=%i" in _unit(SYSTEMD / "localmoe-worker@.service")["Environment"]


def test_systemd_units_name_commands_the_cli_has() -> None:
    for name in UNITS:
        (command,) = _unit(SYSTEMD / name)["ExecStart"]
        argv = command.split()
        if argv[0].endswith("/localmoe"):  # `localmoe SUB [options]`: SUB and its options exist
            sub = argv[1]
            helped = subprocess.run(
                [sys.executable, "-m", "localmoe", sub, "--help"], capture_output=True, text=True, timeout=60
            )
            assert helped.returncode == 0, helped.stderr
            for option in argv[2:]:
                if option.startswith("--"):
                    assert option in helped.stdout, (name, option)
        else:
            assert argv[1:] == ["-m", "workers.webhooks"], name
            assert (ROOT / "workers" / "webhooks.py").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on each unit (templates as an instance), with /opt/localmoe turned
    into this checkout so that the commands exist; it must say nothing."""
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/localmoe/.venv/bin/python", sys.executable)
        text = text.replace("/opt/localmoe/.venv/bin/localmoe", str(Path(sys.executable).parent / "localmoe"))
        (tmp_path / name).write_text(text.replace("/opt/localmoe", str(ROOT)))
    for name in UNITS:
        instance = name.replace("@.", "@0.")
        done = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / instance)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
            name,
            done.stderr,
        )

"""The deployment files: every nats config passes ``nats-server -t``, and the compose
topology is consistent (services, mounted configs, routes, images, commands), and
secured (credentials and TLS on every client, route and leaf connection).

The deploy configs include secrets that ``sessionbus deploy secrets`` generates
for each deployment; here they are generated into a temporary copy.

No engine runs the compose file here, and PyYAML is not a dependency, so
the test reads docker-compose.yml with a strict parser of the small YAML
subset it is written in (block mappings and lists, JSON-style flow lists,
plain or double-quoted scalars, comments). Anything outside that subset
fails the test, which keeps the file simple enough to check.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sessionbus.bus._server import find_server_binary

from sessionbus._deployment import generate

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", ".mypy_cache",
             ".pytest_cache", ".ruff_cache", "__pycache__"}
NATS_MARKERS = re.compile(r"^\s*(listen|server_name|jetstream|cluster|leafnodes)\b", re.M)


def nats_config_files() -> list[Path]:
    """Every nats-server config in the repository (``*.conf`` that looks like one)."""
    found = []
    for path in sorted(ROOT.rglob("*.conf")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if NATS_MARKERS.search(path.read_text(encoding="utf-8")):
            found.append(path)
    return found


# -- a strict parser for the compose file's YAML subset ----------------------------


def _scalar(text: str, where: int) -> Any:
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as e:
            raise AssertionError(f"line {where}: flow list is not JSON-style: {text}") from e
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith(("'", "{", "&", "*", "|", ">", "!")):
        raise AssertionError(f"line {where}: outside the supported YAML subset: {text}")
    return text


def parse_compose(text: str) -> dict[str, Any]:
    """Parse the block-style YAML subset docker-compose.yml is written in."""
    lines: list[tuple[int, int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not stripped:
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise AssertionError(f"line {number}: tab indentation")
        lines.append((len(stripped) - len(stripped.lstrip()), number, stripped.strip()))
    pos = 0

    def block(indent: int) -> Any:
        nonlocal pos
        if lines[pos][2].startswith("- "):
            items: list[Any] = []
            while pos < len(lines) and lines[pos][0] == indent and lines[pos][2].startswith("- "):
                items.append(_scalar(lines[pos][2][2:], lines[pos][1]))
                pos += 1
            return items
        mapping: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent:
            _, number, content = lines[pos]
            key, sep, rest = content.partition(":")
            if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
                raise AssertionError(f"line {number}: expected 'key: value', got {content!r}")
            assert key not in mapping, f"line {number}: duplicate key {key!r}"
            pos += 1
            if rest.strip():
                mapping[key] = _scalar(rest, number)
            elif pos < len(lines) and lines[pos][0] > indent:
                mapping[key] = block(lines[pos][0])
            else:
                mapping[key] = None
        if pos < len(lines) and lines[pos][0] > indent:
            raise AssertionError(f"line {lines[pos][1]}: unexpected indentation")
        return mapping

    parsed = block(0)
    assert pos == len(lines), f"line {lines[pos][1]}: not parsed"
    assert isinstance(parsed, dict)
    return parsed


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return parse_compose(COMPOSE.read_text(encoding="utf-8"))


def _mounted_configs(service: dict[str, Any]) -> list[Path]:
    sources = [v.split(":", 1)[0] for v in service.get("volumes", [])]
    return [ROOT / s for s in sources if s.startswith("./") and s.endswith(".conf")]


def _urls_in(conf: Path, scheme: str) -> list[str]:
    """``(host, port)`` of every ``scheme`` URL in ``conf`` (credentials skipped)."""
    return re.findall(rf"{scheme}://(?:[^@\s\"]+@)?([A-Za-z0-9_.-]+):(\d+)",
                      conf.read_text(encoding="utf-8"))


# -- nats configs ------------------------------------------------------------------


def test_the_deploy_configs_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in nats_config_files()}
    assert {"deploy/n1.conf", "deploy/n2.conf", "deploy/n3.conf", "deploy/edge.conf"} <= names


#: Where the servers' containers mount deploy/secrets.
SECRETS_MOUNT = "/etc/nats/secrets"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/*.conf beside freshly generated secrets, their paths pointing there."""
    root = tmp_path_factory.mktemp("deploy")
    generate(root / "secrets")
    for conf in (ROOT / "deploy").glob("*.conf"):
        text = conf.read_text(encoding="utf-8").replace(SECRETS_MOUNT, str(root / "secrets"))
        (root / conf.name).write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "conf", nats_config_files(), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_nats_config_passes_nats_server_t(conf: Path, deployed: Path) -> None:
    # -t only parses: routes naming compose hosts (nats-route://n2:6222) are not resolved.
    if conf.parent == ROOT / "deploy":
        conf = deployed / conf.name
    result = subprocess.run(
        [find_server_binary(), "-t", "-c", str(conf)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_nats_server_t_rejects_a_broken_config(tmp_path: Path) -> None:
    # The check above would be worthless if -t accepted anything.
    bad = tmp_path / "bad.conf"
    bad.write_text("listen: 0.0.0.0:4222\njetstream { no_such_field: 1 }\n")
    result = subprocess.run([find_server_binary(), "-t", "-c", str(bad)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0


def test_cluster_nodes_share_a_cluster_and_a_domain(deployed: Path) -> None:
    for n in (1, 2, 3):
        text = (ROOT / f"deploy/n{n}.conf").read_text(encoding="utf-8")
        assert f"server_name: n{n}\n" in text
        assert re.search(r"domain:\s*hub\b", text)
        assert re.search(r"name:\s*sessionbus\b", text)
        assert 'include "secrets/routes.conf"' in text
    assert sorted(_urls_in(deployed / "secrets/routes.conf", "nats-route")) == [
        ("n1", "6222"), ("n2", "6222"), ("n3", "6222")]
    edge = (ROOT / "deploy/edge.conf").read_text(encoding="utf-8")
    assert "jetstream" not in re.sub(r"#.*", "", edge), "the edge leaf runs without JetStream"


# -- the compose topology ----------------------------------------------------------


def test_compose_parses_into_the_expected_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"n1", "n2", "n3", "edge", "provision", "worker", "edge-worker",
                             "demo"}
    assert set(compose["volumes"]) == {"n1-data", "n2-data", "n3-data"}


def test_servers_run_the_official_image_on_their_mounted_configs(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    mounted: set[Path] = set()
    for name in ("n1", "n2", "n3", "edge"):
        service = services[name]
        image = service["image"]
        match = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?(?:-alpine)?", image)
        assert match, f"{name}: {image!r} is not a pinned official nats image"
        assert (int(match[1]), int(match[2])) >= (2, 11), "per-key TTL needs 2.11+"
        configs = _mounted_configs(service)
        assert configs == [ROOT / f"deploy/{name}.conf"], f"{name} mounts {configs}"
        assert all(p.is_file() for p in configs)
        target = service["volumes"][0].split(":")[1]
        assert service["command"] == ["--config", target]
        assert "healthz" in " ".join(service["healthcheck"]["test"])
        mounted.update(configs)
    deploy_confs = {p for p in nats_config_files() if p.parent == ROOT / "deploy"}
    assert deploy_confs == mounted, "every deploy config is used, and only those"


def test_routes_and_leaf_remotes_name_compose_services(
    compose: dict[str, Any], deployed: Path,
) -> None:
    services = compose["services"]
    for conf in [*deployed.glob("*.conf"), *deployed.glob("secrets/*.conf")]:
        for host, _ in _urls_in(conf, "nats-route") + _urls_in(conf, "nats-leaf"):
            assert host in services, f"{conf.name} names unknown host {host!r}"
    assert 'include "secrets/edge-remote.conf"' in (ROOT / "deploy/edge.conf").read_text()
    assert sorted(_urls_in(deployed / "secrets/edge-remote.conf", "nats-leaf")) == [
        ("n1", "7422"), ("n2", "7422"), ("n3", "7422")]


def test_every_connection_needs_credentials_and_tls(compose: dict[str, Any]) -> None:
    for name in ("n1", "n2", "n3", "edge"):
        text = re.sub(r"#.*", "", (ROOT / f"deploy/{name}.conf").read_text(encoding="utf-8"))
        # Client listener: TLS with the deployment's CA, and the tenants' accounts.
        assert re.search(r"^tls \{", text, re.M), name
        assert f"{SECRETS_MOUNT}/tls/ca.pem" in text and f"{SECRETS_MOUNT}/tls/{name}.pem" in text
        assert re.search(r'^include "secrets/(edge-)?accounts.conf"', text, re.M), name
        # No secret in the repository: they all come from the generated includes.
        assert not re.search(r"password|nkey|token|SU[A-Z0-9]{20}", text, re.I), name
        if name != "edge":
            cluster = text[text.index("cluster {"):text.index("leafnodes {")]
            assert "secrets/routes.conf" in cluster and "verify: true" in cluster
            leaf = text[text.index("leafnodes {"):]
            assert "secrets/leaf-users.conf" in leaf and "tls {" in leaf
    edge = (ROOT / "deploy/edge.conf").read_text(encoding="utf-8")
    assert "tls {" in edge[edge.index("remotes"):]
    for name in ("worker", "edge-worker", "provision", "demo"):
        service = compose["services"][name]
        assert service["environment"]["SESSIONBUS_URL"].startswith("tls://")
        assert service["environment"]["SESSIONBUS_NKEY_SEED_FILE"] == "/run/sessionbus/user.nk"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts["/run/sessionbus/ca.pem"] == "./deploy/secrets/tls/ca.pem"
        role = "admin" if name in ("provision", "demo") else "worker"
        assert mounts["/run/sessionbus/user.nk"] == f"./deploy/secrets/auth/users/default/{role}.nk"


def test_workers_and_demo_run_the_project_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"pip install \.$", dockerfile, re.M), "the image installs the project"
    for name in ("worker", "edge-worker", "demo"):
        service = services[name]
        assert service["build"] == "."
        assert service["command"][0] == "sessionbus"
        assert "SESSIONBUS_URL" in service["environment"]
    cluster_url = services["worker"]["environment"]["SESSIONBUS_URL"]
    assert cluster_url.startswith("tls://n1:4222,n2:4222,n3:4222")
    assert "replicas=3" in cluster_url
    edge_url = services["edge-worker"]["environment"]["SESSIONBUS_URL"]
    assert edge_url.startswith("tls://edge:4222") and "domain=hub" in edge_url
    assert services["demo"]["command"] == ["sessionbus", "demo"]
    assert services["demo"]["profiles"] == ["demo"]


def test_worker_commands_name_an_importable_handler(compose: dict[str, Any]) -> None:
    # The image's working directory holds examples/, as the repository root does here.
    from sessionbus._cli_worker import load_handler

    for name in ("worker", "edge-worker"):
        command = compose["services"][name]["command"]
        assert command[1] == "worker"
        assert command[command.index("--group") + 1] == "echo"
        assert callable(load_handler(command[2], search_path=str(ROOT)))


def test_the_subset_parser_rejects_what_it_does_not_understand() -> None:
    assert parse_compose('a:\n  b: ["x", "y"]\n  c:\n    - 1\n') == {
        "a": {"b": ["x", "y"], "c": ["1"]}}
    for bad in ("a: &anchor 1\n", "a: {b: 1}\n", "a:\n  b: 1\n   c: 2\n", "a 1\n"):
        with pytest.raises(AssertionError):
            parse_compose(bad)

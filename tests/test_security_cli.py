"""``sessionbus tenants | users | server --auth``, run as subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from cli_procs import CLI, ROOT, Running, assert_one_line_error, env
from sessionbus.bus._server import free_port
from sessionbus.workers import Turn, Worker
from worker_proc import FAST


def cli(*args: str, seed: Path | None = None) -> subprocess.CompletedProcess[str]:
    values = env()
    values.pop("SESSIONBUS_NKEY_SEED_FILE", None)
    if seed is not None:
        values["SESSIONBUS_NKEY_SEED_FILE"] = str(seed)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=values, check=False)


async def test_a_secured_server_from_the_command_line(tmp_path: Path) -> None:
    auth = str(tmp_path / "auth")
    assert cli("tenants", "add", "acme", "--auth", auth).returncode == 0
    added = cli("users", "add", "acme", "admin", "--role", "admin", "--auth", auth)
    assert added.returncode == 0, added.stderr
    admin_seed = tmp_path / "auth/users/acme/admin.nk"
    assert str(admin_seed) in added.stdout
    assert "SU" not in added.stdout, "a seed is never printed"
    assert os.stat(admin_seed).st_mode & 0o077 == 0

    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = Running("server", "--port", str(port), "--auth", auth)
    try:
        await server.aexpect("out", "^Use it with")
        started = time.monotonic()
        refused = await asyncio.to_thread(cli, "--url", url, "sessions", "ls")
        assert time.monotonic() - started < 10
        assert_one_line_error(refused, "refused the connection", "Authorization Violation")
        listed = await asyncio.to_thread(cli, "--url", url, "sessions", "ls", seed=admin_seed)
        assert listed.returncode == 0, listed.stderr

        # A user added while the server runs can connect once it has reloaded.
        added = await asyncio.to_thread(cli, "users", "add", "acme", "bob", "--role", "client",
                                        "--auth", auth)
        assert added.returncode == 0, added.stderr
        await server.aexpect("err", "accounts changed")
        bob = tmp_path / "auth/users/acme/bob.nk"
        listed = await asyncio.to_thread(cli, "--url", url, "sessions", "ls", seed=bob)
        assert listed.returncode == 0, listed.stderr

        # Rotation: the old seed is refused, the new one works.
        old = tmp_path / "bob-old.nk"
        await asyncio.to_thread(shutil.copyfile, bob, old)
        rotated = await asyncio.to_thread(cli, "users", "rotate", "acme", "bob", "--auth", auth)
        assert rotated.returncode == 0, rotated.stderr
        await server.aexpect("err", "accounts changed")
        refused = await asyncio.to_thread(cli, "--url", url, "sessions", "ls", seed=old)
        assert_one_line_error(refused, "Authorization Violation")
        listed = await asyncio.to_thread(cli, "--url", url, "sessions", "ls", seed=bob)
        assert listed.returncode == 0, listed.stderr
    finally:
        server.stop()


def test_deploy_secrets_are_generated_once_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    first = cli("deploy", "secrets", str(out))
    assert first.returncode == 0, first.stderr
    ca = (out / "tls/ca.pem").read_bytes()
    routes = (out / "routes.conf").read_text()
    assert cli("deploy", "secrets", str(out)).returncode == 0
    assert (out / "tls/ca.pem").read_bytes() == ca
    assert (out / "routes.conf").read_text() == routes
    for name in ("n1", "n2", "n3", "edge"):
        assert (out / f"tls/{name}.pem").exists()
    for user in ("admin", "worker", "client"):
        assert (out / f"auth/users/default/{user}.nk").exists()
    assert cli("deploy", "secrets", str(out), "--rotate").returncode == 0
    assert (out / "routes.conf").read_text() != routes


async def test_an_edge_site_joins_a_secured_hub_from_the_command_line(
    tmp_path: Path, bus_factory: Any,
) -> None:
    auth = str(tmp_path / "auth")
    assert cli("tenants", "add", "acme", "--domain", "hub", "--auth", auth).returncode == 0
    for user, role in (("admin", "admin"), ("worker", "worker"), ("client", "client")):
        assert cli("users", "add", "acme", user, "--role", role, "--auth", auth).returncode == 0
    leaf = cli("tenants", "leaf", "acme", "site1", "--auth", auth)
    assert leaf.returncode == 0, leaf.stderr
    url_file = tmp_path / "auth/leafs/acme-site1.url"
    assert os.stat(url_file).st_mode & 0o077 == 0
    hub_port, leaf_port, edge_port = free_port(), free_port(), free_port()
    remote = url_file.read_text().strip().replace("HUB:7422", f"127.0.0.1:{leaf_port}")
    hub = Running("server", "--port", str(hub_port), "--domain", "hub", "--auth", auth,
                  "--leaf-port", str(leaf_port), "--name", "hub")
    edges: list[Running] = []
    try:
        await hub.aexpect("out", "^Use it with")
        # Without the tenant's leaf credentials the hub refuses the edge.
        stranger = Running("server", "--port", str(free_port()), "--no-jetstream", "--auth",
                           auth, "--leaf-account", "acme", "--name", "stranger",
                           "--leaf-remote", f"nats-leaf://127.0.0.1:{leaf_port}")
        edges.append(stranger)
        edge = Running("server", "--port", str(edge_port), "--no-jetstream", "--auth", auth,
                       "--leaf-account", "acme", "--leaf-remote", remote, "--name", "edge")
        edges.append(edge)
        await stranger.aexpect("out", "^Use it with")
        await edge.aexpect("out", "^Use it with")
        seeds = {u: str(tmp_path / f"auth/users/acme/{u}.nk") for u in ("admin", "worker",
                                                                        "client")}
        hub_url = f"nats://127.0.0.1:{hub_port}"
        await (await bus_factory(hub_url, partitions=4, nkey_seed_file=seeds["admin"])).close()
        worker_bus = await bus_factory(hub_url, nkey_seed_file=seeds["worker"])
        edge_bus = await bus_factory(f"nats://127.0.0.1:{edge_port}?domain=hub",
                                     nkey_seed_file=seeds["client"])

        async def handle(turn: Turn) -> None:
            if turn.envelope.sender_id == "u":
                await turn.reply(f"hub: {turn.envelope.content}")

        worker = Worker(worker_bus, group="g", handler=handle, config=FAST)
        await worker.start()
        try:
            session = await edge_bus.open(participant="u")
            await session.send("from the edge")
            deadline = time.monotonic() + 20
            texts: list[str] = []
            while "hub: from the edge" not in texts and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                texts = [e.content async for e in session.history()]
            assert texts == ["from the edge", "hub: from the edge"]
        finally:
            await worker.stop()
        # One leaf connection, the edge's, in the tenant's account; the stranger,
        # started first and retrying, is not among them.
        leafz = await asyncio.to_thread(_leafz, _monitor_port(hub))
        assert [leaf["account"] for leaf in leafz["leafs"]] == ["acme"]
    finally:
        for proc in (*edges, hub):
            proc.stop()


def _leafz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/leafz", timeout=2) as resp:
        found: dict[str, Any] = json.loads(resp.read())
        return found


def _monitor_port(server: Running) -> int:
    line = next(line for line in server.seen["out"] if "monitoring:" in line)
    return int(line.rsplit(":", 1)[1])

"""``sessionbus tenants | users | server --auth``, run as subprocesses against a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from cli_procs import CLI, ROOT, Running, assert_one_line_error, env
from sessionbus.bus._server import free_port


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

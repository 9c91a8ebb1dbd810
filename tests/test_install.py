"""What an installed sessionbus does to a user's environment: nothing but ``sessionbus``."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def test_pytest_plugin_injects_no_fixture_named_bus(tmp_path: pathlib.Path) -> None:
    (tmp_path / "test_user.py").write_text("def test_nothing() -> None:\n    pass\n")
    out = _run([sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
               tmp_path)
    assert out.returncode == 0, out.stderr
    names = set(re.findall(r"^([a-z_][a-z0-9_]*)\b", out.stdout, flags=re.M))
    assert "sessionbus_bus" in names and "sessionbus_server" in names
    for shadowing in ("bus", "nats_server", "nats_cluster", "bus_factory"):
        assert shadowing not in names, f"the plugin injects a fixture named {shadowing!r}"


@pytest.mark.parametrize("name", ["bus", "workers", "schemas"])
def test_a_users_module_named_like_our_folders_is_theirs(
    tmp_path: pathlib.Path, name: str
) -> None:
    (tmp_path / f"{name}.py").write_text("MARK = 'user'\n")
    probe = (f"import sessionbus, sessionbus.cli, {name}; "
             f"from sessionbus import SessionBus, Worker, Envelope; "
             f"assert {name}.MARK == 'user', {name}.__file__")
    out = _run([sys.executable, "-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr


def test_the_cli_starts_beside_modules_that_refuse_to_import(tmp_path: pathlib.Path) -> None:
    for name in ("bus", "workers", "schemas"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user {name}.py')\n")
    out = _run([sys.executable, "-m", "sessionbus", "worker", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--group" in out.stdout

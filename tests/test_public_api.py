"""The public surface of each package is pinned: adding a name is a deliberate act."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import zipfile

import pytest

BUS = [
    "BusSettings", "SessionBus",
    "ClosedEvent", "Feed", "Interrupt", "LiveFeed", "Session",
    "ExpiredSession", "InMemorySessionKVStore", "ManagedSession", "SessionKVStore",
    "SessionManager", "SessionRegistry", "SessionStore", "SessionStream", "TurnLock",
]
ERRORS = [
    "AuthenticationFailed", "BusClosedError", "BusError", "BusTimeout", "CausationNotFound",
    "CodecError", "ConcurrentUpdate", "ConfigError", "ConnectionFailed", "CorruptRecord",
    "DecodeError",
    "DepthLimitExceeded", "EncodeError", "EnvelopeTooLarge", "InvalidEnvelope",
    "InvalidIdError", "InvalidMetrics", "KeyConflict", "LockError", "LockLost",
    "LockTimeout", "PermissionDenied", "ServerTooOld", "SessionError", "SessionExists",
    "SessionExpired",
    "SessionNotFound", "SessionTerminated", "TaskNotFound", "WorkerError",
]
WORKERS = [
    "Handler", "Turn", "Worker", "WorkerConfig", "WorkerState",
    "DeadLetter", "Drop", "Retry", "TurnControl",
]
DEAD_HEADERS = [
    "DEAD_ATTEMPTS_HEADER", "DEAD_GROUP_HEADER", "DEAD_REASON_HEADER",
    "DEAD_SEQUENCE_HEADER", "DEAD_SUBJECT_HEADER",
]
WIRE = [
    "EV_DELEGATE", "EV_ERROR", "EV_TEXT", "EV_TOOL_CALL", "EV_TOOL_RESULT",
    "Envelope", "SessionInfo", "SessionMetadata", "SessionState", "TaskInfo", "TaskState",
]
SCHEMAS = [
    "EV_DELEGATE", "EV_ERROR", "EV_TEXT", "EV_TOOL_CALL", "EV_TOOL_RESULT",
    "FORMAT_VERSION", "MAX_PRIORITY", "TERMINAL_SESSION_STATES", "TERMINAL_TASK_STATES",
    "BusError", "CodecError", "DecodeError", "EncodeError", "Envelope", "MetricValue",
    "SessionInfo", "SessionMetadata", "SessionState", "TaskInfo", "TaskState",
    "decode", "decode_map", "encode", "idempotent_envelope_id", "new_envelope_id",
]

PUBLIC = {
    "sessionbus": BUS + WORKERS + WIRE + ERRORS,
    "sessionbus.bus": BUS + ERRORS,
    "sessionbus.workers": WORKERS + DEAD_HEADERS,
    "sessionbus.schemas": SCHEMAS,
    # Importable without Vision Agents installed; the AG2 module needs ag2.
    "sessionbus.integrations.vision_agents": ["NatsSessionKVStore", "decode_key", "encode_key"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_is_exactly_the_pinned_list(package: str) -> None:
    mod = importlib.import_module(package)
    assert sorted(mod.__all__) == sorted(PUBLIC[package])
    assert len(mod.__all__) == len(set(mod.__all__)), f"{package}.__all__ has duplicates"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{package}.{name} is listed but missing"


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_have_docstrings(package: str) -> None:
    mod = importlib.import_module(package)
    assert (mod.__doc__ or "").strip()
    for name in mod.__all__:
        obj = getattr(mod, name)
        if isinstance(obj, type) or callable(obj):
            assert (obj.__doc__ or "").strip(), f"{package}.{name} has no docstring"


def test_top_level_names_are_the_same_objects() -> None:
    top = importlib.import_module("sessionbus")
    for package in ("sessionbus.bus", "sessionbus.workers", "sessionbus.schemas"):
        mod = importlib.import_module(package)
        for name in set(top.__all__) & set(mod.__all__):
            assert getattr(top, name) is getattr(mod, name), f"{name} differs in {package}"


def test_no_top_level_bus_workers_or_schemas_is_installed(tmp_path: pathlib.Path) -> None:
    # Run from an empty folder so that this checkout is not on sys.path.
    probe = (
        "import importlib.util, sessionbus.bus, sessionbus.workers, sessionbus.schemas;"
        "print([n for n in ('bus', 'workers', 'schemas') if importlib.util.find_spec(n)])"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_wheel_holds_only_the_sessionbus_package(tmp_path: pathlib.Path) -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(root)], capture_output=True, timeout=300, check=True)
    (wheel,) = tmp_path.glob("sessionbus-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = zf.namelist()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sessionbus"}
    for sub in ("bus", "workers", "schemas"):
        assert f"sessionbus/{sub}/__init__.py" in names
        assert f"sessionbus/{sub}/py.typed" in names


def test_core_packages_never_import_the_application_layer() -> None:
    """schemas imports nothing of ours, bus never the worker runtime, none the app layer."""
    allowed = {"schemas": {"schemas"}, "bus": {"bus", "schemas"},
               "workers": {"bus", "workers", "schemas"}}
    root = pathlib.Path(__file__).resolve().parents[1]
    for folder, ok in allowed.items():
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                for target in targets:
                    parts = target.split(".")
                    if parts[0] != "sessionbus":
                        continue
                    assert len(parts) > 1 and parts[1] in ok, (
                        f"{path.relative_to(root)} imports {target}"
                    )


def test_no_core_package_imports_a_framework() -> None:
    """Vision Agents and AG2 are optional extras: only sessionbus/integrations/ names them."""
    root = pathlib.Path(__file__).resolve().parents[1]
    frameworks = {"vision_agents", "ag2", "autogen"}
    paths = [p for folder in ("schemas", "bus", "workers", "sessionbus")
             for p in (root / folder).rglob("*.py") if "integrations" not in p.parts]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                assert target.split(".")[0] not in frameworks, (
                    f"{path.relative_to(root)} imports {target}"
                )

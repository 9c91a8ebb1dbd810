"""The ``sessionbus`` command, run as a subprocess against real nats-servers.

Every command is run the way a user runs it: its output and exit code are
checked, errors must be one line on stderr without a traceback. The demo
and the two examples run end to end with small numbers.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_procs import CLI, ROOT, Running, assert_one_line_error, env, run_cli
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsServer, free_port

from sessionbus.cli import build_parser, main
from sessionbus.testing import ServerFactory

COMMANDS = ["demo", "server", "worker", "sessions", "send", "info"]
#: Commands that only write files (tested in test_security_cli.py).
AUTH_COMMANDS = ["tenants", "users", "tls", "deploy"]
SESSION_COMMANDS = ["open", "ls", "show", "close", "tail"]


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*args: str, **kwargs: object) -> Running:
        proc = Running(*args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# -- help ------------------------------------------------------------------------


def test_sessionbus_help_lists_every_command() -> None:
    script = Path(sys.executable).parent / "sessionbus"
    argv = [str(script)] if script.exists() else CLI
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=30,
                            env=env(), check=False)
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^    (\w+)\s", result.stdout, re.M)
    assert listed == COMMANDS + AUTH_COMMANDS
    assert "open | ls | show ID | close ID | tail ID" in result.stdout


@pytest.mark.parametrize("command", [
    [], *([c] for c in COMMANDS), *(["sessions", c] for c in SESSION_COMMANDS),
], ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sessionbus {' '.join(command)}".rstrip())
    if command:
        assert "--url" in out  # the global options work after the command too


def test_global_options_given_before_the_command_are_kept() -> None:
    args = build_parser().parse_args(["--url", "nats://x:1", "--prefix", "p", "sessions", "ls"])
    assert (args.url, args.prefix, args.debug) == ("nats://x:1", "p", False)
    args = build_parser().parse_args(["sessions", "ls", "--url", "nats://y:2", "--debug"])
    assert (args.url, args.prefix, args.debug) == ("nats://y:2", None, True)


# -- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["sessions", "ls"], ["sessions", "open"], ["sessions", "show", "s1"],
    ["sessions", "close", "s1"], ["sessions", "tail", "s1"], ["send", "s1", "hi"],
    ["worker", "examples.echo:handle", "--group", "g"],
], ids=" ".join)
def test_no_server_is_one_line_and_fails_fast(command: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli(*command, url=url)
    assert_one_line_error(result, "no NATS server answering", "connection refused")
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(("command", "needle"), [
    (["sessions", "show", ""], "invalid session id"),
    (["send", "s1", "hi", "--sender", ""], "invalid participant"),
    (["--prefix", "a.b", "sessions", "ls"], "invalid prefix"),
    (["--url", "http://x:1", "sessions", "ls"], "unsupported URL scheme"),
    (["--url", "nats://x:1?replicas=3&bogus=1", "info"], "unknown URL option 'bogus'"),
    (["worker", "no_colon", "--group", "g"], "expected MODULE:HANDLER"),
    (["worker", "no_such_module:handle", "--group", "g"], "no module named"),
    (["worker", "examples.echo:nope", "--group", "g"], "has no attribute"),
    (["worker", "os:getcwd", "--group", "g"], "not an async function"),
    (["worker", "examples.echo:handle", "--group", "g", "--ack-wait", "9"], "priority_timeout"),
    (["demo", "--sessions", "0"], "--sessions must be in"),
    (["server", "--routes", "nats-route://127.0.0.1:1"], "--routes needs --cluster-name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_one_line_before_any_connection(command: list[str], needle: str) -> None:
    # No server anywhere: each of these must fail on its input, not on connecting.
    assert_one_line_error(run_cli(*command), needle)


def test_debug_shows_the_traceback() -> None:
    result = run_cli("--debug", "worker", "no_colon", "--group", "g")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


async def test_info_shows_the_settings_in_effect_without_secrets(
    nats_server: NatsServer,
) -> None:
    url = f"{nats_server.url}?prefix=inf&partitions=6&password=hunter2&user=u"
    result = await asyncio.to_thread(run_cli, "info", "--json", url=url)
    # The test server has no auth; nats-server ignores credentials it does not need.
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["prefix"] == "inf" and report["partitions"] == 6
    assert report["replicas"] == 1 and report["streams"]["inf_envelopes"]["replicas"] == 1
    assert report["settings"]["password"] == "***" and "hunter2" not in result.stdout
    debug = await asyncio.to_thread(run_cli, "--debug", "info", url=url)
    assert "running with <SessionBus started" in debug.stderr and "partitions=6" in debug.stderr
    assert "hunter2" not in debug.stderr + debug.stdout


async def test_unknown_session_is_one_line(nats_server: NatsServer) -> None:
    for command in (["sessions", "show", "nope"], ["sessions", "close", "nope"],
                    ["sessions", "tail", "nope"], ["send", "nope", "hi"]):
        result = await asyncio.to_thread(run_cli, *command, url=nats_server.url)
        assert_one_line_error(result, "session 'nope' not found")


# -- driving sessions --------------------------------------------------------------


async def test_open_ls_send_show_close(nats_server: NatsServer) -> None:
    url = nats_server.url

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, url=url)

    opened = await asyncio.to_thread(cli, "sessions", "open", "chat 1", "--participant",
                                     "user", "--participant", "echo", "--ttl", "600")
    assert opened.returncode == 0 and opened.stdout.strip() == "chat 1", opened.stderr
    generated = await asyncio.to_thread(cli, "sessions", "open")
    other = generated.stdout.strip()
    assert generated.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}", other)

    listing = await asyncio.to_thread(cli, "sessions", "ls")
    assert listing.returncode == 0
    rows = listing.stdout.splitlines()
    assert rows[0].split()[:3] == ["SESSION", "STATE", "AGE"]
    assert rows[1].startswith("chat 1  ") and "active" in rows[1] and "user,echo" in rows[1]
    assert rows[2].startswith(other)

    sent = await asyncio.to_thread(cli, "send", "chat 1", "hello there", "--to", "echo")
    assert sent.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}\n", sent.stdout)

    shown = await asyncio.to_thread(cli, "sessions", "show", "chat 1", "--history")
    assert shown.returncode == 0
    assert "state:        active" in shown.stdout
    assert "participants: user, echo" in shown.stdout
    assert re.search(r"user -> echo  hello there$", shown.stdout, re.M)
    as_json = json.loads((await asyncio.to_thread(cli, "sessions", "show", "chat 1", "--json",
                                                  "--history")).stdout)
    assert as_json["ttl_seconds"] == 600 and as_json["history"][0]["audience"] == ["echo"]

    closed = await asyncio.to_thread(cli, "sessions", "close", "chat 1", "--reason", "bye")
    assert closed.returncode == 0 and closed.stdout.strip() == "chat 1 closed"
    again = await asyncio.to_thread(cli, "sessions", "close", "chat 1")
    assert again.returncode == 0 and again.stdout.strip() == "chat 1 was already closed"
    refused = await asyncio.to_thread(cli, "send", "chat 1", "late")
    assert_one_line_error(refused, "is closed")

    only_closed = json.loads((await asyncio.to_thread(
        cli, "sessions", "ls", "--state", "closed", "--json")).stdout)
    assert [(m["session_id"], m["close_reason"]) for m in only_closed] == [("chat 1", "bye")]


async def test_tail_follows_live_and_ends_when_the_session_closes(
    nats_server: NatsServer, running: Callable[..., Running],
) -> None:
    async with SessionBus(nats_server.url) as sb:
        session = await sb.open("tailed", participant="user")
        await session.send("before the tail")
        tail = running("sessions", "tail", "tailed", "--from-start", url=nats_server.url)
        await tail.aexpect("err", r"^following session tailed \(active\)")
        assert (await tail.aexpect("out", "before the tail")).endswith("user -> *  before the tail")
        await session.send("first live", audience=["agent"])
        await session.send("second live")
        await tail.aexpect("out", r"user -> agent  first live$")
        await tail.aexpect("out", r"user -> \*  second live$")
        await session.close("all done")
        await tail.aexpect("err", r"^-- session tailed closed: all done$")
        assert await asyncio.to_thread(tail.proc.wait, 30) == 0


async def test_tail_stops_on_ctrl_c(nats_server: NatsServer,
                                    running: Callable[..., Running]) -> None:
    async with SessionBus(nats_server.url) as sb:
        session = await sb.open("quiet")
        tail = running("sessions", "tail", "quiet", url=nats_server.url)
        await tail.aexpect("err", "^following session quiet")
        await session.send("seen live")
        await tail.aexpect("out", "seen live")
        assert await asyncio.to_thread(tail.signal, signal.SIGINT) == 0
        assert "Traceback" not in tail.proc.stderr.read()  # type: ignore[union-attr]


async def test_worker_answers_send_wait_and_drains_on_sigterm(
    nats_server: NatsServer, running: Callable[..., Running],
) -> None:
    url = nats_server.url
    worker = running("worker", "examples.echo:handle", "--group", "echo", url=url)
    await worker.aexpect("err", r"of group 'echo' running examples\.echo:handle")
    opened = await asyncio.to_thread(run_cli, "sessions", "open", "talk", url=url)
    assert opened.returncode == 0, opened.stderr
    result = await asyncio.to_thread(run_cli, "send", "talk", "hello", "--wait", "30", url=url)
    assert result.returncode == 0, result.stderr
    envelope_id, reply = result.stdout.strip().splitlines()
    assert re.fullmatch(r"[0-9a-f]{32}", envelope_id)
    assert reply.endswith("echo -> user  echo: hello")
    assert await asyncio.to_thread(worker.signal, signal.SIGTERM) == 0
    await worker.aexpect("err", "left group 'echo'")


_GC_PROBE = """
import gc

async def handle(turn):
    await turn.reply(str(gc.get_threshold()[0]))
"""


def _python_default_young() -> str:
    found = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_threshold()[0])"],
                           capture_output=True, text=True, check=True)
    return found.stdout.strip()


@pytest.mark.parametrize(("flags", "young"), [
    ((), "10000"), (("--gc-threshold", "2500"), "2500"),
    (("--gc-threshold", "0"), _python_default_young()),
])
async def test_a_worker_process_runs_the_young_collection_less_often(
    nats_server: NatsServer, running: Callable[..., Running], tmp_path: Path,
    flags: tuple[str, ...], young: str,
) -> None:
    (tmp_path / "gcprobe.py").write_text(_GC_PROBE)
    url = nats_server.url
    worker = running("worker", "gcprobe:handle", "--group", "probe", *flags, url=url,
                     cwd=tmp_path)
    await worker.aexpect("err", "running gcprobe:handle")
    opened = await asyncio.to_thread(run_cli, "sessions", "open", "gc", url=url)
    assert opened.returncode == 0, opened.stderr
    result = await asyncio.to_thread(run_cli, "send", "gc", "what threshold?", "--wait", "30",
                                     url=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[1].endswith(f"probe -> *  {young}"), result.stdout


def test_a_worker_refuses_a_negative_gc_threshold(nats_server: NatsServer) -> None:
    result = run_cli("worker", "examples.echo:handle", "--group", "echo",
                     "--gc-threshold", "-1", url=nats_server.url)
    assert_one_line_error(result, "--gc-threshold must be >= 0 (0 keeps Python's), got -1")


async def test_send_wait_without_a_reply_times_out(nats_server: NatsServer) -> None:
    async with SessionBus(nats_server.url) as sb:
        await sb.open("nobody-home")
    result = await asyncio.to_thread(run_cli, "send", "nobody-home", "anyone?", "--wait", "0.5",
                                     url=nats_server.url)
    assert_one_line_error(result, "no reply", "within 0.5s")
    assert re.fullmatch(r"[0-9a-f]{32}\n", result.stdout)


# -- server ------------------------------------------------------------------------


async def test_server_runs_in_the_foreground_and_stops_on_sigterm(
    tmp_path: Path, running: Callable[..., Running],
) -> None:
    port = free_port()
    data = tmp_path / "data"
    server = running("server", "--port", str(port), "--data-dir", str(data), "--domain", "hub")
    await server.aexpect("out", rf"^Use it with: export SESSIONBUS_URL=nats://127\.0\.0\.1:{port}")
    pid = int(re.search(r"pid (\d+)", server.seen["out"][0])[1])  # type: ignore[index]
    assert f"  JetStream:   {data} (domain hub)" in server.seen["out"]
    async with SessionBus(f"nats://127.0.0.1:{port}", domain="hub") as sb:
        session = await sb.open("on-the-cli-server")
        await session.send("stored")
        assert [e.content async for e in session.history()] == ["stored"]
    assert await asyncio.to_thread(server.signal, signal.SIGTERM) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the nats-server went with it
    assert (data / "jetstream").is_dir()  # a given data dir is kept


async def test_server_killed_under_the_command_says_so(
    running: Callable[..., Running],
) -> None:
    port = free_port()
    server = running("server", "--port", str(port))
    await server.aexpect("out", r"^Use it with: export SESSIONBUS_URL=")
    pid = int(re.search(r"pid (\d+)", server.seen["out"][0])[1])  # type: ignore[index]
    os.kill(pid, signal.SIGKILL)
    line = await server.aexpect("err", r"^sessionbus: error: ")
    assert line == (f"sessionbus: error: nats-server (pid {pid}) was killed by SIGKILL "
                    "(not by this command)")
    assert await asyncio.to_thread(server.proc.wait, 30) == 1


async def test_server_as_a_leaf_node_of_a_hub(
    nats_server_factory: ServerFactory, running: Callable[..., Running],
) -> None:
    hub = nats_server_factory(name="hub", domain="hub", leaf_listen_port=0)
    port = free_port()
    leaf = running("server", "--port", str(port), "--no-jetstream", "--name", "edge",
                   "--leaf-remote", f"nats-leaf://127.0.0.1:{hub.leaf_listen_port}")
    await leaf.aexpect("out", "^Use it with")
    assert f"  leaf of:     nats-leaf://127.0.0.1:{hub.leaf_listen_port}" in leaf.seen["out"]
    await asyncio.to_thread(hub.wait_leafnodes, 1)
    # A client of the leaf reaches the hub's JetStream through it.
    opened = await asyncio.to_thread(run_cli, "sessions", "open", "at-the-edge",
                                     url=f"nats://127.0.0.1:{port}?domain=hub")
    assert opened.returncode == 0, opened.stderr
    async with SessionBus(hub.url) as sb:
        assert (await sb.session("at-the-edge").info()).session_id == "at-the-edge"
    assert await asyncio.to_thread(leaf.signal, signal.SIGINT) == 0


async def test_server_joins_a_cluster(
    nats_server_factory: ServerFactory, running: Callable[..., Running],
) -> None:
    seed = nats_server_factory(name="seed", jetstream=False, cluster_name="c1")
    node = running("server", "--port", str(free_port()), "--no-jetstream", "--name", "n2",
                   "--cluster-name", "c1", "--routes",
                   f"nats-route://127.0.0.1:{seed.cluster_port}")
    await node.aexpect("out", "^Use it with")
    deadline = time.monotonic() + 20
    while seed.monitor("routez").get("num_routes", 0) < 1:
        assert time.monotonic() < deadline, "the CLI server never routed to the seed"
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(node.signal, signal.SIGTERM) == 0


def test_server_on_a_taken_port_is_one_line(nats_server: NatsServer) -> None:
    result = run_cli("server", "--port", str(nats_server.port))
    assert_one_line_error(result, "did not start", "address already in use")


# -- demo and examples ---------------------------------------------------------------


def test_demo_runs_to_its_summary_with_order_held() -> None:
    # The README's first command, with small numbers: embedded server, worker
    # processes, a SIGKILLed worker restarted part-way.
    started = time.monotonic()
    result = run_cli("demo", "--sessions", "20", "--envelopes", "5", "--workers", "2",
                     "--send-seconds", "2", timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "using embedded nats-server at nats://127.0.0.1:" in out
    assert re.search(r"sessions\s+20 opened, 20 closed", out)
    assert re.search(r"envelopes\s+100 sent, 100 handled", out)
    assert re.search(r"turns\s+\d+ run by 2 worker processes .*: \d+ turns/s", out)
    assert re.search(r"latency\s+p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"redeliveries\s+\d+ turns were redeliveries", out)
    assert re.search(r"failover\s+worker 2 killed \(SIGKILL\) at [\d.]+s; worker 2 restarted", out)
    assert re.search(r"per-session order\s+held in 20/20 sessions; no overlapping turns", out)
    assert re.search(r"result\s+OK", out)
    assert "Traceback" not in result.stderr
    assert elapsed < 60, f"the demo took {elapsed:.1f}s"


@pytest.mark.parametrize(("example", "expected"), [
    ("echo.py", ["user -> echo: hello", "echo -> user: echo: hello", "echo -> user: echo: bye"]),
    ("handoff.py", ["triage: happy to help with 'what are your opening hours?'",
                    "billing: I looked into 'I want a refund for invoice 42'",
                    "depth 1   triage -> billing  [delegate]",
                    "depth 2  billing -> user     [text]"]),
])
def test_example_runs_with_one_command(example: str, expected: list[str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example)],
                            capture_output=True, text=True, timeout=90, env=env(),
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in expected:
        assert line in result.stdout, result.stdout


# -- README --------------------------------------------------------------------------


async def test_readme_python_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    # ```python blocks are run as `python -m asyncio` would (top-level await);
    # ```py blocks are illustrations that run forever or need a server.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M)
    assert len(blocks) == 4, "one snippet per seed API"
    for block in blocks:
        code = compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, {"__name__": "readme"})
        if inspect.iscoroutine(result):
            await result
    out = capsys.readouterr().out
    assert "['tools/call: search']" in out
    assert "{'planner'}" in out
    assert "active [0, 1]" in out and "True" in out

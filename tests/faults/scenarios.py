"""The fault scenarios, each one run of real processes checked by the recorder.

Every scenario starts its own nats-server(s), worker processes and a
sender, injects its fault (SIGKILL, SIGSTOP/SIGCONT, a server restart on
the same data directory, a link cut through :class:`proxy.LinkProxy`),
waits (bounded) for every acked envelope to be handled, reads back the
envelope stream and returns an :class:`Outcome`. The tests in
``test_faults.py`` assert on it; ``bench/soak.py`` repeats it and prints
the figures. Sizes are small on purpose: each scenario runs in seconds to
about half a minute on 2 cores.

Waits that are part of a fault (a worker restarted 1 s after the kill, a
server down for 4 s, a link cut for longer than the failover bound) are
the fault's timing, not synchronisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from harness import Run, Timeout, read_stored, wait_members
from proxy import LinkProxy
from recorder import Report
from sessionbus.bus import SessionBus
from sessionbus.bus._server import NatsCluster, NatsServer
from sessionbus.workers import WorkerConfig
from worker_proc import FAST

PREFIX = "f"
DEFAULT = WorkerConfig()


@dataclass
class Outcome:
    """What one scenario run measured."""

    name: str
    report: Report
    elapsed: float
    finished: bool  # every acked envelope was handled within the bound
    notes: dict[str, float | int | str] = field(default_factory=dict)
    #: Scenario-specific failures beyond the recorder's (e.g. a worker that never rejoined).
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Finished, the recorder found no violation, and no scenario-specific failure."""
        return self.finished and self.report.ok and not self.failures

    def line(self) -> str:
        """One printable line of figures."""
        extra = " ".join(f"{k}={v}" for k, v in self.notes.items())
        state = "" if self.finished else " UNFINISHED"
        failed = "".join(f"\n{f}" for f in self.failures)
        return (f"{self.name}: {self.elapsed:.1f}s{state} {self.report.summary()} "
                f"{extra}".strip() + failed)

    def problems(self) -> str:
        """Everything a failing assertion should show."""
        return self.line()


@contextlib.asynccontextmanager
async def _scene(tmp: Path, urls: str | list[str], *, partitions: int, replicas: int = 1,
                 stop: Callable[[], None] | None = None,
                 ) -> AsyncIterator[tuple[Run, SessionBus]]:
    """The processes of one run and the bus that checks them; ``stop`` ends the servers last."""
    run = Run(tmp)
    try:
        sb = SessionBus(urls, prefix=PREFIX, partitions=partitions, replicas=replicas)
        await sb.start()
        try:
            yield run, sb
        finally:
            await sb.close()
    finally:
        run.close()
        if stop is not None:
            stop()


async def _spawn_workers(run: Run, sb: SessionBus, url: str, ids: tuple[str, ...], *,
                         claimed: int, **options: Any) -> None:
    """Start worker processes and wait until they hold every partition between them."""
    for wid in ids:
        run.spawn_worker(wid, url, **options)
    await wait_members(sb, run, set(ids), claimed=claimed)


async def _finish(run: Run, sb: SessionBus, name: str, t0: float, *, within: float,
                  fault_at: float | None, notes: dict[str, float | int | str] | None = None,
                  settle: Callable[[], Awaitable[None]] | None = None) -> Outcome:
    finished = await run.wait_all_done(within)
    if settle is not None:
        await settle()
    end = time.time()
    run.stop_workers()
    stored = await read_stored(sb)
    report = run.report(stored=stored, fault_at=fault_at, now=end)
    return Outcome(name=name, report=report, elapsed=time.monotonic() - t0, finished=finished,
                   notes=notes or {})


def _acked(run: Run) -> int:
    return len(run.acks())


def _reached(run: Run, count: int) -> bool:
    return _acked(run) >= count


def _expect_cut(run: Run, outcome: Outcome, worker: str, killed_at: float) -> None:
    """The kill must land mid-turn: some turn of ``worker`` started before it and never ended."""
    if not any(t.worker == worker and t.end is None and t.start < killed_at
               for t in run.turns()):
        outcome.failures.append(f"the kill of {worker} cut no turn")


# -- the only worker, killed mid-turn and restarted ------------------------------

async def only_worker_restart(tmp: Path, *, same_id: bool) -> Outcome:
    """One worker, default timings, 20 sessions x 5 turns of 0.3 s; SIGKILL, restart 1 s later."""
    name = f"only_worker_restart_{'same' if same_id else 'new'}_id"
    t0 = time.monotonic()
    server = NatsServer(name="single").start()
    async with _scene(tmp, server.url, partitions=16, stop=server.stop) as (run, sb):
        await _spawn_workers(run, sb, server.url, ("w0",), claimed=16, timings="default",
                             sleep=0.3)
        run.spawn_sender(server.url, sessions=20, per_session=5)
        await run.wait_for("30 turns done", lambda: run.ended_count() >= 30, 30)
        killed_at = run.kill("w0")
        await asyncio.sleep(1.0)
        run.spawn_worker("w0" if same_id else "w1", server.url, timings="default", sleep=0.3)
        outcome = await _finish(run, sb, name, t0, within=DEFAULT.failover_bound + 30,
                                fault_at=killed_at)
        _expect_cut(run, outcome, "w0", killed_at)
        return outcome


# -- one of three workers killed, then a join, under load ------------------------

async def kill_one_of_three_and_join(tmp: Path) -> Outcome:
    """Three workers under a steady send; SIGKILL one, then a fourth joins."""
    t0 = time.monotonic()
    server = NatsServer(name="single").start()
    async with _scene(tmp, server.url, partitions=32, stop=server.stop) as (run, sb):
        await _spawn_workers(run, sb, server.url, ("w1", "w2", "w3"), claimed=32, sleep=0.02)
        sessions, per = 100, 30
        run.spawn_sender(server.url, sessions=sessions, per_session=per, pause=0.25)
        await run.wait_for("15% acked", lambda: _acked(run) >= sessions * per * 15 // 100, 40)
        killed_at = run.kill("w2")
        await wait_members(sb, run, {"w1", "w3"}, claimed=32)
        moved = time.time() - killed_at
        run.spawn_worker("w4", server.url, sleep=0.02)
        joined = time.time()
        await wait_members(sb, run, {"w1", "w3", "w4"}, claimed=32)
        settled = time.time() - joined
        acked_at_join = _acked(run)
        outcome = await _finish(run, sb, "kill_one_of_three_and_join", t0, within=60,
                                fault_at=killed_at,
                                notes={"leases_moved": round(moved, 2),
                                       "join_settled": round(settled, 2),
                                       "acked_at_join": acked_at_join})
        if acked_at_join >= sessions * per:
            outcome.failures.append("the join landed after the last send, not under load")
        return outcome


# -- nats-server killed and restarted on the same data dir -----------------------

async def server_restart(tmp: Path, *, cycles: int = 2, down: float = 4.0) -> Outcome:
    """Single node, two workers, a retrying sender; SIGKILL nats-server, restart it, repeated."""
    t0 = time.monotonic()
    server = NatsServer(name="single", store_dir=str(tmp / "data")).start()
    async with _scene(tmp, server.url, partitions=16, stop=server.stop) as (run, sb):
        await _spawn_workers(run, sb, server.url, ("w1", "w2"), claimed=16, sleep=0.02)
        sessions, per = 60, 20
        total = sessions * per
        run.spawn_sender(server.url, sessions=sessions, per_session=per, pause=0.2,
                         timeout=1.0, deadline=90)
        first_kill: float | None = None
        for cycle in range(cycles):
            share = total * (cycle + 1) // (cycles + 2)
            await run.wait_for(f"{share} acked", partial(_reached, run, share), 60)
            at = time.time()
            server.kill()
            run.faults.append(("kill nats-server", at))
            first_kill = first_kill or at
            await asyncio.sleep(down)
            await asyncio.to_thread(server.restart)
        return await _finish(run, sb, "server_restart", t0, within=60, fault_at=first_kill,
                             notes={"cycles": cycles, "down_s": down})


# -- the stream leader of a 3-node R3 cluster killed, later restarted ------------

async def cluster_leader_kill(tmp: Path, *, down: float = 5.0) -> Outcome:
    """A 3-node cluster with R3 stream and buckets: SIGKILL the stream leader, restart it later."""
    t0 = time.monotonic()
    cluster = NatsCluster(size=3)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    urls = ",".join(cluster.urls)
    async with _scene(tmp, cluster.urls, partitions=16, replicas=3,
                      stop=cluster.stop) as (run, sb):
        await _spawn_workers(run, sb, urls, ("w1", "w2"), claimed=16, sleep=0.02)
        sessions, per = 60, 20
        run.spawn_sender(urls, sessions=sessions, per_session=per, pause=0.2,
                         timeout=1.0, deadline=90)
        await run.wait_for("30% acked", lambda: _acked(run) >= sessions * per * 3 // 10, 60)
        info = await sb.js.stream_info(sb.names.envelope_stream)
        leader_name = info.cluster.leader if info.cluster else None
        leader = next(s for s in cluster.servers if s.name == leader_name)
        at = time.time()
        leader.kill()
        run.faults.append((f"kill leader {leader_name}", at))
        await asyncio.sleep(down)
        await asyncio.to_thread(leader.restart)
        return await _finish(run, sb, "cluster_leader_kill", t0, within=60, fault_at=at,
                             notes={"leader": str(leader_name), "down_s": down})


# -- a leaf node's link cut and restored -----------------------------------------

async def leaf_link_cut(tmp: Path, *, cut_for: float | None = None) -> Outcome:
    """A worker on a leaf node and one on the hub; cut the leaf link past the failover bound."""
    hold = cut_for if cut_for is not None else FAST.failover_bound + 2.0
    t0 = time.monotonic()
    with contextlib.ExitStack() as servers:
        hub = NatsServer(name="hub", domain="hub", leaf_listen_port=0).start()
        servers.callback(hub.stop)
        proxy = LinkProxy(target_port=hub.leaf_listen_port or 0).start()
        servers.callback(proxy.stop)
        leaf = NatsServer(name="leaf", jetstream=False,
                          leaf_remotes=[f"nats-leaf://127.0.0.1:{proxy.port}"]).start()
        servers.callback(leaf.stop)
        await asyncio.to_thread(hub.wait_leafnodes, 1)
        async with _scene(tmp, hub.url, partitions=16) as (run, sb):
            run.spawn_worker("edge", leaf.url, sleep=0.02, domain="hub")
            run.spawn_worker("hub", hub.url, sleep=0.02)
            await wait_members(sb, run, {"edge", "hub"}, claimed=16)
            sessions, per = 60, 20
            run.spawn_sender(hub.url, sessions=sessions, per_session=per, pause=0.2)
            await run.wait_for("25% acked", lambda: _acked(run) >= sessions * per // 4, 60)
            at = time.time()
            await asyncio.to_thread(proxy.cut)
            run.faults.append(("cut leaf link", at))
            link_down = await _leafnodes_drop_to_zero(hub, within=5.0)
            await asyncio.sleep(max(0.0, hold - (time.time() - at)))
            await asyncio.to_thread(proxy.restore)
            restored = time.time()

            rejoined: list[float] = []

            async def rejoin() -> None:
                # The edge worker must come back into the group once its link is back.
                with contextlib.suppress(Timeout):
                    await wait_members(sb, run, {"edge", "hub"}, claimed=16, within=30)
                    rejoined.append(time.time() - restored)

            outcome = await _finish(run, sb, "leaf_link_cut", t0, within=60, fault_at=at,
                                    settle=rejoin, notes={"cut_s": round(hold, 1)})
            outcome.notes["edge_rejoined_s"] = round(rejoined[0], 1) if rejoined else "never"
            if not link_down:
                outcome.failures.append("the hub still listed the leaf node after the cut")
            if not rejoined:
                outcome.failures.append("the edge worker did not rejoin within 30 s of the "
                                        "link's restore")
            return outcome


async def _leafnodes_drop_to_zero(hub: NatsServer, *, within: float) -> bool:
    """Whether the hub's monitoring shows no leaf node connection within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if (await asyncio.to_thread(hub.monitor, "leafz")).get("leafnodes", 1) == 0:
                return True
        await asyncio.sleep(0.05)
    return False


# -- a worker paused past the failover bound, then resumed -----------------------

async def worker_paused(tmp: Path) -> Outcome:
    """Two workers whose turns reply; SIGSTOP one mid-turn past the failover bound, SIGCONT it."""
    t0 = time.monotonic()
    server = NatsServer(name="single").start()
    async with _scene(tmp, server.url, partitions=16, stop=server.stop) as (run, sb):
        await _spawn_workers(run, sb, server.url, ("w1", "w2"), claimed=16, sleep=0.5,
                             reply=True)
        run.spawn_sender(server.url, sessions=20, per_session=8)

        def w1_mid_turn() -> bool:
            turns = run.turns()
            done = sum(1 for t in turns if t.end is not None)
            return done >= 10 and any(t.worker == "w1" and t.end is None for t in turns)

        await run.wait_for("w1 mid-turn", w1_mid_turn, 30)
        stopped_at = run.pause("w1")
        await asyncio.sleep(FAST.failover_bound + 3.0)
        run.resume("w1")

        async def stale_settled() -> None:
            # Give the resumed worker's stale turns the time to land their
            # effects: until its log stops growing for 1.5 s (at most 8 s).
            deadline = time.monotonic() + 8
            last, quiet_since = -1, time.monotonic()
            while time.monotonic() < deadline:
                n = sum(1 for t in run.turns() if t.worker == "w1")
                if n != last:
                    last, quiet_since = n, time.monotonic()
                elif time.monotonic() - quiet_since > 1.5:
                    return
                await asyncio.sleep(0.1)

        return await _finish(run, sb, "worker_paused", t0, within=60, fault_at=stopped_at,
                             settle=stale_settled,
                             notes={"paused_s": round(FAST.failover_bound + 3.0, 1)})


# -- a sender cut off mid-send, retrying with its idempotency key ----------------

async def sender_cut(tmp: Path, *, cut_for: float = 2.0) -> Outcome:
    """The sender reaches the server through a proxy; cut it mid-send, restore, let it retry."""
    t0 = time.monotonic()
    with contextlib.ExitStack() as servers:
        server = NatsServer(name="single").start()
        servers.callback(server.stop)
        proxy = LinkProxy(target_port=server.port).start()
        servers.callback(proxy.stop)
        async with _scene(tmp, server.url, partitions=16) as (run, sb):
            await _spawn_workers(run, sb, server.url, ("w1", "w2"), claimed=16, sleep=0.01)
            sessions, per = 50, 20
            run.spawn_sender(proxy.url, sessions=sessions, per_session=per, pause=0.02,
                             timeout=1.0)
            await run.wait_for("30% acked", lambda: _acked(run) >= sessions * per * 3 // 10, 60)
            at = time.time()
            await asyncio.to_thread(proxy.cut)
            run.faults.append(("cut sender link", at))
            await asyncio.sleep(cut_for)
            await asyncio.to_thread(proxy.restore)
            outcome = await _finish(run, sb, "sender_cut", t0, within=60, fault_at=at,
                                    notes={"cut_s": cut_for})
            retried = [a.acked - a.sent for a in run.acks() if a.attempts > 1]
            outcome.notes["longest_retried_send_s"] = round(max(retried, default=0.0), 2)
            if not retried:
                outcome.failures.append("the cut landed on no send in flight")
            return outcome


async def _only_new(tmp: Path) -> Outcome:
    return await only_worker_restart(tmp, same_id=False)


async def _only_same(tmp: Path) -> Outcome:
    return await only_worker_restart(tmp, same_id=True)


#: Every scenario by name, as ``bench/soak.py --scenario`` takes them.
SCENARIOS: dict[str, Callable[[Path], Awaitable[Outcome]]] = {
    "only_worker_restart_new_id": _only_new,
    "only_worker_restart_same_id": _only_same,
    "kill_one_of_three_and_join": kill_one_of_three_and_join,
    "server_restart": server_restart,
    "cluster_leader_kill": cluster_leader_kill,
    "leaf_link_cut": leaf_link_cut,
    "worker_paused": worker_paused,
    "sender_cut": sender_cut,
}

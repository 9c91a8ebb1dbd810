"""The link proxy really cuts: a live NATS connection through it drops, new ones are refused."""

from __future__ import annotations

import asyncio

import nats
from proxy import LinkProxy
from sessionbus.bus._server import NatsServer


async def test_cut_drops_live_connections_and_refuses_new_ones_until_restored(
    nats_server: NatsServer,
) -> None:
    disconnected = asyncio.Event()
    reconnected = asyncio.Event()

    async def on_disconnect() -> None:
        disconnected.set()

    async def on_reconnect() -> None:
        reconnected.set()

    with LinkProxy(target_port=nats_server.port) as proxy:
        nc = await nats.connect(proxy.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
                                disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        try:
            assert await nc.request("$JS.API.INFO", b"", timeout=5)
            await asyncio.to_thread(proxy.cut)
            await asyncio.wait_for(disconnected.wait(), 5)
            # reconnect attempts are refused while cut
            for _ in range(100):
                if proxy.refused >= 2:
                    break
                await asyncio.sleep(0.05)
            assert proxy.refused >= 2
            assert not nc.is_connected and not reconnected.is_set()
            await asyncio.to_thread(proxy.restore)
            await asyncio.wait_for(reconnected.wait(), 5)
            assert await nc.request("$JS.API.INFO", b"", timeout=5)
            assert proxy.accepted == 2
        finally:
            await nc.close()

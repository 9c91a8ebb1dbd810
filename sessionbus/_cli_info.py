"""``sessionbus info``: the settings a bus runs with, and what the server holds for them.

Prints the settings read from ``--url``/``SESSIONBUS_URL`` (secrets hidden),
then what the started bus found: the server it reached, the envelope
stream's actual partitions and replicas, and each bucket's replicas. A
stream that exists with other partitions or replicas than the URL asks
for fails here with the same error a worker or client would get.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sessionbus._cli_common import Commands, add_command, open_bus

__all__ = ["add_parser", "cmd_info"]


def add_parser(commands: Commands) -> None:
    """Register ``info``."""
    info = add_command(
        commands, "info", help="show the settings the bus runs with",
        description="Connect, then print the effective settings (no secrets), the server "
                    "reached, and the streams' partitions and replicas.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)


async def cmd_info(args: argparse.Namespace) -> int:
    """Print the settings and the provisioned streams and buckets."""
    async with open_bus(args) as sb:
        version = sb.nc.connected_server_version
        report: dict[str, Any] = {
            "settings": sb.settings.describe(),
            "connected_url": sb.url,
            "embedded": sb.embedded is not None,
            "server_version": f"{version.major}.{version.minor}.{version.patch}",
            "node_id": sb.node_id,
            "partitions": sb.partitions,
            "replicas": sb.replicas,
            "streams": {},
        }
        names = [sb.names.envelope_stream, sb.names.dead_letter_stream] + [
            f"KV_{b}" for b in (sb.names.sessions_bucket, sb.names.registry_bucket,
                                sb.names.workers_bucket, sb.names.locks_bucket)
        ]
        for name in names:
            stream = await sb.js.stream_info(name)
            report["streams"][name] = {
                "replicas": stream.config.num_replicas or 1,
                "messages": stream.state.messages,
            }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for key, value in report["settings"].items():
        print(f"{key:27} {value}")
    for key in ("connected_url", "embedded", "server_version", "node_id", "partitions",
                "replicas"):
        print(f"{key:27} {report[key]}")
    for name, figures in report["streams"].items():
        print(f"stream {name:20} replicas={figures['replicas']} messages={figures['messages']}")
    return 0

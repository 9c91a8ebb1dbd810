"""What authentication and TLS cost on the hot path: sends on a plain server, on one
requiring NKey users with generated role permissions, and on one adding TLS.

Each round starts the three servers and measures, on each, ``session.send``
awaited one by one and with ``--concurrency`` in flight as a client-role
user, beside the raw nats-py JetStream publish of the same bytes on the
same connection settings. Rounds repeat (``--rounds``) so the spread shows;
ratios are secured / plain and sessionbus / raw.

    python bench/secure.py [--ops 2000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import Rate, add_loop_option, environment, format_ratio, measure, run_loop
from sessionbus.bus import SessionBus
from sessionbus.bus._permissions import Role
from sessionbus.bus._server import NatsServer, ServerTls

from sessionbus._auth import AuthDir
from sessionbus._tls import init_ca, issue

MODES = ("plain", "nkey", "nkey+tls")


async def one_mode(url: str, options: dict[str, Any], admin: dict[str, Any],
                   args: argparse.Namespace) -> dict[str, Rate]:
    out: dict[str, Rate] = {}
    await (await SessionBus.connect(url, partitions=16, **admin)).close()
    async with SessionBus(url, **options) as sb:
        session = await sb.open(participant="bench")
        payload = "x" * 150
        out["send"] = await measure(lambda i: session.send(payload), ops=args.ops,
                                    max_seconds=args.max_seconds)
        out["send conc"] = await measure(lambda i: session.send(payload), ops=args.ops,
                                         concurrency=args.concurrency,
                                         max_seconds=args.max_seconds)
        subject = sb.names.inbound(session.session_id)
        body = b"x" * 200
        out["raw publish"] = await measure(lambda i: sb.js.publish(subject, body), ops=args.ops,
                                           max_seconds=args.max_seconds)
        out["raw publish conc"] = await measure(lambda i: sb.js.publish(subject, body),
                                                ops=args.ops, concurrency=args.concurrency,
                                                max_seconds=args.max_seconds)
    return out


#: The raw baseline of each sessionbus figure.
BASELINE = {"send": "raw publish", "send conc": "raw publish conc"}


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sb-bench-secure-"))
    auth = AuthDir.init(tmp / "auth")
    auth.add_tenant("bench")
    seeds = {r: str(auth.add_user("bench", r.value, r)) for r in (Role.ADMIN, Role.CLIENT)}
    init_ca(tmp / "tls")
    cert = issue(tmp / "tls", "server", hosts=["127.0.0.1"])
    ca = str(cert.ca_file)
    results: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    print(environment())
    for _ in range(args.rounds):
        for mode in MODES:
            server = NatsServer(name=mode.replace("+", "-"))
            client: dict[str, Any] = {}
            admin: dict[str, Any] = {}
            if mode != "plain":
                server.accounts_config = auth.accounts_config()
                client = {"nkey_seed_file": seeds[Role.CLIENT]}
                admin = {"nkey_seed_file": seeds[Role.ADMIN]}
            if mode == "nkey+tls":
                server.tls = ServerTls(str(cert.cert_file), str(cert.key_file), ca)
                client["tls_ca_file"] = admin["tls_ca_file"] = ca
            server.start()
            try:
                rates = await one_mode(server.url, client, admin, args)
            finally:
                server.stop()
            for name, rate in rates.items():
                results[mode].setdefault(name, []).append(rate.per_second)
    for name in results["plain"]:
        plain = statistics.median(results["plain"][name])
        for mode in MODES:
            runs = results[mode][name]
            med = statistics.median(runs)
            line = (f"{name:16} {mode:9} {med:7.0f}/s  (runs {min(runs):.0f}..{max(runs):.0f})"
                    f"  vs plain {format_ratio(med, plain)}")
            if name in BASELINE:
                raw = statistics.median(results[mode][BASELINE[name]])
                line += f"  vs raw {format_ratio(med, raw)}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    add_loop_option(parser)
    args = parser.parse_args()
    # asyncio's SSL transport warns on every closed TLS connection of nats-py.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    run_loop(run(args), args.loop)


if __name__ == "__main__":
    main()

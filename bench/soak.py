"""Soak form of the fault suite: run each fault scenario N times and print its figures.

The scenarios are those of ``tests/faults/scenarios.py`` (real nats-server
and worker processes on loopback). Per scenario and repetition it prints
lost, reordered (of which ``rerun_after_next``: a completed envelope run
again after its successor had started), overlapping turns, stale effects
(a paused worker's late replies stored after its successor's), duplicates
(turn re-runs, and completed re-runs), envelopes stored twice, longest
stall and failover time (seconds), then a summary with min / median /
max::

    python bench/soak.py --repeat 20                      # every scenario
    python bench/soak.py --scenario worker_paused --repeat 5
    python bench/soak.py --list
    python bench/soak.py --scenario leaf_link_cut --repeat 1 --keep /tmp/soak  # keep logs
    python bench/soak.py --repeat 3 --loop uvloop         # every process on uvloop

It stops by itself: each run is bounded (``--run-timeout``), and no new
run starts once ``--max-minutes`` have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "faults"), str(ROOT / "tests")]

from _common import add_loop_option, environment, run_loop  # noqa: E402
from scenarios import SCENARIOS, Outcome  # noqa: E402
from sessionbus.bus._loop import LOOP_ENV  # noqa: E402

FIGURES = ("lost", "reordered", "rerun_after_next", "overlaps", "stale", "dups", "dups_done",
           "stored_dups", "retried", "stall", "failover")


async def _one(name: str, run_timeout: float, keep: Path | None, index: int) -> Outcome | str:
    with contextlib.ExitStack() as stack:
        if keep is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"soak-{name}-")))
        else:
            tmp = keep / f"{name}-{index}"
            tmp.mkdir(parents=True, exist_ok=True)
        try:
            return await asyncio.wait_for(SCENARIOS[name](tmp), timeout=run_timeout)
        except TimeoutError:
            return f"timed out after {run_timeout:.0f}s"
        except Exception as e:  # a scenario's own wait failed: report it, go on
            return f"{type(e).__name__}: {e}"


def _row(values: dict[str, float | int | None]) -> str:
    return " ".join(f"{k}={values.get(k)}" for k in FIGURES)


def _summary(name: str, outcomes: list[Outcome], errors: int) -> str:
    lines = [f"== {name}: {len(outcomes)} runs, {errors} errors, "
             f"{sum(1 for o in outcomes if o.ok)} clean"]
    for key in FIGURES:
        vals = [v for o in outcomes if (v := o.report.figures().get(key)) is not None]
        if not vals:
            lines.append(f"   {key:<12} -")
            continue
        lines.append(f"   {key:<12} min {min(vals):<8g} median {statistics.median(vals):<8g} "
                     f"max {max(vals):<8g} total {sum(vals):g}")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; try --list", file=sys.stderr)
        return 2
    print(environment())
    stop_at = time.monotonic() + args.max_minutes * 60
    results: dict[str, list[Outcome]] = {n: [] for n in names}
    errors: dict[str, int] = dict.fromkeys(names, 0)
    for name in names:
        for i in range(args.repeat):
            if time.monotonic() > stop_at:
                print(f"{name} #{i + 1}: skipped, --max-minutes reached", flush=True)
                break
            outcome = await _one(name, args.run_timeout, args.keep, i + 1)
            if isinstance(outcome, str):
                errors[name] += 1
                first, _, rest = outcome.partition("\n")
                print(f"{name} #{i + 1}: ERROR {first}", flush=True)
                if args.verbose and rest.strip():
                    # The processes' stderr tails: all there is to go on afterwards.
                    print(textwrap.indent(rest.rstrip(), "    "), flush=True)
                continue
            results[name].append(outcome)
            r = outcome.report
            status = "ok" if outcome.ok else "FAIL"
            extra = " ".join(f"{k}={v}" for k, v in outcome.notes.items())
            print(f"{name} #{i + 1}: {status} {outcome.elapsed:.1f}s {_row(r.figures())} "
                  f"{extra}".rstrip(), flush=True)
            if args.verbose and (r.problems or outcome.failures):
                print("   " + "\n   ".join([*outcome.failures, *r.problems[:10]]), flush=True)
    print()
    for name in names:
        print(_summary(name, results[name], errors[name]))
    bad = any(errors[n] or any(not o.ok for o in results[n]) for n in names)
    return 1 if bad else 0


def main() -> None:
    """Parse arguments, run the soak, exit 1 if any run broke a guarantee."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", help="run only this one (repeatable)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--run-timeout", type=float, default=180.0,
                        help="seconds one run may take before it is abandoned")
    parser.add_argument("--max-minutes", type=float, default=120.0,
                        help="no new run starts after this long")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each run's process logs under this directory")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print violations, and the processes' stderr of a failed run")
    add_loop_option(parser)
    args = parser.parse_args()
    # The bus in this process reconnects through the faults; keep its warnings out.
    logging.basicConfig(level=logging.ERROR)
    if args.list:
        print("\n".join(SCENARIOS))
        return
    # The scenarios' worker and sender processes read it (tests/worker_proc.py).
    os.environ[LOOP_ENV] = args.loop
    sys.exit(run_loop(_main(args), args.loop))


if __name__ == "__main__":
    main()

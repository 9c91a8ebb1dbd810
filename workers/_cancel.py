"""Cancelling tasks so that they really end.

On CPython 3.11 a cancel can be lost while a task iterates nested async
generators (``Bucket.watch`` over ``Bucket._consume``, ``Session.history``
over the replay): the task swallows it and goes on waiting. A lost cancel
of a background task hangs shutdown; of a turn, a handback. So cancel,
wait a little, and cancel again while the task lives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

#: How long to wait between repeated cancels.
RECANCEL_AFTER = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until all ended, repeating the cancel as needed.

    Exceptions of the tasks are not raised.
    """
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)
        for task in pending:
            logger.debug("task %s did not end on cancel; cancelling again", task.get_name())
            task.cancel()

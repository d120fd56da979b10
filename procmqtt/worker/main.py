"""The worker process's entry point: the supervisor calls ``serve`` in the child, after fork.

It picks the loop the app needs (``uses_asyncio``) and runs it; the loops share everything else
(``loop.ServeLoop``). Kept apart from the loops so that none of them imports another.
"""

from __future__ import annotations

import socket

from procmqtt.config import Config
from procmqtt.ipc.shared import SharedState
from procmqtt.worker.aio import AsyncLoop
from procmqtt.worker.base import Worker, uses_asyncio
from procmqtt.worker.sync import SyncLoop


def serve(
    app: type[Worker],
    slot: int,
    generation: int,
    config: Config,
    inbound: socket.socket,
    upstream: socket.socket,
    shared: SharedState,
) -> int:
    """The worker process's main function, after fork; returns the process exit code.

    Apps with any ``async def`` hook or route run on an event loop (``aio.AsyncLoop``), the others
    in a plain loop (``sync.SyncLoop``), with the same boot, exits and exit codes.
    """
    kind = AsyncLoop if uses_asyncio(app) else SyncLoop
    return kind(app, slot, generation, config, inbound, upstream, shared).run()

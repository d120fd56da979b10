"""The worker loop for sync apps: one message at a time, in the worker process's main thread.

The flat loop of ``ServeLoop.serve``: every exit is a ``return`` after a log line that says why.
Runs in the worker process, after fork.
"""

from __future__ import annotations

import logging

from procmqtt.ipc import channel
from procmqtt.worker.loop import ServeLoop


class SyncLoop(ServeLoop):
    """Reads one record at a time from the link and handles each delivery inline."""

    def serve(self) -> None:
        """Exits: a STOP record (graceful stop or recycling: everything queued before it is handled
        first), SIGTERM (stop after the current message), or the agent side closing for good."""
        link, runner = self.link, self.runner
        while True:
            if self.signals.pending() and self.signals.pop():
                self.stop("SIGTERM", logging.INFO, "SIGTERM: stopping after the current message")
                return
            record = link.next()
            if isinstance(record, channel.Deliver):
                message = self.started(record)
                self.done(record.delivery_id, runner.handle(message))
            elif isinstance(record, channel.Stop):
                self.stop("stop requested", logging.DEBUG, "stop requested; every message received was handled")
                return
            elif link.closed:
                self.stop("the agent's channel closed", logging.WARNING, "the agent's channel closed; stopping")
                return

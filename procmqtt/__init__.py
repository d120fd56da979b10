"""procmqtt: run MQTT consumers on many CPU cores.

One agent process holds the MQTT connection; N worker processes run your ``Worker`` handlers.
"""

from procmqtt.errors import PublishBufferFull, RequestFailed
from procmqtt.message import InvalidPayload, Message, Outcome, Properties, Retry
from procmqtt.worker.answers import PublishError, PublishHandle
from procmqtt.worker.base import Worker
from procmqtt.worker.middleware import Middleware, Outgoing, SlowLog
from procmqtt.worker.routes import Route, route

__version__ = "0.1.0"
__all__ = [
    "InvalidPayload",
    "Message",
    "Middleware",
    "Outcome",
    "Outgoing",
    "Properties",
    "PublishBufferFull",
    "PublishError",
    "PublishHandle",
    "RequestFailed",
    "Retry",
    "Route",
    "SlowLog",
    "Worker",
    "__version__",
    "route",
]

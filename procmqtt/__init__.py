"""procmqtt: run MQTT consumers on many CPU cores.

One agent process holds the MQTT connection; N worker processes run your ``Worker`` handlers.
"""

from .errors import PublishBufferFull
from .message import Message, Outcome
from .routes import Route, route
from .worker import PublishHandle, Worker

__version__ = "0.1.0"
__all__ = ["Message", "Outcome", "PublishBufferFull", "PublishHandle", "Route", "Worker", "__version__",
           "route"]

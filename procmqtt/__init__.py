"""procmqtt: run MQTT consumers on many CPU cores.

One agent process holds the MQTT connection; N worker processes run your ``Worker`` handlers.
"""

from .errors import PublishBufferFull, RequestFailed
from .message import Message, Outcome, Properties
from .routes import Route, route
from .worker import PublishHandle, Worker

__version__ = "0.1.0"
__all__ = ["Message", "Outcome", "Properties", "PublishBufferFull", "PublishHandle", "RequestFailed", "Route",
           "Worker", "__version__", "route"]

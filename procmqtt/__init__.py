"""procmqtt: run MQTT consumers on many CPU cores.

One agent process holds the MQTT connection; N worker processes run your ``Worker.on_message``.
"""

from .errors import PublishBufferFull
from .message import Message
from .worker import PublishHandle, Worker

__version__ = "0.1.0"
__all__ = ["Message", "PublishBufferFull", "PublishHandle", "Worker", "__version__"]

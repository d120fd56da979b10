"""An async handler calling a slow service: IO-bound work overlaps on one event loop per worker.

With ``[workers] concurrency = 50`` one worker has up to 50 messages in flight, each waiting on
the service, without threads; ``await self.publish(...)`` waits until the broker has the reply.

    procmqtt run examples/async_client.py:Enricher -c examples/async_client.toml --broker embedded
    mosquitto_pub -p PORT -t orders/o-17 -m '{"customer": "c-3", "amount": 12.5}'
    mosquitto_sub -p PORT -t 'enriched/#' -v
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from procmqtt import Message, Worker, route


class FakeCustomerService:
    """Stands in for an HTTP client (``httpx.AsyncClient``) or a database pool (``asyncpg``):
    each call waits ``latency`` seconds, as a network round trip would."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.calls = 0
        self.closed = False

    async def customer(self, customer_id: str) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(self.latency)
        return {"id": customer_id, "tier": "gold" if zlib.crc32(customer_id.encode()) % 4 == 0 else "standard"}

    async def aclose(self) -> None:
        self.closed = True


class Enricher(Worker):
    async def on_start(self) -> None:
        self.service = FakeCustomerService(latency=float(self.config.app.get("latency", 0.05)))

    @route("orders/{order_id}", qos=1)
    async def order(self, message: Message, order_id: str) -> None:
        order = message.json()
        customer = await self.service.customer(str(order["customer"]))
        await self.publish(f"enriched/{order_id}", {**order, "order_id": order_id, "tier": customer["tier"]}, qos=1)

    async def on_stop(self) -> None:
        await self.service.aclose()

"""A Redis subscriber that follows a published table the way a gateway does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
import redis.asyncio as aioredis

from hpcgate.schemas import EndpointTable, KeyTable
from tests.control.conftest import Stack
from tests.support.services import REDIS_URL

T = TypeVar("T", EndpointTable, KeyTable)


class Subscriber(Generic[T]):
    """Follows one published table like a gateway: PUBLISHed version, then GET the snapshot."""

    def __init__(self, stack: Stack, kind: type[T]) -> None:
        names = stack.names
        self._kind = kind
        self._key = names.endpoint_table if kind is EndpointTable else names.key_table
        self._channel = names.endpoint_table_channel if kind is EndpointTable else names.key_table_channel
        self._client = aioredis.from_url(REDIS_URL)
        self._pubsub = self._client.pubsub()
        self.versions: list[int] = []

    async def __aenter__(self) -> Subscriber[T]:
        await self._pubsub.subscribe(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pubsub.aclose()
        await self._client.aclose()

    async def until(self, predicate: Callable[[T], bool], timeout: float = 15.0) -> T:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 0.5))
            if message is None:
                continue
            version = int(message["data"])
            assert not self.versions or version > self.versions[-1], "versions must only grow"
            self.versions.append(version)
            raw = await self._client.get(self._key)
            table = msgspec.json.decode(raw, type=self._kind)
            assert table.version >= version
            if predicate(table):
                return table
        raise AssertionError(f"no published {self._kind.__name__} matched within {timeout}s")

"""A synchronous client on the session's embedded Valkey: the Kubernetes actuator polls Redis synchronously."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis as sync_redis

from tests.unit.router.router_testkit import valkey_url  # noqa: F401  (the session's Valkey)


@pytest.fixture
def valkey_sync(valkey_url: str) -> Iterator[sync_redis.Redis]:  # noqa: F811
    client = sync_redis.Redis.from_url(valkey_url)
    client.flushdb()
    yield client
    client.close()

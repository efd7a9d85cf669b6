"""Fixtures of the router tests; the helpers themselves live in router_testkit.py."""

from tests.unit.router.router_testkit import redis, valkey_url  # noqa: F401  (pytest fixtures)

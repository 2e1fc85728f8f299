"""Run-time tenant stores (Redis) and the latest-event read cache."""

from configbus.store.redis_store import DEFAULT_PREFIX, TenantStore, nest

__all__ = ["DEFAULT_PREFIX", "TenantStore", "nest"]

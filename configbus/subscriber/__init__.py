"""The subscriber SDK that services embed: verified hot reload of one stream."""

from configbus.subscriber.core import (
    Callback,
    ConfigSubscriber,
    NoConfigError,
    Snapshot,
    Validator,
)
from configbus.subscriber.settings import SubscriberSettings
from configbus.subscriber.sync import SyncSubscriber

__all__ = [
    "Callback",
    "ConfigSubscriber",
    "NoConfigError",
    "Snapshot",
    "SubscriberSettings",
    "SyncSubscriber",
    "Validator",
]

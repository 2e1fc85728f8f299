"""The publisher: resolve streams and publish signed events; the daemon that watches."""

from configbus.publisher.core import Change, Publisher, PublishReport
from configbus.publisher.daemon import Daemon, StreamIndex, publish_once, run
from configbus.publisher.settings import PublisherSettings
from configbus.publisher.state import StreamState, recover

__all__ = [
    "Change",
    "Daemon",
    "PublishReport",
    "Publisher",
    "PublisherSettings",
    "StreamIndex",
    "StreamState",
    "publish_once",
    "recover",
    "run",
]

"""A small typed adapter over aiokafka, which has no type hints.

Only what configbus needs: an admin client that creates topics on demand, an
idempotent (optionally transactional) producer, a reader that takes topics from the
beginning to their current end, and a follower that keeps reading. Everything else
in configbus talks to these classes, never to aiokafka directly, so the untyped
surface stays in this one file.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiokafka.producer.sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import AIOKafkaConnection, collect_hosts
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    InvalidMessageError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
    UnsupportedForMessageFormatError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest

from configbus.bus import security
from configbus.bus.base import Bus, Headers, Record
from configbus.errors import AuthorizationError, BusError, FencedError, RefusedError, SettingsError
from configbus.options import pick

__all__ = [
    "Admin",
    "FencedError",
    "KafkaBus",
    "KafkaSettings",
    "PartitionReader",
    "Producer",
    "Record",
    "TopicsReader",
    "follow",
    "read_to_end",
]

log = logging.getLogger(__name__)

# A transaction begun right after the previous one committed is refused by the broker
# (CONCURRENT_TRANSACTIONS) until the previous one's markers are written, which takes
# a millisecond or two; aiokafka waits 20 ms before asking again. A publication right
# after another (or after a writer heartbeat) paid those 20 ms: ask again after 2 ms.
aiokafka.producer.sender.BACKOFF_OVERRIDE = 0.002

ABORT_TIMEOUT_S = 5.0  # aborting a failed transaction, at most
CLOSE_TIMEOUT_S = 2.0  # a refused connection's socket closing, at most
CONNECT_GRACE_S = 5.0  # a connection cancelled while it opens: time to finish first
_T = TypeVar("_T")
RECENT_MAX_BYTES = 32 * 1024 * 1024  # records `PartitionReader.recent` holds, at most
STOP_TIMEOUT_S = 10.0  # closing a producer (it flushes what is queued), at most


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Where the cluster is, how clients authenticate to it, and how topics are created.

    The security fields mean what librdkafka's settings of the same names mean
    (``security.protocol``, ``sasl.username``, ``ssl.ca.location``, ...); `build` reads
    them from ``CONFIGBUS_KAFKA_*`` variables (configbus/bus/security.py). The repr
    shows no password. A combination no client can connect with is a `SettingsError`
    naming the variable."""

    bootstrap_servers: str
    client_id: str = "configbus"
    request_timeout_ms: int = 15_000
    replication_factor: int = 1
    min_insync_replicas: int = 1
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: str = "SCRAM-SHA-512"  # or SCRAM-SHA-256, PLAIN
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_ca_location: str | None = None  # the CA that signed the brokers' certificates
    ssl_certificate_location: str | None = None  # the client's, for mutual TLS
    ssl_key_location: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        security.check(self)

    @classmethod
    def build(
        cls,
        bootstrap_servers: str | None = None,
        *,
        client_id: str = "configbus",
        replication_factor: int = 1,
        min_insync_replicas: int = 1,
        environ: Mapping[str, str] | None = None,
    ) -> KafkaSettings:
        """The cluster of `bootstrap_servers`, else of ``CONFIGBUS_BOOTSTRAP_SERVERS``,
        with the security settings of the ``CONFIGBUS_KAFKA_*`` variables: the one way
        every component (daemon, CLI, SDK, agent) makes its settings. Password files are
        read, and the TLS files loaded once, here: a bad file fails now, in one line."""
        servers = pick(bootstrap_servers, "CONFIGBUS_BOOTSTRAP_SERVERS", "", str, environ)
        if not servers:
            raise SettingsError(
                "no Kafka cluster: give --bootstrap-servers or set CONFIGBUS_BOOTSTRAP_SERVERS"
            )
        settings = cls(
            bootstrap_servers=servers,
            client_id=client_id,
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
            **security.from_environ(environ),
        )
        security.client_options(settings)  # loads the TLS files: a bad one fails here
        return settings

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client (producer, consumer, admin) takes
        to reach the cluster: servers, security protocol, TLS context, SASL."""
        return security.client_options(self)


def _record(message: Any) -> Record:
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple((k, bytes(v) if v is not None else b"") for k, v in message.headers or ()),
        timestamp_ms=message.timestamp,
    )


# Records the broker (or the client, before sending) will never accept as they are.
_REFUSALS: tuple[type[KafkaError], ...] = (
    CorruptRecordException,
    InvalidMessageError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)


# The principal is not who it claims, or no ACL lets it do this.
_DENIALS: tuple[type[KafkaError], ...] = (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


def _bus_error(exc: BaseException, doing: str) -> BusError:
    if isinstance(exc, _DENIALS):
        return AuthorizationError(f"{doing}: not authorized ({_reason(exc)})")
    if isinstance(exc, ProducerFenced):
        return FencedError(f"{doing}: fenced by a newer publisher ({exc})")
    if isinstance(exc, _REFUSALS):
        return RefusedError(f"{doing}: {_reason(exc)}")
    error = BusError(f"{doing}: {_reason(exc)}")
    error.retriable = bool(getattr(exc, "retriable", True))
    return error


def _broker_error(code: int, message: str | None, doing: str) -> BusError:
    """The `BusError` of an error code in a broker's answer."""
    kind = for_code(code)
    return _bus_error(kind(message) if message else kind(), doing)


def _reason(exc: BaseException) -> str:
    """``Name: detail`` once: aiokafka's errors name themselves in their text already
    (a broker's answer after its code, "[Error 29] TopicAuthorizationFailedError: t")."""
    name, text = exc.__class__.__name__, str(exc)
    if text.startswith("[Error ") and "] " in text:
        text = text.partition("] ")[2]
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class Admin:
    """Topic creation and listing."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._client: Any = None

    async def start(self) -> Admin:
        if self._client is None:
            client = AIOKafkaAdminClient(
                **self.settings.client_options(),
                client_id=f"{self.settings.client_id}-admin",
                request_timeout_ms=self.settings.request_timeout_ms,
            )
            self._client = await _started(
                client, self.settings, "connecting the admin client", client.close
            )
        return self

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> Admin:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def request(self, request: Any, doing: str) -> Any:
        """Send an admin request aiokafka has no call for (the ACL ones, configbus/bus/
        acls.py) to any broker; its response. Raises `BusError` saying what failed."""
        if self._client is None:
            raise BusError(f"{doing}: the admin client is not connected")
        try:
            return await self._client._send_request(request)
        except KafkaError as exc:
            raise _bus_error(exc, doing) from exc

    async def topics(self) -> set[str]:
        try:
            names = await self._client.list_topics()
        except KafkaError as exc:
            raise _bus_error(exc, "listing topics") from exc
        return set(names)

    async def ensure_topics(
        self, names: Iterable[str], *, compact: bool, configs: Mapping[str, str] | None = None
    ) -> list[str]:
        """Create the topics in `names` that do not exist yet (one partition each), with
        the topic `configs` given (e.g. ``{"max.message.bytes": "4096"}``) on top of
        ours. Returns the names created."""
        wanted = sorted(set(names) - await self.topics())
        configs = {
            "min.insync.replicas": str(self.settings.min_insync_replicas),
            "cleanup.policy": "compact" if compact else "delete",
            **(configs or {}),
        }
        created = []
        for start in range(0, len(wanted), 500):
            batch = [
                NewTopic(
                    name,
                    num_partitions=1,
                    replication_factor=self.settings.replication_factor,
                    topic_configs=configs,
                )
                for name in wanted[start : start + 500]
            ]
            try:
                response = await self._client.create_topics(batch)
            except TopicAlreadyExistsError:
                continue
            except KafkaError as exc:
                raise _bus_error(exc, "creating topics") from exc
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:
                    # By its kind: not authorized (no Create ACL) is no broker down.
                    raise _broker_error(code, rest[0] if rest else None, f"creating topic {name}")
        if created:
            log.info("created %d topic(s)", len(created), extra={"topics": created[:10]})
            await self.wait_for_leaders(created)
        return created

    async def max_message_bytes(self, topic: str) -> int | None:
        """The topic's ``max.message.bytes`` (the largest record batch it accepts), or None
        when the topic does not exist."""
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        try:
            (response,) = await self._client.describe_configs([resource])
        except KafkaError as exc:
            raise _bus_error(exc, f"describing topic {topic}") from exc
        for code, message, _type, _name, entries in response.resources:
            if code not in (0, UnknownTopicOrPartitionError.errno):
                raise _broker_error(code, message, f"describing topic {topic}")
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    return int(entry[1])
        return None

    async def delete_topics(self, names: Iterable[str]) -> None:
        """Delete topics (benchmarks and tests clean up after themselves)."""
        wanted = sorted(set(names) & await self.topics())
        for start in range(0, len(wanted), 500):
            try:
                await self._client.delete_topics(wanted[start : start + 500])
            except KafkaError as exc:
                raise _bus_error(exc, "deleting topics") from exc

    async def wait_for_leaders(self, topics: Sequence[str], max_seconds: float = 120.0) -> None:
        """Wait until every partition of `topics` has a leader. New topics take a
        moment (thousands of them, several seconds); producing before that fails."""
        deadline = time.monotonic() + max_seconds
        waiting = list(topics)
        while waiting:
            try:
                cluster = await self._client._client.fetch_all_metadata()
            except KafkaError as exc:
                raise _bus_error(exc, "fetching topic metadata") from exc
            waiting = [
                topic
                for topic in waiting
                if not (partitions := cluster.partitions_for_topic(topic))
                or any(
                    (cluster.leader_for_partition(TopicPartition(topic, p)) or -1) < 0
                    for p in partitions
                )
            ]
            if waiting and time.monotonic() > deadline:
                raise BusError(
                    f"{len(waiting)} new topic(s) still have no leader, e.g. {waiting[0]}"
                )
            if waiting:
                await asyncio.sleep(0.1)


class Producer:
    """Idempotent producer, acks=all; transactional when given a transactional id.

    A transactional producer fences every older producer with the same id when it
    starts: their next send or commit fails with `FencedError`."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        transactional_id: str | None = None,
        linger_ms: int = 0,
        max_batch_size: int = 256 * 1024,
    ) -> None:
        self.settings = settings
        self.transactional_id = transactional_id
        self._options = {"linger_ms": linger_ms, "max_batch_size": max_batch_size}
        self._producer: Any = None

    async def start(self) -> Producer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                **self.settings.client_options(),
                client_id=f"{self.settings.client_id}-producer",
                request_timeout_ms=self.settings.request_timeout_ms,
                acks="all",
                enable_idempotence=True,
                transactional_id=self.transactional_id,
                max_request_size=8 * 1024 * 1024,
                **self._options,
            )
            self._producer = await _started(
                producer, self.settings, "starting the producer", producer.stop
            )
        return self

    async def stop(self) -> None:
        """Close the producer; bounded, since closing flushes what is queued, which
        against an unreachable broker would never end."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await producer.stop()
            except TimeoutError:
                log.warning("a producer did not close within %gs; dropped", STOP_TIMEOUT_S)

    async def __aenter__(self) -> Producer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def _live(self) -> Any:
        if self._producer is None:
            raise BusError("the producer is not connected")
        return self._producer

    async def restart(self) -> None:
        """Drop the connection and make a new producer (after a failed transaction, the
        old one may be stuck in an error state). A transactional producer comes back
        with a new epoch; an error connecting is raised, and `restart` can be retried."""
        await self.stop()
        await self.start()

    async def track_topics(self, topics: Iterable[str]) -> None:
        """Fetch metadata for `topics` in one request. Without it the producer learns
        each topic on its first send, one metadata round trip at a time, which makes
        the first fan-out to thousands of tenants take seconds instead of milliseconds."""
        client = self._live.client
        wanted = set(topics)
        if not wanted <= client._topics:
            try:
                await client.set_topics(sorted(client._topics | wanted))
            except KafkaError as exc:
                raise _bus_error(exc, "fetching topic metadata") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Everything sent inside commits together, or not at all.

        When the block fails (or is cancelled, e.g. by a caller's deadline), the abort
        is given `ABORT_TIMEOUT_S`: against an unreachable broker aiokafka would wait for
        it forever, out of reach of the caller's deadline, which has already fired. A
        transaction left open is aborted by the broker, or fenced when the producer is
        made again (`restart`), which callers do after any failure."""
        producer = self._live
        try:
            await producer.begin_transaction()
        except KafkaError as exc:
            raise _bus_error(exc, "starting a transaction") from exc
        except AssertionError as exc:
            # aiokafka's transaction state machine refusing to begin: after a fence
            # ("FATAL_ERROR -> IN_TRANSACTION") this producer may never write again;
            # after an abort that did not finish (a lost topic, a dead broker) only a new
            # producer can go on. Neither is worth a traceback.
            if producer._txn_manager.is_fatal_error():
                raise FencedError(f"starting a transaction: fenced ({exc})") from exc
            raise BusError(f"starting a transaction: the producer is unusable ({exc})") from exc
        try:
            yield
            await producer.commit_transaction()
        except BaseException as exc:
            await self._abort(producer)
            if isinstance(exc, KafkaError):
                raise _bus_error(exc, "committing a transaction") from exc
            raise

    @staticmethod
    async def _abort(producer: Any) -> None:
        if producer._txn_manager.is_fatal_error():  # fenced: nothing to abort
            return
        try:
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                await producer.abort_transaction()
        except (KafkaError, TimeoutError) as exc:
            log.warning("could not abort a transaction: %s", exc.__class__.__name__)

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[None]:
        """Queue a record; the returned future resolves when the broker has it, or
        raises `BusError`. `timestamp_ms`: the record's timestamp (default: now)."""
        try:
            future = await self._live.send(
                topic, value=value, key=key, headers=list(headers), timestamp_ms=timestamp_ms
            )
        except KafkaError as exc:
            raise _bus_error(exc, f"sending to {topic}") from exc
        return asyncio.ensure_future(_acknowledged(future, topic))

    async def send_and_wait(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))


async def _acknowledged(future: Any, topic: str) -> None:
    try:
        await future
    except KafkaError as exc:
        raise _bus_error(exc, f"sending to {topic}") from exc


def _consumer(settings: KafkaSettings, isolation: str, **options: Any) -> Any:
    return AIOKafkaConsumer(
        **settings.client_options(),
        client_id=f"{settings.client_id}-reader",
        request_timeout_ms=settings.request_timeout_ms,
        enable_auto_commit=False,
        isolation_level=isolation,
        group_id=None,
        **options,
    )


def _follower(settings: KafkaSettings) -> Any:
    """A consumer that follows topics from positions set explicitly (the readers')."""
    return _consumer(
        settings,
        "read_committed",
        fetch_max_wait_ms=500,  # answered at once when data arrives; idle polls cost CPU
        # Positions are always set explicitly; this only answers "out of range", as after
        # the topic was deleted and made again: read the new log from its start (older
        # versions are then refused as stale), never skip what it holds.
        auto_offset_reset="earliest",
    )


async def _started(
    client: Any, settings: KafkaSettings, doing: str, close: Callable[[], Awaitable[Any]]
) -> Any:
    """`client` once started; else closed, and a `BusError` saying what failed."""
    try:
        await _connecting(client.start())
    except KafkaError as exc:
        await close()
        raise await _start_error(exc, settings, doing) from exc
    except asyncio.CancelledError:
        await close()  # cancelled while connecting: leave no client open
        raise
    return client


async def _connecting(opening: Awaitable[_T]) -> _T:
    """`opening` (a step that may open a broker connection), not cut off half way:
    aiokafka loses track of a connection cancelled while it opens, and leaves its
    socket to the garbage collector. Cancelled, this lets it finish (briefly), so that
    the client that owns the connection closes it, then raises the cancellation."""
    step = asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        await asyncio.wait({step}, timeout=CONNECT_GRACE_S)
        if not step.done():
            step.cancel()
        elif not step.cancelled():
            step.exception()  # retrieved: it is not logged as never retrieved
        raise


async def _start_error(exc: KafkaError, settings: KafkaSettings, doing: str) -> BusError:
    """The error of a client that did not start. When no broker lets it in, aiokafka
    raises only "Unable to bootstrap" (and logs why): a broker that refused the login
    or the TLS handshake is asked once more here, so that the error names the refusal
    (not retriable) instead of looking like a broker that is down."""
    if isinstance(exc, KafkaConnectionError) and settings.security_protocol != "PLAINTEXT":
        refusal = await _refusal(settings, doing)
        if refusal is not None:
            return refusal
    return _bus_error(exc, doing)


async def _refusal(settings: KafkaSettings, doing: str) -> BusError | None:
    """Why the brokers of `settings` do not let this client in, when one answers but
    refuses its credentials or TLS; None when none does (down, unreachable, or in)."""
    options = settings.client_options()
    servers = options.pop("bootstrap_servers")
    variables = security.VARIABLES
    for host, port, _ in collect_hosts(servers, randomize=False):
        where = f"{doing}: {host}:{port}"
        connection = AIOKafkaConnection(
            host,
            port,
            client_id=f"{settings.client_id}-probe",
            request_timeout_ms=settings.request_timeout_ms,
            **options,
        )
        try:
            async with asyncio.timeout(settings.request_timeout_ms / 1000):
                await connection.connect()
        except (SaslAuthenticationFailed, AuthenticationFailedError):
            return AuthorizationError(
                f"{where} refused the login of {settings.sasl_username!r} "
                f"({settings.sasl_mechanism}): authentication failed (are "
                f"{variables['sasl_username']} and its password right?)"
            )
        except ssl.SSLCertVerificationError as exc:
            error = BusError(
                f"{where}: the broker's TLS certificate does not verify "
                f"({exc.verify_message}; is {variables['ssl_ca_location']} the CA that "
                "signed it?)"
            )
            error.retriable = False
            return error
        except ssl.SSLError as exc:
            return AuthorizationError(
                f"{where} refused the TLS handshake ({exc.reason or exc.__class__.__name__})"
            )
        except KafkaConnectionError:
            if settings.security_protocol != "SSL":
                continue
            # Closed right after the handshake: what a mutual-TLS listener does to a
            # client without a certificate it accepts (TLS 1.3 sends the alert late).
            return AuthorizationError(
                f"{where} closed the TLS connection at once: it takes no certificate of "
                f"this client's ({variables['ssl_certificate_location']}: none, or not signed "
                f"by a CA it trusts), or it wants SASL ({variables['security_protocol']}"
                "=SASL_SSL)"
            )
        except (OSError, KafkaError, TimeoutError):
            continue
        finally:
            await _closed(connection)
    return None


async def _closed(connection: Any) -> None:
    """Close an aiokafka connection and wait (briefly) until its socket is: a TLS one
    takes a round trip, and an event loop closed before that fails ("resource busy")."""
    opened = connection._protocol is not None  # else no socket, and nothing to wait for
    closing = connection.close()
    if opened and closing is not None:
        await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S)


async def _partitions(consumer: Any, topics: Sequence[str]) -> list[Any]:
    """The partitions of those of `topics` that exist. One metadata request for just
    these topics (a whole cluster's metadata is ~52 bytes a topic: megabytes at scale,
    for every reader that starts), which never creates a topic on a cluster that
    auto-creates, and logs nothing for a topic that does not exist yet. A topic this
    principal may not describe raises `TopicAuthorizationFailedError`, not "absent"."""
    if not topics:
        return []
    client = consumer._client
    node = client.get_random_node()
    if node is None:
        raise KafkaConnectionError("no broker known")
    request = MetadataRequest(list(topics), allow_auto_topic_creation=False)
    response = await _connecting(client.send(node, request))
    found = []
    for entry in response.topics:
        error_code, topic = entry[0], entry[1]
        partitions = entry[2] if response.API_VERSION == 0 else entry[3]
        if error_code == TopicAuthorizationFailedError.errno and topic in topics:
            raise TopicAuthorizationFailedError(topic)  # not "no such topic": say why
        if error_code == 0 and topic in topics:
            found += [TopicPartition(topic, partition[1]) for partition in partitions]
    return sorted(found, key=lambda tp: (topics.index(tp.topic), tp.partition))


async def read_to_end(
    settings: KafkaSettings,
    topics: Sequence[str],
    *,
    isolation: str = "read_committed",
    max_seconds: float = 60.0,
) -> AsyncGenerator[Record, None]:
    """Every record of `topics` from the beginning to the end they had when the call
    started. Topics that do not exist are skipped. Raises `BusError` on timeout."""
    consumer = _consumer(settings, isolation)
    try:
        await _started(consumer, settings, "reading topics", consumer.stop)
        partitions = await _partitions(consumer, topics)
        if not partitions:
            return
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends: Mapping[Any, int] = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > await consumer.position(tp)}
        deadline = time.monotonic() + max_seconds
        while pending:
            if time.monotonic() > deadline:
                raise BusError(f"reading {len(pending)} partition(s) to their end timed out")
            batches = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
            for tp, messages in batches.items():
                for message in messages:
                    if message.offset < ends[tp]:
                        yield _record(message)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    except KafkaError as exc:
        raise _bus_error(exc, "reading topics") from exc
    finally:
        await consumer.stop()


async def follow(
    settings: KafkaSettings,
    topics: Sequence[str],
    *,
    from_beginning: bool = True,
    isolation: str = "read_committed",
) -> AsyncGenerator[Record, None]:
    """Every record of `topics`, then every new one, until cancelled."""
    consumer = _consumer(settings, isolation, fetch_max_wait_ms=50)
    try:
        await _started(consumer, settings, "following topics", consumer.stop)
        partitions = await _partitions(consumer, topics)
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for messages in batches.values():
                for message in messages:
                    yield _record(message)
    except KafkaError as exc:
        raise _bus_error(exc, "following topics") from exc
    finally:
        await consumer.stop()


class PartitionReader:
    """Reads one single-partition topic: the latest record for a key first (reading
    backwards from the end in growing chunks, so start-up costs a few round trips, not
    a scan of history), then every record after it, as it arrives."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._consumer: Any = None
        self._tp = TopicPartition(topic, 0)
        self._seen = False  # whether the consumer's metadata has held the topic

    async def start(self) -> bool:
        """Connect. Returns False (and stays stopped) while the topic does not exist."""
        if self._consumer is not None:
            return True
        consumer = _follower(self.settings)
        await _started(consumer, self.settings, f"connecting to {self.topic}", consumer.stop)
        try:
            if not await _partitions(consumer, [self.topic]):
                await consumer.stop()
                return False
        except KafkaError as exc:
            await consumer.stop()
            raise _bus_error(exc, f"connecting to {self.topic}") from exc
        except asyncio.CancelledError:
            await consumer.stop()
            raise
        consumer.assign([self._tp])
        self._consumer = consumer
        return True

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def latest(self, key: bytes, *, chunk: int = 16) -> Record | None:
        """The last committed record with `key`, or None. Leaves the reader positioned
        at the end the topic had, ready to follow."""
        consumer, tp = self._consumer, self._tp
        try:
            begin = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            upper = end
            while upper > begin:
                lower = max(begin, upper - chunk)
                consumer.seek(tp, lower)
                found: Record | None = None
                while await consumer.position(tp) < upper:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for message in batch.get(tp, ()):
                        if message.offset < upper and message.key == key:
                            found = _record(message)
                if found is not None:
                    consumer.seek(tp, end)
                    return found
                upper, chunk = lower, chunk * 4
            consumer.seek(tp, end)
            return None
        except KafkaError as exc:
            raise _bus_error(exc, f"reading {self.topic}") from exc

    async def recent(
        self, key: bytes, *, limit: int = 64, chunk: int = 64, max_bytes: int = RECENT_MAX_BYTES
    ) -> list[Record]:
        """Up to `limit` of the last committed records with `key`, oldest first (reading
        backwards from the end in growing chunks), and no further back once `max_bytes`
        of them are held: whatever the topic holds, memory stays bounded. Leaves the
        reader positioned at the end the topic had, ready to follow."""
        found = await self.recent_keys((key,), limit=limit, chunk=chunk, max_bytes=max_bytes)
        return found[key]

    async def recent_keys(
        self,
        keys: Sequence[bytes],
        *,
        limit: int = 64,
        chunk: int = 64,
        max_bytes: int = RECENT_MAX_BYTES,
    ) -> dict[bytes, list[Record]]:
        """`recent` for several keys in one backward read (a second read back costs a
        fetch wait): it goes back until the first key has `limit` records, the topic
        begins or `max_bytes` are held; the other keys get what lies on the way."""
        consumer, tp = self._consumer, self._tp
        found: dict[bytes, list[Record]] = {key: [] for key in keys}
        held = 0
        try:
            begin = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            upper = end
            while upper > begin and len(found[keys[0]]) < limit and held < max_bytes:
                lower = max(begin, upper - chunk)
                consumer.seek(tp, lower)
                window: dict[bytes, list[Record]] = {key: [] for key in keys}
                while await consumer.position(tp) < upper:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for message in batch.get(tp, ()):
                        if message.offset < upper and message.key in window:
                            window[message.key].append(_record(message))
                for key, records in window.items():
                    found[key] = records + found[key]
                    held += sum(len(record.value or b"") for record in records)
                upper, chunk = lower, chunk * 4
            consumer.seek(tp, end)
        except KafkaError as exc:
            raise _bus_error(exc, f"reading {self.topic}") from exc
        return {key: records[-limit:] for key, records in found.items()}

    async def poll(self, timeout_ms: int = 1000) -> list[Record]:
        """The records that arrived since the last call (waits up to `timeout_ms`).
        Raises `BusError` once the topic is gone from the cluster: aiokafka would go on
        asking for it, logging an error each time (thousands a second), where the
        caller should back off and wait for the topic to come back."""
        try:
            batch = await self._consumer.getmany(self._tp, timeout_ms=timeout_ms)
        except KafkaError as exc:
            raise _bus_error(exc, f"reading {self.topic}") from exc
        client = self._consumer._client
        if client.cluster.partitions_for_topic(self.topic) is not None:
            self._seen = True
        elif self._seen or self.topic in client._topics:  # asked for, and not there
            raise BusError(f"topic {self.topic} is gone from the cluster")
        return [_record(message) for message in batch.get(self._tp, ())]


class TopicsReader:
    """Follows many single-partition topics with one consumer, each from the end it had
    when it was added: the host agent reads every tenant topic of its host so. A topic
    deleted from the cluster is dropped (aiokafka would otherwise ask for it, logging
    an error each time) and named in `dropped` until added again."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.dropped: set[str] = set()
        self._consumer: Any = None
        self._partitions: dict[str, Any] = {}  # followed topic -> its partition

    @property
    def topics(self) -> set[str]:
        return set(self._partitions)

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = _follower(self.settings)
        self._consumer = await _started(consumer, self.settings, "connecting", consumer.stop)

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._partitions.clear()
        if consumer is not None:
            await consumer.stop()

    async def add(self, topics: Iterable[str]) -> set[str]:
        """Follow `topics` too, each from its current end, in one metadata request;
        returns those now followed (a topic that does not exist is not). Not to be
        called while a `poll` is running."""
        new = sorted(set(topics) - set(self._partitions))
        if not new:
            return set()
        try:
            found = {
                tp.topic: tp for tp in await _partitions(self._consumer, new) if tp.partition == 0
            }
            if found:
                await self._assign({**self._partitions, **found}, new=list(found))
        except KafkaError as exc:
            raise _bus_error(exc, f"following {len(new)} topic(s)") from exc
        self.dropped -= set(found)
        return set(found)

    async def _assign(self, partitions: dict[str, Any], new: Sequence[str] = ()) -> None:
        """Assign `partitions`, keeping the positions of those already followed (an
        assignment resets every position) and putting `new` ones at their end."""
        consumer = self._consumer
        kept = {
            tp: await consumer.position(tp)
            for topic, tp in self._partitions.items()
            if topic in partitions
        }
        consumer.assign(list(partitions.values()))
        for tp, position in kept.items():
            consumer.seek(tp, position)
        if new:
            ends = await consumer.end_offsets([partitions[topic] for topic in new])
            for tp, end in ends.items():
                consumer.seek(tp, end)
        self._partitions = partitions

    async def poll(self, timeout_ms: int = 1000) -> list[Record]:
        """The records of every followed topic that arrived since the last call."""
        consumer = self._consumer
        if not self._partitions:
            await asyncio.sleep(timeout_ms / 1000)
            return []
        try:
            batches = await consumer.getmany(timeout_ms=timeout_ms)
            cluster = consumer._client.cluster
            gone = {t for t in self._partitions if cluster.partitions_for_topic(t) is None}
            if gone:
                log.warning(
                    "no longer following %s: gone from the cluster", ", ".join(sorted(gone))
                )
                self.dropped |= gone
                await self._assign({t: tp for t, tp in self._partitions.items() if t not in gone})
        except KafkaError as exc:
            raise _bus_error(exc, "reading topics") from exc
        return [_record(message) for messages in batches.values() for message in messages]


@dataclass(frozen=True, slots=True)
class KafkaBus:
    """The `Bus` on a real Kafka cluster."""

    settings: KafkaSettings

    def admin(self) -> Admin:
        return Admin(self.settings)

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        return Producer(self.settings, transactional_id=transactional_id)

    def reader(self, topic: str) -> PartitionReader:
        return PartitionReader(self.settings, topic)

    def topics_reader(self) -> TopicsReader:
        return TopicsReader(self.settings)

    def read_to_end(
        self, topics: Sequence[str], *, max_seconds: float = 60.0
    ) -> AsyncGenerator[Record, None]:
        return read_to_end(self.settings, topics, max_seconds=max_seconds)

    def follow(
        self, topics: Sequence[str], *, from_beginning: bool = True
    ) -> AsyncGenerator[Record, None]:
        return follow(self.settings, topics, from_beginning=from_beginning)


def _conforms(bus: KafkaBus) -> Bus:  # pragma: no cover - for mypy: KafkaBus is a Bus
    return bus

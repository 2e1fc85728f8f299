"""The exceptions configbus raises, in one tree.

    ConfigBusError                  root of everything configbus raises on purpose
    ├── SettingsError               an option or environment variable has a bad value
    ├── TreeError                   the environment tree cannot be resolved; carries problems
    │   ├── UnknownNameError        an environment, tenant or override that does not exist
    │   └── SchemaError             a resolved config breaks the JSON Schema
    ├── KeyringError                a signing key, public key or trust file is unusable
    ├── SecretError                 a secret value does not seal or open (names no value)
    ├── LimitError                  a config, event or value is larger than configbus allows
    ├── VerificationError           an event failed verification; `reason` says why
    ├── NoConfigError               a subscriber found no config to start on (retriable)
    └── BusError                    Kafka unreachable or refusing (retriable)
        ├── FencedError             another publisher took over (not retriable)
        ├── ActiveWriterError       another publisher is active on these topics
        ├── RefusedError            Kafka refused a record for good (not retriable)
        └── AuthorizationError      Kafka refused this principal: credentials or ACLs

Every error that is about a place in a file carries `Problem`s, each of which prints
as one line: ``path/to/file.yml:LINE: dotted.key: message``. Messages never contain
secret values.

`retriable` says whether trying the same call again later may succeed (a broker that
is down: yes; a YAML syntax error: no, somebody has to edit the file).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ActiveWriterError",
    "AuthorizationError",
    "BusError",
    "ConfigBusError",
    "FencedError",
    "KeyringError",
    "LimitError",
    "NoConfigError",
    "Problem",
    "RefusedError",
    "SchemaError",
    "SecretError",
    "SettingsError",
    "TreeError",
    "UnknownNameError",
    "VerificationError",
    "display_path",
]


def display_path(path: str | Path) -> str:
    """A path as a person wants to read it: relative to the working directory when
    it lies below it, absolute otherwise. Store keys and other non-paths pass as is."""
    text = str(path)
    if "://" in text or not os.path.isabs(text):
        return text
    try:
        relative = os.path.relpath(text)
    except ValueError:  # another drive on Windows
        return text
    return text if relative.startswith("..") else relative


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in the tree, pinned to the source that caused it."""

    source: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        place = display_path(self.source)
        if self.line is not None:
            place = f"{place}:{self.line}"
        if self.key:
            return f"{place}: {self.key}: {self.message}"
        return f"{place}: {self.message}"

    def sort_key(self) -> tuple[str, int, str]:
        return (self.source, self.line or 0, self.key or "")


class ConfigBusError(Exception):
    """Root of the exceptions configbus raises."""

    retriable: bool = False


class SettingsError(ConfigBusError):
    """A setting (argument or ``CONFIGBUS_*`` variable) is missing or malformed."""


class TreeError(ConfigBusError):
    """The environment tree cannot be resolved. `problems` lists every reason found."""

    def __init__(self, problems: Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(source="", line=None, key=None, message=problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(_one_line(p) for p in self.problems))


class UnknownNameError(TreeError):
    """An environment, tenant or override was named that the tree does not have."""


class SchemaError(TreeError):
    """A resolved config does not satisfy the tree's JSON Schema."""


def _one_line(problem: Problem) -> str:
    return str(problem) if problem.source else problem.message


class KeyringError(ConfigBusError):
    """A signing key, public key or trust file is missing, unreadable or malformed."""


class SecretError(ConfigBusError):
    """A secret could not be sealed or opened. The message names the secret (tenant,
    environment, name), never its value."""


class LimitError(ConfigBusError):
    """A config, event or value breaks one of the limits in `configbus.limits`. Not
    retriable: the input has to change."""


class VerificationError(ConfigBusError):
    """An event failed verification. `reason` is a short stable code (for metrics and
    acknowledgements): bad_signature, unknown_key, key_revoked, key_expired,
    key_not_yet_valid, untrusted_scope, malformed, unknown_schema, hash_mismatch,
    wrong_stream, wrong_channel, stale_version, too_large, ttl_too_long,
    issued_in_future, refused (a validator said no)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class BusError(ConfigBusError):
    """Kafka could not be reached or refused a request. Usually retriable."""

    retriable = True


class FencedError(BusError):
    """Another publisher took over the transactional id. Not retriable: this process
    must stop writing (the daemon goes on standby)."""

    retriable = False


class ActiveWriterError(BusError):
    """Another publisher is active on these topics (its heartbeats arrive), so this one
    may not write; `publish --once --take-over` may."""

    retriable = False


class RefusedError(BusError):
    """Kafka refused a record in a way no retry can mend (too large for the topic, an
    invalid record). Only the stream it belongs to fails."""

    retriable = False


class AuthorizationError(BusError):
    """Kafka refused this client: its credentials (SASL or certificate) do not
    authenticate it, or no ACL allows what it asked (read a topic, write one, use a
    transactional id). Not retriable: an operator has to change the credentials or the
    ACLs (`configbus acl apply`). The message says what was refused."""

    retriable = False


class NoConfigError(ConfigBusError):
    """`start()` found no config to start on: Kafka unreachable, the stream never
    published, or every record rejected; and no disk cache. The message says which.
    Retriable: the next start may find it."""

    retriable = True

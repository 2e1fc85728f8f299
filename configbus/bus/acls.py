"""Kafka ACLs through the admin API: describe, create and delete ACL bindings.

aiokafka's admin client has no ACL calls, so the three requests are defined here with
aiokafka's protocol classes, version 1 of each (Kafka 2.0 and later, the first with
prefixed patterns; Kafka 4.x answers versions 1 to 3): DescribeAcls (key 29),
CreateAcls (key 30) and DeleteAcls (key 31). An `Acl` is one binding: a resource
pattern (type, name, literal or prefixed), a principal, a host, an operation and
ALLOW or DENY. The principal asking needs the cluster's Describe (to describe) and
Alter (to create and delete) permissions: in practice a super user.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.errors import for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int8, Int16, Int32, Schema, String

from configbus.errors import BusError

if TYPE_CHECKING:
    from configbus.bus.kafka import Admin

__all__ = [
    "Acl",
    "Operation",
    "PatternType",
    "Permission",
    "ResourceType",
    "create_acls",
    "delete_acls",
    "describe_acls",
]

BATCH = 500  # bindings per request


class ResourceType(enum.IntEnum):
    ANY = 1
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class PatternType(enum.IntEnum):
    ANY = 1
    MATCH = 2
    LITERAL = 3
    PREFIXED = 4


class Operation(enum.IntEnum):
    ANY = 1
    ALL = 2
    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    CLUSTER_ACTION = 9
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11
    IDEMPOTENT_WRITE = 12


class Permission(enum.IntEnum):
    ANY = 1
    DENY = 2
    ALLOW = 3


def _label(member: enum.IntEnum) -> str:
    return member.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True, order=True)
class Acl:
    """One ACL binding, as Kafka stores it."""

    resource_type: ResourceType
    resource_name: str
    pattern: PatternType
    principal: str
    operation: Operation
    permission: Permission = Permission.ALLOW
    host: str = "*"

    def __str__(self) -> str:
        """``ALLOW User:svc-a READ topic configbus.tenant.a``, with `*` after a prefix."""
        star = "*" if self.pattern == PatternType.PREFIXED else ""
        host = "" if self.host == "*" else f" from {self.host}"
        return (
            f"{self.permission.name} {self.principal}{host} {self.operation.name} "
            f"{_label(self.resource_type)} {self.resource_name}{star}"
        )

    def _fields(self) -> tuple[Any, ...]:
        return (
            int(self.resource_type),
            self.resource_name,
            int(self.pattern),
            self.principal,
            self.host,
            int(self.operation),
            int(self.permission),
        )


# -- the wire format: DescribeAcls, CreateAcls, DeleteAcls v1, named as Kafka names them ------
_STR = String("utf-8")
_BINDING = (
    ("resource_type", Int8),
    ("resource_name", _STR),
    ("resource_pattern_type", Int8),
    ("principal", _STR),
    ("host", _STR),
    ("operation", Int8),
    ("permission_type", Int8),
)


class DescribeAclsResponse_v1(Response):  # type: ignore[misc]
    API_KEY = 29
    API_VERSION = 1
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", _STR),
        (
            "resources",
            Array(
                ("resource_type", Int8),
                ("resource_name", _STR),
                ("resource_pattern_type", Int8),
                (
                    "acls",
                    Array(
                        ("principal", _STR),
                        ("host", _STR),
                        ("operation", Int8),
                        ("permission_type", Int8),
                    ),
                ),
            ),
        ),
    )


class DescribeAclsRequest_v1(RequestStruct):  # type: ignore[misc]
    API_KEY = 29
    API_VERSION = 1
    RESPONSE_TYPE = DescribeAclsResponse_v1
    SCHEMA = Schema(
        ("resource_type", Int8),
        ("resource_name", _STR),
        ("resource_pattern_type_filter", Int8),
        ("principal", _STR),
        ("host", _STR),
        ("operation", Int8),
        ("permission_type", Int8),
    )


class CreateAclsResponse_v1(Response):  # type: ignore[misc]
    API_KEY = 30
    API_VERSION = 1
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("creation_responses", Array(("error_code", Int16), ("error_message", _STR))),
    )


class CreateAclsRequest_v1(RequestStruct):  # type: ignore[misc]
    API_KEY = 30
    API_VERSION = 1
    RESPONSE_TYPE = CreateAclsResponse_v1
    SCHEMA = Schema(("creations", Array(*_BINDING)))


class DeleteAclsResponse_v1(Response):  # type: ignore[misc]
    API_KEY = 31
    API_VERSION = 1
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "filter_responses",
            Array(
                ("error_code", Int16),
                ("error_message", _STR),
                (
                    "matching_acls",
                    Array(("error_code", Int16), ("error_message", _STR), *_BINDING),
                ),
            ),
        ),
    )


class DeleteAclsRequest_v1(RequestStruct):  # type: ignore[misc]
    API_KEY = 31
    API_VERSION = 1
    RESPONSE_TYPE = DeleteAclsResponse_v1
    SCHEMA = Schema(("filters", Array(*_BINDING)))


# aiokafka picks a request's version from its one generic base (here a single version);
# each takes its struct's fields in order.
class _DescribeAcls(Request[DescribeAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 29

    def __init__(self, *fields: Any) -> None:
        self.fields = fields

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class(*self.fields)


class _CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 30

    def __init__(self, creations: list[tuple[Any, ...]]) -> None:
        self.creations = creations

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class(self.creations)


class _DeleteAcls(Request[DeleteAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 31

    def __init__(self, filters: list[tuple[Any, ...]]) -> None:
        self.filters = filters

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class(self.filters)


def _check(code: int, message: str | None, doing: str) -> None:
    if code:
        error = for_code(code)
        raise BusError(f"{doing}: {error.__name__}: {message or error.description}")


# -- what configbus calls --------------------------------------------------------------------
async def describe_acls(admin: Admin) -> list[Acl]:
    """Every ACL binding of the cluster, sorted."""
    request = _DescribeAcls(
        int(ResourceType.ANY),
        None,
        int(PatternType.ANY),
        None,
        None,
        int(Operation.ANY),
        int(Permission.ANY),
    )
    response = await admin.request(request, "describing ACLs")
    _check(response.error_code, response.error_message, "describing ACLs")
    found = []
    for resource_type, name, pattern, bindings in response.resources:
        for principal, host, operation, permission in bindings:
            found.append(
                Acl(
                    ResourceType(resource_type),
                    name,
                    PatternType(pattern),
                    principal,
                    Operation(operation),
                    Permission(permission),
                    host,
                )
            )
    return sorted(found)


async def create_acls(admin: Admin, acls: Iterable[Acl]) -> int:
    """Create `acls` (creating one that exists changes nothing); returns how many were
    asked for. Raises `BusError` naming the first binding Kafka refused."""
    wanted = sorted(set(acls))
    for start in range(0, len(wanted), BATCH):
        batch = wanted[start : start + BATCH]
        response = await admin.request(
            _CreateAcls([acl._fields() for acl in batch]), "creating ACLs"
        )
        for acl, (code, message) in zip(batch, response.creation_responses, strict=True):
            _check(code, message, f"creating ACL {acl}")
    return len(wanted)


async def delete_acls(admin: Admin, acls: Iterable[Acl]) -> list[Acl]:
    """Delete exactly `acls` (each filter matches one binding); returns those deleted."""
    wanted: Sequence[Acl] = sorted(set(acls))
    deleted: list[Acl] = []
    for start in range(0, len(wanted), BATCH):
        batch = wanted[start : start + BATCH]
        response = await admin.request(
            _DeleteAcls([acl._fields() for acl in batch]), "deleting ACLs"
        )
        for acl, (code, message, matching) in zip(batch, response.filter_responses, strict=True):
            _check(code, message, f"deleting ACL {acl}")
            for match in matching:
                _check(match[0], match[1], f"deleting ACL {acl}")
            if matching:
                deleted.append(acl)
    return deleted

"""ACLs as code: what each principal of a deployment may do on the bus, and the plan
that brings a cluster's ACLs there (``configbus acl plan|apply``).

A deployment names its principals (``acls.yml``, or flags):

    publisher: User:configbus-publisher       # or a list
    services:                                 # principal: the tenants whose config it reads
      User:svc-aurora: [aurora-records]
    operators:                                # principal: the tenants it overrides ("*": all)
      User:oncall: ["*"]
    agents:                                   # host agents: principal: tenants ("*": all)
      User:agent-eu1: ["*"]

What each role is granted (P the tenant topic prefix, A/K/S the audit, acks and state
topics; every grant ALLOW, any host):

- publisher: Read, Write, Describe, Create, DescribeConfigs on topics prefixed P (every
  tenant topic, present and future, and the state topic P_state); the same on A (Read:
  `rollback` reads old versions there); Read, Describe, Create on K (it creates it, and
  reads the fleet's acks before retiring a secret); Write, Describe on its transactional
  id (literal). No cluster grant: creating topics is granted per topic, and an
  idempotent producer needs only Write on a topic (Kafka 3.0+, KIP-679).
- service, agent: Read, Describe on each of its tenants' topics (literal: never a
  prefix, which would reach other tenants and the state topic); Write, Describe on K.
  No consumer group: configbus's readers assign partitions and commit nothing.
- operator: Read, Write, Describe on its tenants' topics (an override is read, then
  written, there); Write, Describe on A (the override's audit record, a secret read's
  note); Read, Describe on K (`override set --wait`); Write, Describe on the
  transactional ids prefixed ``configbus-override.<P><tenant>.`` (one per stream).
  Read on A, and Read, Describe on S, only for an operator of every tenant ("*"): the
  audit topic holds every tenant's configs, and `configbus audit verify` checks the
  publisher's chain head on S.

"*" means every tenant of the tree, each granted by name. A tenant a principal names
that the tree does not have gets nothing, with a note; so removing a tenant from the
tree lists its ACLs for removal. The plan manages the ALLOW bindings on configbus's
resources (topics under P, A, K, S, and the transactional ids of P's publisher and
overrides): one there that the deployment does not call for is listed for removal,
whoever made it; DENY bindings, and everything else on the cluster, are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from configbus.bus import TopicNames
from configbus.bus.acls import Acl, Operation, PatternType, Permission, ResourceType
from configbus.errors import SettingsError, display_path
from configbus.ops.overrides import override_transactional_id
from configbus.tree.tree import TENANT_ID

__all__ = ["ALL_TENANTS", "AclPlan", "Deployment", "desired_acls", "is_managed", "plan"]

ALL_TENANTS: Final = "*"
PRINCIPAL: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*:[^\s]+")
ROLES: Final = ("publisher", "services", "operators", "agents")

R, W, D = Operation.READ, Operation.WRITE, Operation.DESCRIBE
CREATE, CONFIGS = Operation.CREATE, Operation.DESCRIBE_CONFIGS
TOPIC, TXN = ResourceType.TOPIC, ResourceType.TRANSACTIONAL_ID
LITERAL, PREFIXED = PatternType.LITERAL, PatternType.PREFIXED

Scopes = Mapping[str, tuple[str, ...]]  # principal -> tenants ("*": all)


@dataclass(frozen=True, slots=True)
class Deployment:
    """The principals that use the bus, by role, and the tenants each one serves."""

    publishers: tuple[str, ...] = ()
    services: Scopes = field(default_factory=dict)
    operators: Scopes = field(default_factory=dict)
    agents: Scopes = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        """An ``acls.yml``; unknown keys, malformed principals and tenant ids are
        errors naming the file and the entry."""
        where = display_path(path)
        try:
            with open(path, encoding="utf-8") as file:
                data = yaml.safe_load(file)
        except OSError as exc:
            raise SettingsError(f"{where}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"{where}: not YAML ({exc.__class__.__name__})") from None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise SettingsError(f"{where}: expected a mapping of {', '.join(ROLES)}")
        unknown = sorted(str(key) for key in data if key not in ROLES)
        if unknown:
            raise SettingsError(
                f"{where}: unknown key(s) {', '.join(unknown)} (say {', '.join(ROLES)})"
            )
        publishers = data.get("publisher") or ()
        if isinstance(publishers, str):
            publishers = (publishers,)
        if not isinstance(publishers, list | tuple):
            raise SettingsError(f"{where}: publisher: a principal or a list of them")
        return cls(
            publishers=tuple(_principal(p, f"{where}: publisher") for p in publishers),
            services=_scopes(data.get("services"), f"{where}: services"),
            operators=_scopes(data.get("operators"), f"{where}: operators"),
            agents=_scopes(data.get("agents"), f"{where}: agents"),
        )

    @classmethod
    def from_flags(
        cls,
        *,
        publishers: Iterable[str] = (),
        services: Iterable[str] = (),
        operators: Iterable[str] = (),
        agents: Iterable[str] = (),
    ) -> Deployment:
        """From ``--publisher P``, ``--service TENANT=P``, ``--operator P[=T,...]`` and
        ``--agent P[=T,...]`` (an operator or agent without tenants: every tenant)."""
        found: dict[str, dict[str, list[str]]] = {"services": {}}
        for flag in services:
            tenant, sep, principal = flag.partition("=")
            if not sep:
                raise SettingsError(f"--service {flag}: say TENANT=PRINCIPAL")
            principal = _principal(principal, f"--service {flag}")
            found["services"].setdefault(principal, []).append(_tenant(tenant, "--service"))
        for role, flags in (("operators", operators), ("agents", agents)):
            found[role] = {}
            for flag in flags:
                principal, sep, tenants = flag.partition("=")
                principal = _principal(principal, f"--{role[:-1]} {flag}")
                names = tenants.split(",") if sep else [ALL_TENANTS]
                found[role].setdefault(principal, []).extend(
                    _tenant(t, f"--{role[:-1]}") for t in names
                )
        return cls(
            publishers=tuple(_principal(p, "--publisher") for p in publishers),
            **{role: {p: tuple(ts) for p, ts in scopes.items()} for role, scopes in found.items()},
        )

    def merged(self, other: Deployment) -> Deployment:
        """This deployment with `other`'s principals added (their tenants joined)."""

        def join(a: Scopes, b: Scopes) -> dict[str, tuple[str, ...]]:
            out = {p: tuple(ts) for p, ts in a.items()}
            for principal, tenants in b.items():
                out[principal] = tuple(dict.fromkeys((*out.get(principal, ()), *tenants)))
            return out

        return Deployment(
            publishers=tuple(dict.fromkeys((*self.publishers, *other.publishers))),
            services=join(self.services, other.services),
            operators=join(self.operators, other.operators),
            agents=join(self.agents, other.agents),
        )

    @property
    def empty(self) -> bool:
        return not (self.publishers or self.services or self.operators or self.agents)


def _principal(value: Any, where: str) -> str:
    if not isinstance(value, str) or not PRINCIPAL.fullmatch(value):
        raise SettingsError(f"{where}: {value!r} is not a principal (say User:NAME)")
    return value


def _tenant(value: Any, where: str) -> str:
    if value != ALL_TENANTS and (not isinstance(value, str) or not TENANT_ID.fullmatch(value)):
        raise SettingsError(f"{where}: {value!r} is not a tenant id (or * for every tenant)")
    return str(value)


def _scopes(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected principal: [tenant, ...]")
    scopes = {}
    for principal, tenants in value.items():
        _principal(principal, where)
        listed = [tenants] if isinstance(tenants, str) else tenants
        if not isinstance(listed, list) or not listed:
            raise SettingsError(f'{where}: {principal}: a list of tenants (or ["*"])')
        scopes[principal] = tuple(_tenant(t, f"{where}: {principal}") for t in listed)
    return scopes


# -- what the deployment calls for -----------------------------------------------------------
def _grants(
    principal: str, kind: ResourceType, name: str, pattern: PatternType, ops: Iterable[Operation]
) -> set[Acl]:
    return {Acl(kind, name, pattern, principal, op) for op in ops}


def desired_acls(
    deployment: Deployment, tenants: Sequence[str], topics: TopicNames
) -> tuple[set[Acl], list[str]]:
    """The ALLOW bindings `deployment` calls for, given the tree's `tenants`; and notes
    (tenants named that the tree does not have)."""
    _check_prefix(topics)
    known = set(tenants)
    notes: list[str] = []
    acls: set[Acl] = set()

    def scope(principal: str, listed: Sequence[str]) -> list[str]:
        wanted = sorted(known) if ALL_TENANTS in listed else sorted(set(listed))
        for tenant in wanted:
            if tenant not in known:
                notes.append(f"{principal}: tenant {tenant} is not in the tree: no ACLs for it")
        return [t for t in wanted if t in known]

    for principal in deployment.publishers:
        owned = (R, W, D, CREATE, CONFIGS)
        acls |= _grants(principal, TOPIC, topics.prefix, PREFIXED, owned)
        if not topics.state.startswith(topics.prefix):
            acls |= _grants(principal, TOPIC, topics.state, LITERAL, (R, W, D, CREATE))
        acls |= _grants(principal, TOPIC, topics.audit, LITERAL, owned)
        acls |= _grants(principal, TOPIC, topics.acks, LITERAL, (R, D, CREATE))
        acls |= _grants(principal, TXN, topics.transactional_id, LITERAL, (W, D))
    for role in (deployment.services, deployment.agents):
        for principal, listed in role.items():
            for tenant in scope(principal, listed):
                acls |= _grants(principal, TOPIC, topics.tenant_topic(tenant), LITERAL, (R, D))
            acls |= _grants(principal, TOPIC, topics.acks, LITERAL, (W, D))
    for principal, listed in deployment.operators.items():
        for tenant in scope(principal, listed):
            acls |= _grants(principal, TOPIC, topics.tenant_topic(tenant), LITERAL, (R, W, D))
            txn = override_transactional_id(topics, tenant, "")  # "...<tenant>.": any env
            acls |= _grants(principal, TXN, txn, PREFIXED, (W, D))
        acls |= _grants(principal, TOPIC, topics.audit, LITERAL, (W, D))
        acls |= _grants(principal, TOPIC, topics.acks, LITERAL, (R, D))
        if ALL_TENANTS in listed:  # the trail, and the state topic's chain head with it
            acls |= _grants(principal, TOPIC, topics.audit, LITERAL, (R,))
            acls |= _grants(principal, TOPIC, topics.state, LITERAL, (R, D))
    return acls, sorted(set(notes))


def _check_prefix(topics: TopicNames) -> None:
    if not topics.prefix:
        raise SettingsError(
            "the tenant topic prefix is empty: configbus's topics cannot be told from "
            "others', so their ACLs cannot be managed (set --topic-prefix)"
        )


def is_managed(acl: Acl, topics: TopicNames) -> bool:
    """Whether `acl` is one the plan owns: an ALLOW binding on configbus's resources."""
    _check_prefix(topics)
    if acl.permission != Permission.ALLOW:
        return False
    name = acl.resource_name
    if acl.resource_type == TOPIC:
        shared = {topics.audit, topics.acks, topics.state}
        if acl.pattern == PREFIXED:
            return name.startswith(topics.prefix)
        if acl.pattern == LITERAL:
            return name in shared or topics.tenant_of(name) is not None
        return False
    if acl.resource_type == TXN and acl.pattern in (LITERAL, PREFIXED):
        return name == topics.transactional_id or name.startswith(
            override_transactional_id(topics, "", "")[:-1]  # "configbus-override.<P>"
        )
    return False


@dataclass(frozen=True, slots=True)
class AclPlan:
    """What `apply` creates, what it may remove (`--prune`), what stays as it is."""

    create: tuple[Acl, ...]
    remove: tuple[Acl, ...]
    keep: tuple[Acl, ...]
    notes: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        return bool(self.create or self.remove)

    def lines(self) -> list[str]:
        """The plan as a person reads it: notes, ``+`` to create, ``-`` to remove, and a
        summary line."""
        out = [f"note: {note}" for note in self.notes]
        out += [f"+ {acl}" for acl in _display(self.create)]
        out += [f"- {acl}" for acl in _display(self.remove)]
        out.append(
            f"{len(self.create)} to create, {len(self.remove)} to remove "
            f"(apply --prune), {len(self.keep)} in place"
        )
        return out


def _display(acls: Iterable[Acl]) -> list[Acl]:
    """Grouped by principal, then resource."""
    return sorted(
        acls, key=lambda a: (a.principal, a.resource_type, a.resource_name, a.pattern, a.operation)
    )


def plan(
    deployment: Deployment, tenants: Sequence[str], topics: TopicNames, current: Iterable[Acl]
) -> AclPlan:
    """Compare what `deployment` calls for with the cluster's `current` ACLs."""
    wanted, notes = desired_acls(deployment, tenants, topics)
    managed = {acl for acl in current if is_managed(acl, topics)}
    return AclPlan(
        create=tuple(_display(wanted - managed)),
        remove=tuple(_display(managed - wanted)),
        keep=tuple(_display(wanted & managed)),
        notes=tuple(notes),
    )

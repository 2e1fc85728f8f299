"""ACLs as code (configbus/ops/acls.py): a deployment from ``acls.yml`` or flags, each
error naming its file and entry; the ALLOW bindings each role is granted; the plan
against a cluster's ACLs (create, remove, keep), which leaves DENY bindings and other
resources alone; and ``configbus acl plan|apply`` on an in-memory cluster, with its
usage errors as one line and exit 2. No broker here: tests/integration/test_security.py
applies the ACLs to a real one."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from configbus import cli_acl
from configbus.bus import TopicNames
from configbus.bus import acls as bus_acls
from configbus.bus.acls import Acl, Operation, PatternType, Permission, ResourceType
from configbus.cli import main
from configbus.errors import BusError, SettingsError
from configbus.ops.acls import AclPlan, Deployment, desired_acls, is_managed, plan

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
TOPICS = TopicNames(
    prefix="cb.tenant.", audit="cb.audit", acks="cb.acks"
)  # state: cb.tenant._state
TENANTS = ["aurora-records", "helix-audio", "nimbus-fm"]
R, W, D = Operation.READ, Operation.WRITE, Operation.DESCRIBE
CREATE, CONFIGS = Operation.CREATE, Operation.DESCRIBE_CONFIGS
TOPIC, TXN, GROUP = ResourceType.TOPIC, ResourceType.TRANSACTIONAL_ID, ResourceType.GROUP
LITERAL, PREFIXED = PatternType.LITERAL, PatternType.PREFIXED


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the environment the tests run in."""
    for name in [name for name in os.environ if name.startswith("CONFIGBUS_")]:
        monkeypatch.delenv(name)


def grants(
    principal: str, kind: ResourceType, name: str, pattern: PatternType, *ops: Operation
) -> set[Acl]:
    return {Acl(kind, name, pattern, principal, op) for op in ops}


def of(acls: Iterable[Acl], principal: str) -> set[Acl]:
    return {acl for acl in acls if acl.principal == principal}


# -- acls.yml ----------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acls.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_deployment_file_names_each_role(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
publisher: User:configbus-publisher
services:
  User:svc-aurora: [aurora-records]
  User:svc-helix: helix-audio          # one tenant, without a list
operators:
  User:oncall: ["*"]
agents:
  User:agent-eu1: [aurora-records, nimbus-fm]
""",
    )
    deployment = Deployment.load(path)
    assert deployment.publishers == ("User:configbus-publisher",)
    assert deployment.services == {
        "User:svc-aurora": ("aurora-records",),
        "User:svc-helix": ("helix-audio",),
    }
    assert deployment.operators == {"User:oncall": ("*",)}
    assert deployment.agents == {"User:agent-eu1": ("aurora-records", "nimbus-fm")}
    assert not deployment.empty


def test_a_deployment_file_may_list_publishers_or_be_empty(tmp_path: Path) -> None:
    listed = Deployment.load(write(tmp_path, "publisher: [User:a, User:b]\n"))
    assert listed.publishers == ("User:a", "User:b")
    assert Deployment.load(write(tmp_path, "# nobody yet\n")).empty


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- User:a\n", "acls.yml: expected a mapping of publisher, services, operators, agents"),
        (
            "publishers: User:a\nreaders: {}\n",
            "acls.yml: unknown key(s) publishers, readers (say publisher, services, operators, "
            "agents)",
        ),
        ("publisher: {User:a: 1}\n", "acls.yml: publisher: a principal or a list of them"),
        (
            "publisher: configbus-publisher\n",
            "acls.yml: publisher: 'configbus-publisher' is not a principal (say User:NAME)",
        ),
        ("services: [User:a]\n", "acls.yml: services: expected principal: [tenant, ...]"),
        (
            "services:\n  svc-a: [aurora-records]\n",
            "acls.yml: services: 'svc-a' is not a principal (say User:NAME)",
        ),
        (
            "operators:\n  User:oncall: []\n",
            'acls.yml: operators: User:oncall: a list of tenants (or ["*"])',
        ),
        (
            "agents:\n  User:agent: [Aurora_Records]\n",
            "acls.yml: agents: User:agent: 'Aurora_Records' is not a tenant id (or * for every "
            "tenant)",
        ),
        (
            "services:\n  User:a: [7]\n",
            "acls.yml: services: User:a: 7 is not a tenant id (or * for every tenant)",
        ),
        ("publisher: [User:a\n", "acls.yml: not YAML (ParserError)"),
    ],
    ids=[
        "not-a-mapping",
        "unknown-keys",
        "publisher-mapping",
        "publisher-principal",
        "services-list",
        "service-principal",
        "no-tenants",
        "tenant-id",
        "tenant-number",
        "not-yaml",
    ],
)
def test_a_malformed_deployment_file_names_the_file_and_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)  # the file is named as given, relative to here
    write(tmp_path, text)
    with pytest.raises(SettingsError) as refused:
        Deployment.load("acls.yml")
    assert str(refused.value) == expected


def test_a_missing_deployment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"acls\.yml: No such file or directory$"):
        Deployment.load(tmp_path / "acls.yml")


# -- flags -------------------------------------------------------------------------------
def test_flags_make_a_deployment() -> None:
    deployment = Deployment.from_flags(
        publishers=["User:pub"],
        services=["aurora-records=User:svc", "helix-audio=User:svc", "nimbus-fm=User:nim"],
        operators=["User:oncall", "User:aurora-ops=aurora-records,helix-audio"],
        agents=["User:agent"],
    )
    assert deployment.publishers == ("User:pub",)
    assert deployment.services == {
        "User:svc": ("aurora-records", "helix-audio"),
        "User:nim": ("nimbus-fm",),
    }
    assert deployment.operators == {
        "User:oncall": ("*",),  # without tenants: every tenant
        "User:aurora-ops": ("aurora-records", "helix-audio"),
    }
    assert deployment.agents == {"User:agent": ("*",)}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"services": ["User:svc"]}, "--service User:svc: say TENANT=PRINCIPAL"),
        (
            {"services": ["aurora-records=svc"]},
            "--service aurora-records=svc: 'svc' is not a principal (say User:NAME)",
        ),
        (
            {"services": ["Aurora=User:svc"]},
            "--service: 'Aurora' is not a tenant id (or * for every tenant)",
        ),
        ({"operators": ["User:ops="]}, "--operator: '' is not a tenant id (or * for every tenant)"),
        ({"agents": ["agent"]}, "--agent agent: 'agent' is not a principal (say User:NAME)"),
        ({"publishers": ["pub"]}, "--publisher: 'pub' is not a principal (say User:NAME)"),
    ],
)
def test_a_malformed_flag_is_named(flags: dict[str, list[str]], expected: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Deployment.from_flags(**flags)
    assert str(refused.value) == expected


def test_a_file_and_flags_join_without_repeating_anyone() -> None:
    a = Deployment(publishers=("User:p",), services={"User:s": ("aurora-records",)})
    b = Deployment(
        publishers=("User:p", "User:q"),
        services={"User:s": ("aurora-records", "helix-audio")},
        agents={"User:agent": ("*",)},
    )
    joined = a.merged(b)
    assert joined.publishers == ("User:p", "User:q")
    assert joined.services == {"User:s": ("aurora-records", "helix-audio")}
    assert joined.agents == {"User:agent": ("*",)}
    assert joined.operators == {}
    assert Deployment().empty and Deployment().merged(Deployment()).empty


# -- what each role is granted -------------------------------------------------------------
def test_the_publisher_owns_every_topic_under_the_prefix() -> None:
    wanted, notes = desired_acls(Deployment(publishers=("User:pub",)), TENANTS, TOPICS)
    assert notes == []
    assert wanted == (
        grants("User:pub", TOPIC, "cb.tenant.", PREFIXED, R, W, D, CREATE, CONFIGS)
        | grants("User:pub", TOPIC, "cb.audit", LITERAL, R, W, D, CREATE, CONFIGS)
        | grants("User:pub", TOPIC, "cb.acks", LITERAL, R, D, CREATE)
        | grants("User:pub", TXN, "configbus-publisher.cb.tenant.", LITERAL, W, D)
    )


def test_a_state_topic_outside_the_prefix_is_granted_by_name() -> None:
    topics = TopicNames(prefix="cb.tenant.", audit="cb.audit", acks="cb.acks", state="cb.state")
    wanted, _ = desired_acls(Deployment(publishers=("User:pub",)), TENANTS, topics)
    state = {acl for acl in wanted if acl.resource_name == "cb.state"}
    assert state == grants("User:pub", TOPIC, "cb.state", LITERAL, R, W, D, CREATE)


def test_a_service_reads_its_tenants_topics_by_name_and_writes_acks() -> None:
    deployment = Deployment(services={"User:svc": ("aurora-records", "helix-audio")})
    wanted, notes = desired_acls(deployment, TENANTS, TOPICS)
    assert notes == []
    assert wanted == (
        grants("User:svc", TOPIC, "cb.tenant.aurora-records", LITERAL, R, D)
        | grants("User:svc", TOPIC, "cb.tenant.helix-audio", LITERAL, R, D)
        | grants("User:svc", TOPIC, "cb.acks", LITERAL, W, D)
    )


def test_an_agent_of_every_tenant_is_granted_each_tenant_by_name() -> None:
    wanted, _ = desired_acls(Deployment(agents={"User:agent": ("*",)}), TENANTS, TOPICS)
    reads = {acl.resource_name for acl in wanted if acl.operation == R}
    assert reads == {f"cb.tenant.{tenant}" for tenant in TENANTS}
    assert all(acl.pattern == LITERAL for acl in wanted)


def test_an_operator_overrides_its_tenants_and_reads_the_audit_only_for_all() -> None:
    one = Deployment(operators={"User:ops": ("aurora-records",)})
    wanted, _ = desired_acls(one, TENANTS, TOPICS)
    assert wanted == (
        grants("User:ops", TOPIC, "cb.tenant.aurora-records", LITERAL, R, W, D)
        | grants("User:ops", TXN, "configbus-override.cb.tenant.aurora-records.", PREFIXED, W, D)
        | grants("User:ops", TOPIC, "cb.audit", LITERAL, W, D)
        | grants("User:ops", TOPIC, "cb.acks", LITERAL, R, D)
    )
    every, _ = desired_acls(Deployment(operators={"User:ops": ("*",)}), TENANTS, TOPICS)
    assert Acl(TOPIC, "cb.audit", LITERAL, "User:ops", R) in every
    assert Acl(TOPIC, TOPICS.state, LITERAL, "User:ops", R) in every  # audit verify's heads
    assert not {a for a in wanted if a.resource_name == TOPICS.state}
    assert len({a.resource_name for a in every if a.resource_type == TXN}) == len(TENANTS)


def test_a_tenant_the_tree_does_not_have_gets_nothing_but_a_note() -> None:
    deployment = Deployment(
        services={"User:svc": ("retired-tenant",)},
        operators={"User:ops": ("retired-tenant", "aurora-records")},
    )
    wanted, notes = desired_acls(deployment, TENANTS, TOPICS)
    assert notes == [
        "User:ops: tenant retired-tenant is not in the tree: no ACLs for it",
        "User:svc: tenant retired-tenant is not in the tree: no ACLs for it",
    ]
    assert not {acl for acl in wanted if "retired-tenant" in acl.resource_name}
    assert of(wanted, "User:svc") == grants("User:svc", TOPIC, "cb.acks", LITERAL, W, D)


def test_without_a_topic_prefix_no_acl_is_managed() -> None:
    bare = TopicNames(prefix="", audit="cb.audit", acks="cb.acks", state="cb.state")
    with pytest.raises(SettingsError, match="the tenant topic prefix is empty"):
        desired_acls(Deployment(publishers=("User:pub",)), TENANTS, bare)
    with pytest.raises(SettingsError, match="the tenant topic prefix is empty"):
        is_managed(Acl(TOPIC, "cb.audit", LITERAL, "User:x", R), bare)


# -- what the plan owns --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("acl", "managed"),
    [
        (Acl(TOPIC, "cb.tenant.aurora-records", LITERAL, "User:x", R), True),
        (Acl(TOPIC, "cb.tenant.", PREFIXED, "User:x", W), True),
        (Acl(TOPIC, "cb.tenant.aur", PREFIXED, "User:x", R), True),
        (Acl(TOPIC, "cb.audit", LITERAL, "User:x", R), True),
        (Acl(TOPIC, "cb.acks", LITERAL, "User:x", W), True),
        (Acl(TOPIC, "cb.tenant._state", LITERAL, "User:x", R), True),
        (Acl(TXN, "configbus-publisher.cb.tenant.", LITERAL, "User:x", W), True),
        (Acl(TXN, "configbus-override.cb.tenant.aurora-records.", PREFIXED, "User:x", W), True),
        # DENY bindings, and what is not configbus's, are left alone
        (Acl(TOPIC, "cb.tenant.aurora-records", LITERAL, "User:x", R, Permission.DENY), False),
        (Acl(TOPIC, "payments", LITERAL, "User:x", R), False),
        (Acl(TOPIC, "cb.", PREFIXED, "User:x", R), False),
        (Acl(TOPIC, "cb.tenant.Not_A_Tenant", LITERAL, "User:x", R), False),
        (Acl(TOPIC, "cb.tenant.aurora-records", PatternType.MATCH, "User:x", R), False),
        (Acl(GROUP, "cb.tenant.aurora-records", LITERAL, "User:x", R), False),
        (Acl(ResourceType.CLUSTER, "kafka-cluster", LITERAL, "User:x", Operation.ALTER), False),
        (Acl(TXN, "payments-producer", LITERAL, "User:x", W), False),
        (Acl(TXN, "configbus-publisher.other.", LITERAL, "User:x", W), False),
        (Acl(TXN, "configbus-override.cb.tenant.", PatternType.MATCH, "User:x", W), False),
    ],
)
def test_the_plan_owns_only_allow_bindings_on_configbus_resources(acl: Acl, managed: bool) -> None:
    assert is_managed(acl, TOPICS) is managed


def test_the_plan_creates_what_is_missing_and_lists_what_is_left_over() -> None:
    deployment = Deployment(services={"User:svc": ("aurora-records",)})
    read = Acl(TOPIC, "cb.tenant.aurora-records", LITERAL, "User:svc", R)
    left_over = Acl(TOPIC, "cb.tenant.helix-audio", LITERAL, "User:svc", R)
    deny = Acl(TOPIC, "cb.tenant.aurora-records", LITERAL, "User:svc", W, Permission.DENY)
    foreign = Acl(TOPIC, "payments", LITERAL, "User:svc", R)
    found = plan(deployment, TENANTS, TOPICS, [read, left_over, deny, foreign])
    assert found.keep == (read,)
    assert found.remove == (left_over,)
    assert set(found.create) == desired_acls(deployment, TENANTS, TOPICS)[0] - {read}
    assert found.changes
    lines = found.lines()
    assert lines[-1] == "3 to create, 1 to remove (apply --prune), 1 in place"
    assert "- ALLOW User:svc READ topic cb.tenant.helix-audio" in lines
    assert "+ ALLOW User:svc DESCRIBE topic cb.tenant.aurora-records" in lines
    assert not [line for line in lines if "payments" in line or "DENY" in line]


def test_a_plan_in_place_changes_nothing() -> None:
    deployment = Deployment(publishers=("User:pub",), services={"User:svc": ("*",)})
    wanted, _ = desired_acls(deployment, TENANTS, TOPICS)
    found = plan(deployment, TENANTS, TOPICS, wanted)
    assert (found.create, found.remove, set(found.keep)) == ((), (), wanted)
    assert not found.changes
    assert found.lines() == [f"0 to create, 0 to remove (apply --prune), {len(wanted)} in place"]


def test_plan_lines_start_with_the_notes_and_group_by_principal() -> None:
    deployment = Deployment(
        services={"User:b": ("aurora-records",), "User:a": ("gone",)},
    )
    lines = plan(deployment, TENANTS, TOPICS, []).lines()
    assert lines[0] == "note: User:a: tenant gone is not in the tree: no ACLs for it"
    principals = [line.split()[2] for line in lines if line.startswith("+ ")]
    assert principals == sorted(principals)


def test_an_acl_reads_as_kafka_tools_print_it() -> None:
    assert str(Acl(TOPIC, "cb.tenant.", PREFIXED, "User:pub", W)) == (
        "ALLOW User:pub WRITE topic cb.tenant.*"
    )
    assert (
        str(
            Acl(
                TXN,
                "configbus-publisher.cb.tenant.",
                LITERAL,
                "User:pub",
                D,
                Permission.DENY,
                "10.0.0.1",
            )
        )
        == "DENY User:pub from 10.0.0.1 DESCRIBE transactional-id configbus-publisher.cb.tenant."
    )


# -- configbus acl, on an in-memory cluster ------------------------------------------------
class Cluster:
    """The ACLs of a cluster, behind stand-ins of `Admin` and the three ACL calls."""

    def __init__(self, acls: Iterable[Acl] = (), *, shows_changes: bool = True) -> None:
        self.acls = set(acls)
        self.shows_changes = shows_changes  # False: a broker that never shows them
        self.connected = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cluster = self

        class Admin:
            def __init__(self, settings: Any) -> None:
                self.settings = settings

            async def __aenter__(self) -> Admin:
                cluster.connected += 1
                return self

            async def __aexit__(self, *exc_info: object) -> None:
                pass

        async def describe(admin: Any) -> list[Acl]:
            return sorted(cluster.acls)

        async def create(admin: Any, acls: Iterable[Acl]) -> int:
            wanted = set(acls)
            if cluster.shows_changes:
                cluster.acls |= wanted
            return len(wanted)

        async def delete(admin: Any, acls: Iterable[Acl]) -> list[Acl]:
            gone = sorted(set(acls) & cluster.acls)
            cluster.acls -= set(gone)
            return gone

        import configbus.bus

        monkeypatch.setattr(configbus.bus, "Admin", Admin)
        monkeypatch.setattr(bus_acls, "describe_acls", describe)
        monkeypatch.setattr(bus_acls, "create_acls", create)
        monkeypatch.setattr(bus_acls, "delete_acls", delete)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "environments"
    shutil.copytree(SAMPLE, root)
    return root


def acl_cli(capsys: pytest.CaptureFixture[str], tree: Path, *args: str) -> tuple[int, str, str]:
    where = [
        "--root",
        str(tree),
        "--bootstrap-servers",
        "kafka:9092",
        "--topic-prefix",
        "cb.tenant.",
    ]
    code = main(["acl", *args, *where, "--audit-topic", "cb.audit", "--acks-topic", "cb.acks"])
    out, err = capsys.readouterr()
    return code, out, err


SERVICE = ("--service", "aurora-records=User:svc")


def test_acl_plan_prints_what_apply_would_change(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    stale = Acl(TOPIC, "cb.tenant.helix-audio", LITERAL, "User:svc", R)
    Cluster([stale]).install(monkeypatch)
    code, out, err = acl_cli(capsys, tree, "plan", *SERVICE)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "+ ALLOW User:svc WRITE topic cb.acks",
        "+ ALLOW User:svc DESCRIBE topic cb.acks",
        "+ ALLOW User:svc READ topic cb.tenant.aurora-records",
        "+ ALLOW User:svc DESCRIBE topic cb.tenant.aurora-records",
        "- ALLOW User:svc READ topic cb.tenant.helix-audio",
        "4 to create, 1 to remove (apply --prune), 0 in place",
    ]
    assert acl_cli(capsys, tree, "plan", "--check", *SERVICE)[0] == 1


def test_acl_apply_creates_and_prunes_only_when_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    stale = Acl(TOPIC, "cb.tenant.helix-audio", LITERAL, "User:svc", R)
    cluster = Cluster([stale])
    cluster.install(monkeypatch)
    code, out, _ = acl_cli(capsys, tree, "apply", *SERVICE)
    assert code == 0
    assert out.splitlines()[-1] == (
        "acl apply: 4 created, 0 removed, 0 in place; 1 to remove left in place "
        "(apply --prune removes them)"
    )
    assert "created ALLOW User:svc READ topic cb.tenant.aurora-records" in out
    assert stale in cluster.acls

    code, out, _ = acl_cli(capsys, tree, "apply", "--prune", *SERVICE)
    assert code == 0
    assert out.splitlines() == [
        "removed ALLOW User:svc READ topic cb.tenant.helix-audio",
        "acl apply: 0 created, 1 removed, 4 in place",
    ]
    assert stale not in cluster.acls
    assert acl_cli(capsys, tree, "plan", "--check", *SERVICE)[0] == 0


def test_acl_apply_notes_a_tenant_the_tree_lacks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    Cluster().install(monkeypatch)
    code, out, _ = acl_cli(capsys, tree, "apply", "--service", "gone=User:svc")
    assert code == 0
    assert out.splitlines()[0] == "note: User:svc: tenant gone is not in the tree: no ACLs for it"


def test_acl_apply_fails_in_one_line_when_the_broker_never_shows_the_acls(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    Cluster(shows_changes=False).install(monkeypatch)
    monkeypatch.setattr(cli_acl, "SETTLE_S", 0.2)
    code, out, err = acl_cli(capsys, tree, "apply", *SERVICE)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "configbus: after 0.2s the broker still does not show the ACLs created, e.g. "
        "ALLOW User:svc WRITE topic cb.acks"
    ]


def test_acl_reads_the_deployment_file_of_configbus_acls(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tree: Path, tmp_path: Path
) -> None:
    Cluster().install(monkeypatch)
    monkeypatch.setenv("CONFIGBUS_ACLS", str(write(tmp_path, "publisher: User:pub\n")))
    code, out, _ = acl_cli(capsys, tree, "plan")
    assert code == 0
    assert "+ ALLOW User:pub WRITE topic cb.tenant.*" in out.splitlines()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            [],
            "configbus: no principals: give --file acls.yml (or set CONFIGBUS_ACLS), or "
            "--publisher, --service, --operator, --agent",
        ),
        (
            ["--service", "aurora-records"],
            "configbus: --service aurora-records: say TENANT=PRINCIPAL",
        ),
        (
            ["--publisher", "pub"],
            "configbus: --publisher: 'pub' is not a principal (say User:NAME)",
        ),
        (
            ["--file", "absent.yml", "--publisher", "User:pub"],
            "configbus: absent.yml: No such file or directory",
        ),
    ],
    ids=["no-principals", "service-flag", "publisher-flag", "no-file"],
)
@pytest.mark.parametrize("action", ["plan", "apply"])
def test_acl_usage_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tree: Path,
    action: str,
    args: list[str],
    expected: str,
) -> None:
    cluster = Cluster()
    cluster.install(monkeypatch)
    monkeypatch.chdir(tree.parent)
    code, out, err = acl_cli(capsys, tree, action, *args)
    assert (code, out) == (2, "")
    assert err.splitlines() == [expected]
    assert cluster.connected == 0  # refused before connecting


def test_acl_without_a_tree_or_a_cluster_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    Cluster().install(monkeypatch)
    code = main(["acl", "plan", "--root", str(tmp_path / "none"), *SERVICE])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"configbus: {tmp_path / 'none'}: no such directory (give --root or set CONFIGBUS_ROOT)"
    ]
    code = main(["acl", "plan", "--root", str(SAMPLE), *SERVICE])  # no --bootstrap-servers
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "configbus: no Kafka cluster: give --bootstrap-servers or set CONFIGBUS_BOOTSTRAP_SERVERS"
    ]


def test_acl_refuses_security_settings_that_cannot_work_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tree: Path
) -> None:
    Cluster().install(monkeypatch)
    monkeypatch.setenv("CONFIGBUS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CONFIGBUS_KAFKA_SASL_USERNAME", "admin")
    code, out, err = acl_cli(capsys, tree, "plan", *SERVICE)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "configbus: CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs "
        "CONFIGBUS_KAFKA_SASL_PASSWORD or CONFIGBUS_KAFKA_SASL_PASSWORD_FILE"
    ]


def test_an_empty_plan_has_no_changes() -> None:
    assert not AclPlan(create=(), remove=(), keep=()).changes


# -- the ACL requests, through their wire format -------------------------------------------
class WireAdmin:
    """An `Admin` stand-in that answers DescribeAcls, CreateAcls and DeleteAcls as a
    broker would: each request is encoded and decoded, then its response too."""

    def __init__(self, acls: Iterable[Acl] = (), *, error: int = 0) -> None:
        self.acls = set(acls)
        self.error = error  # answered to every binding (or the describe) when not 0
        self.requests = 0

    async def request(self, request: Any, doing: str) -> Any:
        self.requests += 1
        if request.API_KEY == 29:
            struct, answer = bus_acls.DescribeAclsRequest_v1, self._describe
        elif request.API_KEY == 30:
            struct, answer = bus_acls.CreateAclsRequest_v1, self._create
        else:
            struct, answer = bus_acls.DeleteAclsRequest_v1, self._delete
        response = answer(struct.decode(request.build(struct).encode()))
        return type(response).decode(response.encode())

    @staticmethod
    def _acl(fields: tuple[Any, ...]) -> Acl:
        kind, name, pattern, principal, host, operation, permission = fields
        return Acl(
            ResourceType(kind),
            name,
            PatternType(pattern),
            principal,
            Operation(operation),
            Permission(permission),
            host,
        )

    def _describe(self, sent: Any) -> Any:
        assert (sent.resource_type, sent.resource_name, sent.principal) == (1, None, None)
        resources: dict[tuple[int, str, int], list[tuple[Any, ...]]] = {}
        for acl in sorted(self.acls):
            where = (int(acl.resource_type), acl.resource_name, int(acl.pattern))
            resources.setdefault(where, []).append(
                (acl.principal, acl.host, int(acl.operation), int(acl.permission))
            )
        found = [(*where, bindings) for where, bindings in resources.items()]
        return bus_acls.DescribeAclsResponse_v1(
            0, self.error, "refused" if self.error else None, found
        )

    def _create(self, sent: Any) -> Any:
        if not self.error:
            self.acls |= {self._acl(tuple(fields)) for fields in sent.creations}
        return bus_acls.CreateAclsResponse_v1(0, [(self.error, None)] * len(sent.creations))

    def _delete(self, sent: Any) -> Any:
        answers = []
        for fields in sent.filters:
            acl = self._acl(tuple(fields))
            matched = [(self.error, None, *fields)] if acl in self.acls else []
            if not self.error:
                self.acls.discard(acl)
            answers.append((0, None, matched))
        return bus_acls.DeleteAclsResponse_v1(0, answers)


PUBLISHER_ACLS = desired_acls(Deployment(publishers=("User:pub",)), TENANTS, TOPICS)[0]


async def test_acls_are_created_described_and_deleted_through_the_wire_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bus_acls, "BATCH", 4)
    admin: Any = WireAdmin(
        [Acl(TOPIC, "payments", LITERAL, "User:x", R, Permission.DENY, "10.0.0.1")]
    )
    assert await bus_acls.create_acls(admin, [*PUBLISHER_ACLS, *PUBLISHER_ACLS]) == 15
    assert admin.requests == 4  # 15 bindings (each once), 4 a request
    found = await bus_acls.describe_acls(admin)
    assert found == sorted(admin.acls)
    assert set(found) >= PUBLISHER_ACLS and len(found) == 16
    gone = sorted(PUBLISHER_ACLS)[:2]
    absent = Acl(TOPIC, "cb.tenant.other", LITERAL, "User:pub", R)
    assert await bus_acls.delete_acls(admin, [*gone, absent]) == gone
    assert set(await bus_acls.describe_acls(admin)) == admin.acls
    assert not set(gone) & admin.acls


async def test_a_refused_acl_request_names_the_binding() -> None:
    admin: Any = WireAdmin([next(iter(PUBLISHER_ACLS))], error=31)  # ClusterAuthorizationFailed
    with pytest.raises(BusError) as described:
        await bus_acls.describe_acls(admin)
    assert str(described.value) == "describing ACLs: ClusterAuthorizationFailedError: refused"
    acl = sorted(PUBLISHER_ACLS)[0]
    with pytest.raises(
        BusError, match=f"^creating ACL {re.escape(str(acl))}: ClusterAuthorization"
    ):
        await bus_acls.create_acls(admin, [acl])
    with pytest.raises(BusError, match=r"^deleting ACL .*: ClusterAuthorizationFailedError"):
        await bus_acls.delete_acls(admin, admin.acls)

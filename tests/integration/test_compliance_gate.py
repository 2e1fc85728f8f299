"""The prod gate against the real broker: a daemon holds a prod change that breaks a
blocking compliance rule (keeping the stream's last version) until an operator's signed
waiver, written with `configbus compliance waive`, lets it through; the waiver, and its
use, are in an audit trail that verifies."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Setup, call_main, started, topic_options, wait_until

from configbus.crypto import OPERATOR, SigningKey, TrustedKey, generate_keypair
from configbus.publisher import Daemon

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
RULE = "baseline-backups-encrypted"


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    """The publisher's world and "oncall", an operator of aurora-records/prod."""
    world = Setup.create(tmp_path, kafka_bootstrap)
    private, _ = generate_keypair("oncall", tmp_path / "operators")
    public = SigningKey.load(private, "oncall").public
    entry = TrustedKey(public, frozenset({AURORA[0]}), frozenset({AURORA[1]}), OPERATOR, 86400)
    world.trust = world.trust.with_key(entry)
    world.trust_path.write_text(world.trust.dump(), encoding="utf-8")
    return world


async def test_a_blocking_rule_stops_a_prod_change_and_a_waiver_lets_it_through(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    operator = ["--trust", str(setup.trust_path), *topic_options(setup)]
    async with Daemon(setup.settings(trust=setup.trust_path)) as daemon:
        await started(daemon)
        layer = setup.path(AURORA_PROD)
        unencrypted = "disaster_recovery:\n  backups:\n    encrypted: false\n"
        layer.write_text(layer.read_text(encoding="utf-8") + unencrypted, encoding="utf-8")
        await wait_until(
            lambda: "compliance gate" in daemon.publisher._refusals.get(AURORA, ""),
            what="the gate to hold the change",
        )
        assert daemon.publisher.states[AURORA].version == 1

        code, out, err = await call_main(
            capsys, "compliance", "waive", *AURORA, RULE, "--for", "4h",
            "--reason", "CHG-77 backup vendor migration", "--key",
            setup.workdir / "operators" / "oncall.key", *operator,
        )  # fmt: skip
        assert code == 0, err
        assert out.startswith(f"waived for aurora-records/prod: {RULE}: in force until ")
        await wait_until(
            lambda: daemon.publisher.states[AURORA].version == 2, what="v2 under the waiver"
        )

    code, out, _ = await call_main(capsys, "compliance", "waivers", *AURORA, *operator)
    assert code == 0 and out.startswith(f"{RULE}: in force until ")
    assert "by oncall: CHG-77 backup vendor migration" in out

    code, out, err = await call_main(capsys, "audit", "verify", *operator)
    assert (code, err) == (0, ""), out
    code, out, _ = await call_main(capsys, "audit", "export", *operator)
    kinds = [line for line in out.splitlines() if '"kind": "waiver"' in line]
    used = [line for line in out.splitlines() if '"kind": "note:waiver_used"' in line]
    assert len(kinds) == 1 and len(used) == 1
    assert f'"subject": "{RULE}"' in used[0] and '"version": 2' in used[0]

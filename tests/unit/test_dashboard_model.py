"""The dashboard's model, fed through its real feed from a MemoryBus: versions with
their cause, instances at the target and the propagation latency of the last version,
refusals, overrides in effect, staged rollouts; records that do not verify, acks that
speak for others, hostile text, and every cap. End to end with Kafka and Chromium:
tests/integration/test_dashboard.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest

from configbus.bus import TopicNames
from configbus.dashboard import Caps, Feed, Model
from configbus.dashboard.model import ROLLOUT_SHOWN_S, clean, percentiles
from configbus.events import Ack, EventKind, RolloutTag, now_ns

from .dashboard_world import ENV, MS, SECOND, SECRET, TENANT, TOPICS, World
from .helpers import eventually


def tag(state: str = "running", step: int = 1, **changes: object) -> RolloutTag:
    options: dict[str, object] = {
        "id": "r-1",
        "state": state,
        "strategy": "canary",
        "steps": ("1", "10%", "50%", "100%"),
        "step": step,
        "bake_s": 60.0,
        "step_started_at": now_ns() - 20 * SECOND,
        "stable_version": 2,
        "note": f"step {step + 1} begun",
    }
    return RolloutTag(**{**options, **changes})  # type: ignore[arg-type]


async def test_a_stream_shows_its_last_version_with_cause_and_the_latency_of_its_acks(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    await world.publish(1, actor="publisher", reason="startup", paths=())
    await world.publish(2, actor="alice@example.com", reason="INC-1: raise the pool")
    for instance in ("i-1", "i-2", "i-3"):
        await world.ack(instance, 1, startup=True)  # got v1 when it started: no latency
    for instance, latency in (("i-1", 12.0), ("i-2", 30.0)):
        await world.ack(instance, 2, latency_ms=latency)
    world.drain()

    row = world.row()
    assert row["key"] == "acme/prod"
    assert row["version"] == 2
    change = row["change"]
    assert (change["actor"], change["reason"]) == ("alice@example.com", "INC-1: raise the pool")
    assert change["changed_paths"] == ["database.pool.max"]
    assert len(change["config_hash"]) == 12
    assert row["instances"] == {
        "live": 3,
        "at_target": 2,
        "behind": ["i-3"],
        "behind_more": 0,
        "unhealthy": [],
    }
    assert row["latency"] == {"p50_ms": 30.0, "p95_ms": 30.0, "p99_ms": 30.0, "samples": 2}
    assert [(h["version"], h["p50_ms"], h["samples"]) for h in row["history"]] == [
        (1, None, 0),
        (2, 30.0, 2),
    ]
    assert row["refusals"]["instances"] == []
    assert row["overrides"]["entries"] == []
    assert row["rollout"] is None

    await world.ack("i-3", 2, latency_ms=48.0)
    world.drain()
    row = world.row()
    assert row["instances"]["at_target"] == 3
    assert row["latency"] == {"p50_ms": 30.0, "p95_ms": 48.0, "p99_ms": 48.0, "samples": 3}


def test_percentiles_pick_as_rollout_status_does() -> None:
    assert percentiles([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    samples = [float(n) for n in range(1, 101)]  # 1..100 ms
    assert percentiles(reversed(samples)) == {"p50_ms": 51.0, "p95_ms": 96.0, "p99_ms": 100.0}


async def test_no_config_value_reaches_the_state(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    await world.override(1, {"database.pool.max": "override-value-never-shown"})
    world.drain()

    text = json.dumps(world.model.state(now_ns()))
    assert SECRET not in text
    assert "override-value-never-shown" not in text
    assert "database.pool.max" in text  # the paths are shown, not the values


async def test_the_same_records_twice_change_nothing(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    await world.publish(2)
    await world.ack("i-1", 2, latency_ms=5.0)
    await world.ack("i-2", 2, status="rejected", reason="nope")
    await world.override(1, {"a.b": True})
    await world.candidate(1, tag())
    world.drain()
    now = now_ns()
    before = world.model.state(now)

    world.replay()  # a model told everything again

    assert world.model.state(now) == before


async def test_a_refusal_shows_until_the_instance_runs_a_newer_version(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    await world.publish(2)
    await world.ack("i-1", 1, startup=True)
    await world.ack("i-1", 2, status="rejected", reason="validate: max_size over 100")
    world.drain()

    refusals = world.row()["refusals"]
    assert refusals["instances"] == [
        {
            "instance": "i-1",
            "channel": "snapshot",
            "version": 2,
            "reason": "validate: max_size over 100",
        }
    ]
    assert world.row()["instances"]["behind"] == ["i-1"]

    await world.publish(3)
    await world.ack("i-1", 3, latency_ms=9.0)
    world.drain()
    assert world.row()["refusals"]["instances"] == []


async def test_an_override_set_shows_its_entries_until_they_expire(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    expires = await world.override(
        1, {"features.checkout_v2": False, "database.pool.max": 5}, ttl_s=600
    )
    await world.ack("i-1", 1, status="rejected", channel="override", reason="untrusted_scope")
    world.drain()

    overrides = world.row()["overrides"]
    assert overrides["version"] == 1
    assert [(e["path"], e["actor"], e["reason"]) for e in overrides["entries"]] == [
        ("database.pool.max", "alice", "INC-4711"),
        ("features.checkout_v2", "alice", "INC-4711"),
    ]
    assert {e["expires_at"] for e in overrides["entries"]} == {expires // MS}
    refused = world.row()["refusals"]["instances"]
    assert [(r["instance"], r["channel"], r["reason"]) for r in refused] == [
        ("i-1", "override", "untrusted_scope")
    ]

    later = world.row(now=expires + SECOND)
    assert later["overrides"]["entries"] == []

    await world.override(2, {}, ttl_s=1)  # cleared: the newer set wins
    world.drain()
    assert world.row()["overrides"] == {"version": 2, "entries": [], "more": 0}


async def test_an_override_from_a_key_out_of_its_scope_is_refused_not_shown(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    await world.publish(1)
    await world.override(1, {"a": 1}, key=world.mallory)  # not in the trust file
    world.drain()

    row = world.row()
    assert row["overrides"]["entries"] == []
    assert row["refusals"]["unverified"] == 1  # its record on the tenant topic
    assert "unknown_key" in row["refusals"]["unverified_reason"]
    assert world.model.totals()["unverified"] == 2  # and the audit topic's: history

    for record in world.bus.records(TOPICS.audit):  # a topic read again: not counted again
        world.feed.take(record)
    assert world.model.totals()["unverified"] == 2


async def test_a_staged_rollout_shows_its_step_and_an_ended_one_fades(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(2)
    await world.candidate(1, tag(step=1))
    world.drain()

    rollout = world.row()["rollout"]
    assert rollout is not None
    assert (rollout["state"], rollout["step"], rollout["step_spec"]) == ("running", 2, "10%")
    assert rollout["steps"] == ["1", "10%", "50%", "100%"]
    assert rollout["candidate_version"] == 1
    assert rollout["note"] == "step 2 begun"
    assert 35 <= rollout["bake_left_s"] <= 40

    await world.candidate(2, tag("aborted", breaches=("refused on i-1: validator",)))
    world.drain()
    rollout = world.row()["rollout"]
    assert rollout is not None
    assert rollout["state"] == "aborted"
    assert rollout["breaches"] == ["refused on i-1: validator"]
    assert rollout["bake_left_s"] is None
    an_hour_later = now_ns() + int((ROLLOUT_SHOWN_S + 1) * SECOND)
    assert world.row(now=an_hour_later)["rollout"] is None

    await world.candidate(1, tag(step=3))  # an older candidate version changes nothing
    world.drain()
    assert world.row()["rollout"]["state"] == "aborted"


async def test_liveness_follows_heartbeats_and_stops(tmp_path: Path) -> None:
    world = World(tmp_path, caps=Caps(instance_ttl_s=3600))
    await world.publish(1)
    await world.heartbeat("beating", 1, beat_ms=1000)
    await world.heartbeat("sick", 1, beat_ms=1000, healthy=False)
    await world.ack("quiet", 1, latency_ms=3.0)  # no heartbeats: live for instance_ttl
    await world.ack("gone", 1, latency_ms=3.0)
    await world.raw_ack(Ack(tenant=TENANT, env=ENV, version=1, instance="gone", service="s",
                            status="stopped"))  # fmt: skip
    world.drain()

    now = now_ns()
    instances = world.row(now=now)["instances"]
    assert (instances["live"], instances["at_target"]) == (3, 3)
    assert instances["unhealthy"] == ["sick: db check failed"]
    later = world.row(now=now + 10 * SECOND)["instances"]  # three beats missed
    assert (later["live"], later["at_target"]) == (1, 1)
    assert world.row(now=now + 3601 * SECOND)["instances"]["live"] == 0


async def test_acks_before_their_stream_wait_for_its_first_event(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.ack("i-1", 1, latency_ms=7.0)
    world.drain()
    assert world.model.streams() == []  # an ack makes no stream
    assert world.model.totals()["pending_acks"] == 1

    await world.publish(1)
    world.drain()
    row = world.row()
    assert row["instances"]["at_target"] == 1
    assert row["latency"]["p50_ms"] == pytest.approx(7.0, abs=1.0)
    assert world.model.totals()["pending_acks"] == 0


async def test_records_that_do_not_verify_are_counted_never_shown(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    await world.publish(2, key=world.mallory, actor="mallory")  # a forgery
    await world.publish(1, tenant="other", key=world.mallory)  # makes no stream
    await world.raw(TOPICS.audit, b"acme/prod", b"\x00junk")
    await world.raw(TOPICS.tenant_topic(TENANT), b"prod", b"\x93not an envelope")
    # A real event of acme/prod under another stream's key: refused as wrong_stream.
    genuine = world.bus.records(TOPICS.tenant_topic(TENANT))[0].value or b""
    await world.raw(TOPICS.tenant_topic("other"), b"prod", genuine)
    world.drain()

    assert world.model.streams() == [(TENANT, ENV)]
    row = world.row()
    assert row["version"] == 1
    assert row["change"]["actor"] != "mallory"
    assert row["refusals"]["unverified"] == 2  # on acme's topic: the forgery, the junk
    totals = world.model.totals()
    assert totals["unverified"] == 7
    assert totals["unverified_reason"].startswith("audit @3: malformed: not an event envelope")


async def test_acks_that_speak_for_another_or_do_not_decode_are_dropped(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    ack = Ack(tenant=TENANT, env=ENV, version=1, instance="i-1", service="s", status="applied")
    await world.raw_ack(ack, key=b"acme/prod/i-2/applied")  # under another's key
    await world.raw(TOPICS.acks, b"acme/prod/i-3/applied", b"\xc1")
    await world.raw_ack(ack.__class__(**{**msgspec.structs.asdict(ack), "instance": "x" * 300}))
    world.drain()

    assert world.row()["instances"]["live"] == 0
    assert world.model.dropped_acks == 3


async def test_hostile_text_is_cut_and_made_printable(tmp_path: Path) -> None:
    world = World(tmp_path)
    actor = "<script>alert(1)</script>\x1b[31m\u202e" + "A" * 5000
    await world.publish(
        1, actor=actor, reason="line\nbreak", paths=tuple(f"p{n}" for n in range(40))
    )
    await world.ack("i-<b>\x07", 1, latency_ms=1.0)
    world.drain()

    change = world.row()["change"]
    assert change["actor"].startswith("<script>alert(1)</script>\ufffd[31m\ufffd")
    assert len(change["actor"]) == 201 and change["actor"].endswith("\u2026")
    assert change["reason"] == "line\ufffdbreak"
    assert len(change["changed_paths"]) == 10 and change["more_paths"] == 30
    assert world.row()["instances"]["behind"] == []
    assert clean("i-<b>\x07") == "i-<b>\ufffd"
    assert clean("x" * 10, 4) == "xxxx\u2026"


async def test_caps_bound_streams_instances_history_and_waiting_acks(tmp_path: Path) -> None:
    world = World(tmp_path, caps=Caps(streams=2, instances=3, history=3, pending=2))
    for version in range(1, 7):
        await world.publish(version)
    await world.publish(1, env="staging")
    await world.publish(1, env="dev")  # a third stream: not taken
    for n in range(5):
        await world.ack(f"i-{n}", 6, latency_ms=float(n + 1))
    for n in range(4):
        await world.ack(f"w-{n}", 1, env="qa")  # a stream never seen: two wait, two dropped
    world.drain()

    assert world.model.streams() == [(TENANT, ENV), (TENANT, "staging")]
    row = world.row()
    assert [h["version"] for h in row["history"]] == [4, 5, 6]
    assert row["instances"]["live"] == 3
    assert row["latency"]["samples"] == 3
    totals = world.model.totals()
    assert totals["dropped_streams"] == 2  # its record on the tenant and audit topics
    assert totals["dropped_instances"] == 2
    assert (totals["pending_acks"], totals["dropped_acks"]) == (2, 2)

    await world.publish(2)  # older than the history kept: not taken back
    world.drain()
    assert [h["version"] for h in world.row()["history"]] == [4, 5, 6]


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="history"):
        Caps(history=0)


async def test_rollbacks_count_as_versions(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    await world.publish(2, kind=EventKind.ROLLBACK, reason="back to v1")
    world.drain()
    assert (world.row()["version"], world.row()["change"]["kind"]) == (2, "rollback")


async def test_only_the_tenants_asked_for_are_taken(tmp_path: Path) -> None:
    world = World(tmp_path, tenants=["other"])
    await world.publish(1)
    await world.publish(1, tenant="other", env="staging")
    await world.ack("i-1", 1, tenant=TENANT, latency_ms=1.0)
    world.drain()

    assert world.model.streams() == [("other", "staging")]
    assert world.model.totals()["pending_acks"] == 0


async def test_the_feed_follows_the_topics_and_finds_new_tenants(tmp_path: Path) -> None:
    world = World(tmp_path, rescan_s=0.05)
    await world.publish(1)
    await world.ack("i-1", 1, latency_ms=2.0)
    changes: list[int] = []
    world.model.on_change = lambda: changes.append(world.model.revision)

    async with world.feed:
        await eventually(lambda: world.model.streams() == [(TENANT, ENV)], "acme/prod")
        await world.publish(2, reason="live")
        await world.ack("i-1", 2, latency_ms=4.0)
        await eventually(
            lambda: (world.row()["version"], world.row()["instances"]["at_target"]) == (2, 1),
            "v2 applied",
        )
        # A tenant whose topic appears later (its event not on the audit topic, as
        # after a restore without it): found at the next look, read from its start.
        world.bus.create_topic(TOPICS.tenant_topic("late"), compact=True)
        await world.publish(1, tenant="late", env="prod", audit=False)
        await eventually(lambda: ("late", "prod") in world.model.streams(), "the late tenant")
        assert world.feed.status()["tenant_topics"] == 3
        await world.publish(2, tenant="late", env="prod", audit=False)  # then followed
        await eventually(lambda: world.row("late", "prod")["version"] == 2, "late v2")
        assert world.feed.status()["errors"] == {}
    assert changes  # the model said it changed
    assert world.feed.records > 0


async def test_the_feed_waits_for_topics_that_do_not_exist_yet(tmp_path: Path) -> None:
    world = World(tmp_path)
    bus_topics = TopicNames(prefix="t.", audit="audit-2", acks="acks-2", state="state")
    model = Model()
    feed = Feed(world.bus, bus_topics, world.trust, model, rescan_s=0.05)
    async with feed:
        await eventually(lambda: "audit-2" in feed.status()["errors"], "a missing topic named")
        world.bus.create_topic("audit-2")
        await world.raw("audit-2", b"acme/prod", b"")  # an empty record: does not verify
        await eventually(lambda: model.unverified == 1, "the audit record read")
        await asyncio.sleep(0.1)
        assert "audit-2" not in feed.status()["errors"]


async def test_a_topic_that_fails_is_read_again_after_a_backoff(tmp_path: Path) -> None:
    world = World(tmp_path)
    await world.publish(1)
    world.bus.fail_next("read")  # the first read of a followed topic fails
    async with world.feed:
        await eventually(lambda: world.feed.status()["errors"], "the failure to be told")
        failed = world.feed.status()["errors"]
        assert any("injected failure: read" in error for error in failed.values())
        await eventually(lambda: not world.feed.status()["errors"], "the retry", timeout=5)
        await eventually(lambda: world.model.streams() == [(TENANT, ENV)], "acme/prod")


async def test_forged_acks_claiming_versions_never_published_are_not_believed(
    tmp_path: Path,
) -> None:
    """Acks are unsigned: one claiming version 2**62 must not put an instance at the
    target for good, and samples of versions the trail never verified must not push
    the real ones out of the history."""
    world = World(tmp_path)
    await world.publish(1, actor="publisher", reason="startup", paths=())
    await world.publish(2, actor="alice", reason="INC-1")
    await world.ack("i-1", 2, latency_ms=12.0)
    for n in range(30):
        await world.ack("i-1", 10**12 + n, latency_ms=1.0)
    await world.ack("i-9", 2**62, latency_ms=1.0)
    world.drain()
    await world.publish(3, actor="alice", reason="INC-2")
    await world.ack("i-2", 3, latency_ms=20.0)
    world.drain()

    row = world.row()
    assert [(h["version"], h["samples"]) for h in row["history"]] == [(1, 0), (2, 1), (3, 1)]
    assert row["instances"]["at_target"] == 1 and "i-9" not in str(row["instances"])

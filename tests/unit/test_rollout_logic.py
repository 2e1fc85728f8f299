"""The pure logic of staged rollouts: `Plan.build` (defaults, parsing, refusals), the
`Command` that carries a plan, `step_bound` (who each step selects, and that the choice
is stable), the `judge` gates (promote, wait or abort), the `Fleet` fed acks record by
record, and a tenant.yml's `rollout:` block. End to end on a bus: test_rollout_flow.py."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.errors import SettingsError, TreeError
from configbus.events import RANK_SPACE, Ack, RolloutTag, rank
from configbus.ops.fleet import DEFAULT_TTL_S, Fleet, Member
from configbus.ops.rollouts import MAX_STEPS, Command, Plan, follows, judge, step_bound
from configbus.tree.tree import EnvironmentTree

from .helpers import TreeFactory, line_of

TENANT, ENV = "t", "prod"
ROLLOUT = "r1"
HASH = "c" * 64  # the candidate's config hash
OTHER_HASH = "d" * 64
FIRST = 40  # the candidate channel version this rollout started at
T0 = 1_700_000_000 * 10**9  # when the step started (ns)
BEAT_MS = 2_000  # heartbeat interval of the members below


def sec(seconds: float) -> int:
    return int(seconds * 10**9)


def names(count: int, prefix: str = "i") -> list[str]:
    return [f"{prefix}{n}" for n in range(count)]


def by_rank(instances: Iterable[str], rollout: str = ROLLOUT) -> list[str]:
    return sorted(instances, key=lambda i: rank(rollout, i))


def chosen(rollout: str, match: dict[str, str], below: int, members: Iterable[Member]) -> set[str]:
    """The instances a (match, below) pair selects, by the definition of a selection."""
    return {
        m.instance
        for m in members
        if all(m.labels.get(k) == v for k, v in match.items()) and rank(rollout, m.instance) < below
    }


# -- Plan.build ----------------------------------------------------------------------------


def test_the_default_plan_is_a_four_step_canary_baked_a_minute() -> None:
    plan = Plan.build()

    assert plan.strategy == "canary"
    assert plan.steps == ("1", "10%", "50%", "100%")
    assert plan.bake_s == 60.0
    assert dict(plan.select) == {}
    assert plan.step_timeout_s == 0.0
    assert Plan.build("", "", "", None, "") == plan  # empty strings are "not given"


def test_blue_green_defaults_to_the_green_instances_then_everyone() -> None:
    plan = Plan.build("blue-green")

    assert plan.strategy == "blue-green"
    assert plan.steps == ("color=green", "100%")
    assert plan.bake_s == 60.0


@pytest.mark.parametrize(
    ("steps", "parsed"),
    [
        ("1,10%,50%", ("1", "10%", "50%")),
        (" 2 , 25% ,, 100% ,", ("2", "25%", "100%")),
        ("5", ("5",)),
        (["1", "10%", "50%"], ("1", "10%", "50%")),
        ((3, "50%", "100%"), ("3", "50%", "100%")),
        ([" tier=web ", "100%"], ("tier=web", "100%")),
        (["12.5%"], ("12.5%",)),
    ],
)
def test_steps_are_read_from_a_comma_list_or_a_sequence(steps: Any, parsed: tuple[str]) -> None:
    assert Plan.build(steps=steps).steps == parsed


@pytest.mark.parametrize(
    ("bake", "seconds"),
    [("90s", 90.0), ("2m", 120.0), ("1h30m", 5400.0), ("45", 45.0), (15, 15.0), (2.5, 2.5)],
)
def test_bake_is_a_duration_or_a_number_of_seconds(bake: Any, seconds: float) -> None:
    assert Plan.build(bake=bake).bake_s == seconds


def test_a_step_timeout_is_a_duration_too() -> None:
    assert Plan.build(step_timeout="10m").step_timeout_s == 600.0
    assert Plan.build(step_timeout=42).step_timeout_s == 42.0


@pytest.mark.parametrize(
    "select",
    [
        {"zone": "a", "tier": "web"},
        ["zone=a", "tier=web"],
        ["zone=a,tier=web"],
        ("tier=web", " zone=a "),
    ],
)
def test_select_is_a_mapping_or_name_value_items(select: Any) -> None:
    assert dict(Plan.build(select=select).select) == {"zone": "a", "tier": "web"}


def test_select_items_may_hold_several_labels_each() -> None:
    plan = Plan.build(select=["zone=a", "color=green,tier=web"])

    assert dict(plan.select) == {"zone": "a", "color": "green", "tier": "web"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "linear"}, "strategy 'linear': say canary or blue-green"),
        ({"steps": []}, f"steps: give 1 to {MAX_STEPS} steps"),
        ({"steps": " , ,"}, f"steps: give 1 to {MAX_STEPS} steps"),
        ({"steps": ["1"] * (MAX_STEPS + 1)}, f"steps: give 1 to {MAX_STEPS} steps"),
        ({"steps": "0"}, "step '0': say a count (1), a share (10%) or a label (color=green)"),
        ({"steps": "1,-1"}, "step '-1': say a count"),
        ({"steps": "abc"}, "step 'abc': say a count"),
        ({"steps": "1.5"}, "step '1.5': say a count"),
        ({"steps": [""]}, "step '': say a count"),
        ({"steps": "0%"}, "step '0%': a share between 0% and 100%"),
        ({"steps": "101%"}, "step '101%': a share between 0% and 100%"),
        ({"steps": "%"}, "step '%': a share between 0% and 100%"),
        ({"steps": "lots%"}, "step 'lots%': a share between 0% and 100%"),
        ({"steps": ["=green"]}, "step '=green': say name=value"),
        ({"steps": ["color=gr een"]}, "step 'color=gr een': say name=value"),
        ({"bake": -1}, "bake -1s: between 0s and 7d"),
        ({"bake": "8d"}, "bake 691200s: between 0s and 7d"),
        ({"bake": 7 * 86400 + 1}, "between 0s and 7d"),
        ({"bake": "soon"}, "bake: 'soon' is not a duration"),
        ({"bake": "-5s"}, "bake: '-5s' is not a duration"),
        ({"bake": True}, "bake: 'True' is not a duration"),
        ({"step_timeout": "1x"}, "step timeout: '1x' is not a duration"),
        ({"step_timeout": -1}, "step timeout: must not be negative"),
        ({"select": ["zone"]}, "--select 'zone': say name=value"),
        ({"select": ["zone=a,tier"]}, "--select 'tier': say name=value"),
        ({"select": {"bad name": "x"}}, "--select 'bad name=x': say name=value"),
        ({"select": {"zone": "a b"}}, "--select 'zone=a b': say name=value"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Plan.build(**options)

    assert message in str(caught.value)


def test_the_limits_themselves_are_accepted() -> None:
    assert len(Plan.build(steps=["1"] * MAX_STEPS).steps) == MAX_STEPS
    assert Plan.build(bake="7d").bake_s == 7 * 86400
    assert Plan.build(bake=0).bake_s == 0.0
    assert Plan.build(steps="100%,0.5%").steps == ("100%", "0.5%")


def test_a_plan_made_directly_is_checked_too() -> None:
    with pytest.raises(SettingsError, match="strategy"):
        Plan(strategy="big-bang")
    with pytest.raises(SettingsError, match="step '0'"):
        Plan(steps=("0",))
    with pytest.raises(SettingsError, match="step timeout"):
        Plan(step_timeout_s=-5)


@pytest.mark.parametrize(
    ("step_timeout", "bake", "timeout"),
    [
        (None, 60, 300.0),  # five bakes are 5m: the 5m floor
        (None, 0, 300.0),
        (None, 120, 600.0),  # five bakes
        ("90s", 600, 90.0),  # given: taken as is, even below five bakes
        (1000, 0, 1000.0),
    ],
)
def test_the_step_timeout_is_given_or_five_bakes_at_least_five_minutes(
    step_timeout: Any, bake: float, timeout: float
) -> None:
    assert Plan.build(bake=bake, step_timeout=step_timeout).timeout_s == timeout


def test_describe_says_strategy_steps_bake_and_selection() -> None:
    assert Plan.build().describe() == "canary 1,10%,50%,100%, bake 1m"
    described = Plan.build(
        "blue-green", bake="1h30m", select={"zone": "a", "tier": "web"}
    ).describe()
    assert described == "blue-green color=green,100%, bake 1h30m, among tier=web zone=a"


@pytest.mark.parametrize(
    "plan",
    [
        Plan.build(),
        Plan.build("blue-green", bake="90s", select=["zone=a"]),
        Plan.build(steps="2,33%,tier=web,100%", bake=0, select={"zone": "b"}, step_timeout="20m"),
        Plan.build(bake=2.5, step_timeout=7.25),
    ],
)
def test_a_plan_survives_a_start_command(plan: Plan) -> None:
    command = Command(action="start", plan=plan.to_dict())

    assert command.the_plan() == plan
    wire = msgspec.json.decode(msgspec.json.encode(command), type=Command)  # as signed and sent
    assert wire.the_plan() == plan


def test_to_dict_is_plain_data() -> None:
    plan = Plan.build(steps="1,100%", bake="2m", select=["zone=a"], step_timeout=400)

    assert plan.to_dict() == {
        "strategy": "canary",
        "steps": ["1", "100%"],
        "bake_s": 120.0,
        "select": {"zone": "a"},
        "step_timeout_s": 400.0,
    }


def test_a_command_without_a_plan_starts_the_default_one() -> None:
    assert Command(action="start").the_plan() == Plan.build()


@pytest.mark.parametrize("action", ["start", "promote", "abort"])
def test_the_known_commands(action: str) -> None:
    assert Command(action=action).action == action


@pytest.mark.parametrize("action", ["pause", "", "START"])
def test_a_command_refuses_an_unknown_action(action: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Command(action=action)

    assert str(caught.value) == f"rollout command {action!r}: say start, promote or abort"


# -- step_bound ----------------------------------------------------------------------------


def fleet_of(instances: Iterable[str], **labels: str) -> list[Member]:
    return [Member(i, labels=dict(labels)) for i in instances]


@pytest.mark.parametrize("count", [1, 2, 5])
def test_a_count_step_selects_that_many_in_rank_order(count: int) -> None:
    members = fleet_of(names(10))
    plan = Plan.build(steps=[str(count), "100%"])

    match, below = step_bound(ROLLOUT, plan, 0, members)

    assert match == {}
    assert chosen(ROLLOUT, match, below, members) == set(by_rank(names(10))[:count])


def test_a_count_above_the_fleet_selects_every_matching_instance() -> None:
    members = fleet_of(names(3))

    match, below = step_bound(ROLLOUT, Plan.build(steps="7"), 0, members)

    assert chosen(ROLLOUT, match, below, members) == set(names(3))
    assert below < RANK_SPACE  # the instances live now, not whoever comes later


@pytest.mark.parametrize(
    ("share", "fleet", "expected"),
    [
        ("10%", 6, 1),  # 0.6 rounds up
        ("50%", 6, 3),
        ("34%", 3, 2),  # 1.02 rounds up
        ("33%", 3, 1),  # 0.99 rounds up to 1, not 2
        ("1%", 1, 1),
        ("25%", 8, 2),  # exact: not rounded further up
        ("12.5%", 16, 2),
        ("99%", 10, 10),
        ("64.4%", 250, 161),  # exactly 161: no float rounding up to 162
    ],
)
def test_a_share_step_rounds_up(share: str, fleet: int, expected: int) -> None:
    members = fleet_of(names(fleet))

    match, below = step_bound(ROLLOUT, Plan.build(steps=share), 0, members)

    assert chosen(ROLLOUT, match, below, members) == set(by_rank(names(fleet))[:expected])


@pytest.mark.parametrize("whole", ["100%", "100.0%", "100.00%"])
def test_a_whole_share_however_written_selects_every_instance_to_come(whole: str) -> None:
    assert step_bound(ROLLOUT, Plan.build(steps=whole), 0, fleet_of(names(3))) == ({}, RANK_SPACE)


@pytest.mark.parametrize(
    ("select", "message"),
    [
        ({"zone": "a,tier=web"}, "select zone: give one value (a string), not 'a,tier=web'"),
        ({"zone": None}, "select zone: give one value (a string), not None"),
    ],
)
def test_a_select_mapping_takes_one_value_per_label(select: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Plan.build(select=select)

    assert str(caught.value) == message


def test_a_step_timeout_that_is_not_a_number_of_seconds_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        Plan(step_timeout_s=float("nan"))

    assert str(caught.value) == "bake and step timeout: give a duration such as 90s"


def test_the_whole_fleet_and_label_steps_select_by_labels_alone() -> None:
    plan = Plan.build("blue-green", select={"tier": "web"})
    members = fleet_of(names(4))

    assert step_bound(ROLLOUT, plan, 0, members) == ({"tier": "web", "color": "green"}, RANK_SPACE)
    assert step_bound(ROLLOUT, plan, 1, members) == ({"tier": "web"}, RANK_SPACE)
    assert step_bound(ROLLOUT, plan, 1, []) == ({"tier": "web"}, RANK_SPACE)


def test_the_plans_selection_is_in_the_match_of_every_step() -> None:
    plan = Plan.build(steps="1,50%,zone=b,100%", select={"tier": "web"})
    members = fleet_of(names(4), tier="web")

    for step in range(len(plan.steps)):
        match, _ = step_bound(ROLLOUT, plan, step, members)
        assert match["tier"] == "web"
    assert step_bound(ROLLOUT, plan, 2, members)[0] == {"tier": "web", "zone": "b"}


def test_instances_without_the_selected_labels_never_count() -> None:
    inside = fleet_of(names(6, "web-"), tier="web")
    outside = fleet_of(names(30, "db-"), tier="db")  # plenty of them rank before the web ones
    outside.append(Member("bare"))  # no labels at all
    members = outside + inside
    plan = Plan.build(steps="2,50%", select=["tier=web"])
    web_order = by_rank(m.instance for m in inside)

    for step, expected in ((0, 2), (1, 3)):
        match, below = step_bound(ROLLOUT, plan, step, members)
        assert match == {"tier": "web"}
        assert chosen(ROLLOUT, match, below, members) == set(web_order[:expected])
    # without the labels the db instances would have taken places: the test means something
    assert set(by_rank(m.instance for m in members)[:2]) != set(web_order[:2])


@pytest.mark.parametrize("step", ["1", "50%", "3"])
def test_no_matching_instance_gives_a_bound_of_zero(step: str) -> None:
    plan = Plan.build(steps=step, select={"zone": "a"})

    assert step_bound(ROLLOUT, plan, 0, fleet_of(names(5), zone="b")) == ({"zone": "a"}, 0)
    assert step_bound(ROLLOUT, plan, 0, []) == ({"zone": "a"}, 0)


def test_newcomers_ranked_after_the_chosen_do_not_reshuffle_them() -> None:
    first = fleet_of(names(8))
    plan = Plan.build(steps="3,50%")
    match, below = step_bound(ROLLOUT, plan, 0, first)
    before = chosen(ROLLOUT, match, below, first)
    last_rank = max(rank(ROLLOUT, m.instance) for m in first)
    later = [i for i in names(200, "new-") if rank(ROLLOUT, i) > last_rank][:20]
    assert len(later) >= 10  # enough newcomers to shift any share or count

    grown = first + fleet_of(later)
    match2, below2 = step_bound(ROLLOUT, plan, 0, grown)

    assert chosen(ROLLOUT, match2, below2, grown) == before
    assert len(before) == 3


def test_the_order_differs_per_rollout() -> None:
    instances = names(20)

    assert by_rank(instances, "r1") != by_rank(instances, "r2")


def tag_for(
    plan: Plan,
    step: int,
    members: Iterable[Member],
    *,
    state: str = "running",
    rollout: str = ROLLOUT,
    **fields: Any,
) -> RolloutTag:
    match, below = step_bound(rollout, plan, step, members)
    options: dict[str, Any] = {
        "id": rollout,
        "state": state,
        "strategy": plan.strategy,
        "steps": plan.steps,
        "step": step,
        "select": dict(plan.select),
        "match": match,
        "below": below,
        "bake_s": plan.bake_s,
        "step_timeout_s": plan.step_timeout_s,
        "step_started_at": T0,
        "first_version": FIRST,
    }
    options.update(fields)
    return RolloutTag(**options)


def test_the_tag_selects_exactly_the_instances_of_the_bound() -> None:
    members = fleet_of(names(10, "a-"), zone="a") + fleet_of(names(10, "b-"), zone="b")
    plan = Plan.build(steps="3,40%,100%", select={"zone": "a"})
    zone_a = by_rank(names(10, "a-"))

    for step, expected in ((0, set(zone_a[:3])), (1, set(zone_a[:4])), (2, set(zone_a))):
        tag = tag_for(plan, step, members)
        assert {m.instance for m in members if tag.selects(m.instance, m.labels)} == expected


def test_a_label_step_tag_selects_every_instance_carrying_the_labels() -> None:
    green = fleet_of(names(3, "g-"), color="green")
    blue = fleet_of(names(3, "b-"), color="blue")
    tag = tag_for(Plan.build("blue-green"), 0, green + blue)

    assert {m.instance for m in green + blue if tag.selects(m.instance, m.labels)} == set(
        names(3, "g-")
    )
    assert tag.selects("a-newcomer", {"color": "green"})
    assert not tag.selects("a-newcomer", {})


@pytest.mark.parametrize("state", ["aborted", "promoted"])
def test_an_ended_rollout_selects_nobody(state: str) -> None:
    members = fleet_of(names(5))
    tag = tag_for(Plan.build(steps="100%"), 0, members, state=state)

    assert not any(tag.selects(m.instance, m.labels) for m in members)


def test_a_bound_of_zero_selects_nobody() -> None:
    members = fleet_of(names(5), zone="b")
    tag = tag_for(Plan.build(steps="1", select={"zone": "a"}), 0, members)

    assert tag.below == 0
    assert not any(tag.selects(m.instance, {"zone": "a"}) for m in members)


# -- judge -------------------------------------------------------------------------------


def applied(
    instance: str, *, version: int = FIRST, config_hash: str = HASH, applied_at: int = T0 + sec(1)
) -> Ack:
    return Ack(
        tenant=TENANT,
        env=ENV,
        version=version,
        instance=instance,
        service="svc",
        status="applied",
        channel="candidate",
        config_hash=config_hash,
        applied_at=applied_at,
    )


def refused(
    instance: str, *, version: int = FIRST, reason: str = "refused: v: no", config_hash: str = HASH
) -> Ack:
    return Ack(
        tenant=TENANT,
        env=ENV,
        version=version,
        instance=instance,
        service="svc",
        status="rejected",
        channel="candidate",
        reason=reason,
        config_hash=config_hash,
    )


def member(instance: str, now: int, **fields: Any) -> Member:
    """A live, healthy instance heard just now, heartbeating every BEAT_MS."""
    options: dict[str, Any] = {"last_heard": now, "heartbeat_ms": BEAT_MS}
    options.update(fields)
    return Member(instance, **options)


def canary(**plan: Any) -> RolloutTag:
    """A running tag selecting every instance (step "100%"), started at T0, baked 60s
    and timing out after 300s unless `plan` says otherwise."""
    return tag_for(Plan.build(steps=plan.pop("steps", "100%"), **plan), 0, [])


NOW = T0 + sec(120)  # bake (60s) over, step timeout (300s) not yet


def test_every_selected_instance_applied_and_healthy_after_the_bake_is_next() -> None:
    members = [member(i, NOW, candidate_applied=applied(i)) for i in ("b", "a", "c")]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "next"
    assert verdict.breaches == []
    assert verdict.selected == ["a", "b", "c"]
    assert verdict.applied == ["a", "b", "c"]


def test_an_apply_of_a_later_candidate_version_counts() -> None:
    members = [member("a", NOW, candidate_applied=applied("a", version=FIRST + 3))]

    assert judge(canary(), HASH, FIRST, members, NOW).action == "next"


def _applied(instance: str) -> dict[str, Any]:
    return {"candidate_applied": applied(instance)}


def test_before_the_bake_is_over_it_waits_baking() -> None:
    now = T0 + sec(40)

    verdict = judge(canary(), HASH, FIRST, [member("a", now, **_applied("a"))], now)

    assert verdict.action == "wait"
    assert "baking" in verdict.note
    assert "20s left" in verdict.note
    assert verdict.applied == ["a"]


def test_the_bake_ends_on_its_last_instant() -> None:
    end = T0 + sec(60)

    assert judge(canary(), HASH, FIRST, [member("a", end, **_applied("a"))], end).action == "next"
    early = end - 1
    assert judge(canary(), HASH, FIRST, [member("a", early, **_applied("a"))], early).action == (
        "wait"
    )


def test_it_waits_for_the_selected_instances_that_have_not_applied_yet() -> None:
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW),
        member("c", NOW, **_applied("c")),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "wait"
    assert "waiting for" in verdict.note
    assert "1 of 3" in verdict.note
    assert verdict.selected == ["a", "b", "c"]
    assert verdict.applied == ["a", "c"]


@pytest.mark.parametrize(
    "ack",
    [
        applied("a", version=FIRST - 1),  # an older rollout's candidate
        applied("a", config_hash=OTHER_HASH),  # another content
    ],
)
def test_an_apply_of_something_else_is_not_an_apply_of_the_candidate(ack: Ack) -> None:
    verdict = judge(canary(), HASH, FIRST, [member("a", NOW, candidate_applied=ack)], NOW)

    assert verdict.action == "wait"
    assert "waiting for 1 of 1" in verdict.note
    assert verdict.applied == []


@pytest.mark.parametrize("config_hash", [HASH])
def test_a_refusal_aborts_naming_the_instance_and_why(config_hash: str) -> None:
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW, candidate_refused=refused("b", config_hash=config_hash)),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    assert verdict.breaches == ["refused on b: refused: v: no"]


def test_a_refusal_aborts_even_before_the_bake_is_over_and_beats_an_apply() -> None:
    now = T0 + sec(1)
    both = member("a", now, candidate_applied=applied("a"), candidate_refused=refused("a"))

    verdict = judge(canary(), HASH, FIRST, [both], now)

    assert verdict.action == "abort"
    assert verdict.breaches == ["refused on a: refused: v: no"]


@pytest.mark.parametrize(
    "ack",
    [
        refused("b", version=FIRST - 1),  # an older rollout's candidate
        refused("b", reason="stale_version: v39 is older than v40"),
        refused("b", config_hash=OTHER_HASH),  # another content than this candidate
    ],
)
def test_refusals_that_are_not_of_this_candidate_are_ignored(ack: Ack) -> None:
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW, candidate_applied=applied("b"), candidate_refused=ack),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "next"
    assert verdict.breaches == []


def test_an_instance_silent_after_applying_is_a_crash_after_apply() -> None:
    silent_since = NOW - 3 * BEAT_MS * 10**6 - 1  # three heartbeats and a nanosecond
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW, last_heard=silent_since, **_applied("b")),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    [breach] = verdict.breaches
    assert "crash-after-apply" in breach
    assert "on b" in breach
    assert "silent" in breach
    assert verdict.applied == ["a"]


def test_three_missed_heartbeats_are_not_yet_silence() -> None:
    members = [member("a", NOW, last_heard=NOW - 3 * BEAT_MS * 10**6, **_applied("a"))]

    assert judge(canary(), HASH, FIRST, members, NOW).action == "next"


def test_an_instance_without_heartbeats_takes_no_part_in_the_gate() -> None:
    """It never runs a candidate (the SDK will not, unseen), so it is neither waited
    for nor blamed when it falls silent."""
    quiet = NOW - sec(DEFAULT_TTL_S) - 1
    members = [
        member("a", NOW, heartbeat_ms=0, last_heard=quiet, **_applied("a")),
        member("b", NOW, **_applied("b")),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert (verdict.action, verdict.breaches, verdict.selected) == ("next", [], ["b"])


def test_an_instance_stopped_after_applying_is_a_crash_after_apply() -> None:
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW - sec(5), stopped_at=NOW - sec(5), **_applied("b")),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    [breach] = verdict.breaches
    assert breach.startswith("crash-after-apply on b")
    assert "stopped" in breach


def test_a_stop_followed_by_a_heartbeat_is_not_a_stop() -> None:
    members = [member("a", NOW, stopped_at=NOW - sec(1), **_applied("a"))]

    assert judge(canary(), HASH, FIRST, members, NOW).action == "next"


def test_an_instance_restarted_after_applying_is_a_crash_after_apply() -> None:
    ack = applied("b", applied_at=T0 + sec(10))
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW, restarted_at=T0 + sec(11), candidate_applied=ack),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    [breach] = verdict.breaches
    assert breach.startswith("crash-after-apply on b")
    assert "restarted" in breach


def test_a_restart_before_the_apply_is_not_a_crash() -> None:
    ack = applied("a", applied_at=T0 + sec(10))
    members = [member("a", NOW, restarted_at=T0 + sec(10), candidate_applied=ack)]

    assert judge(canary(), HASH, FIRST, members, NOW).action == "next"


@pytest.mark.parametrize(("note", "shown"), [("db: timeout", "db: timeout"), ("", "unhealthy")])
def test_a_failing_health_check_after_applying_aborts(note: str, shown: str) -> None:
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW, healthy=False, health_note=note, **_applied("b")),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    assert verdict.breaches == [f"health check failed on b: {shown}"]


def test_an_unhealthy_instance_that_has_not_applied_is_waited_for_not_blamed() -> None:
    members = [member("a", NOW, healthy=False, health_note="db: timeout")]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "wait"
    assert verdict.breaches == []


def test_every_breach_is_reported() -> None:
    members = [
        member("a", NOW, candidate_refused=refused("a")),
        member("b", NOW, healthy=False, health_note="x", **_applied("b")),
        member("c", NOW, stopped_at=NOW, **_applied("c")),
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    assert [b.split(":")[0] for b in verdict.breaches] == [
        "refused on a",
        "health check failed on b",
        "crash-after-apply on c",
    ]


# silent since before the step began, or stopped
@pytest.mark.parametrize("gone", [{"last_heard": T0 - sec(60)}, {"stopped_at": NOW}])
def test_an_instance_that_left_before_applying_is_not_waited_for(gone: dict[str, Any]) -> None:
    members = [member("a", NOW, **_applied("a")), member("b", NOW, **gone)]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "next"
    assert verdict.selected == ["a"]


@pytest.mark.parametrize(
    ("plan", "limit"),
    [({}, 300), ({"bake": 100}, 500), ({"step_timeout": "30s", "bake": 0}, 30)],
)
def test_a_step_not_applied_within_its_timeout_aborts(plan: dict[str, Any], limit: int) -> None:
    tag = canary(**plan)

    def verdict_at(now: int) -> Any:
        members = [member("a", now, **_applied("a"))]
        members += [member(i, now) for i in ("b", "c")]
        return judge(tag, HASH, FIRST, members, now)

    assert verdict_at(T0 + sec(limit)).action == "wait"
    late = verdict_at(T0 + sec(limit) + 1)
    assert late.action == "abort"
    [breach] = late.breaches
    assert breach.startswith("step 1 not applied within")
    assert breach.endswith(": b, c")


def test_the_timeout_names_the_step_that_ran() -> None:
    plan = Plan.build(steps="1,100%")
    tag = tag_for(plan, 1, [], step_started_at=T0)
    now = T0 + sec(301)

    verdict = judge(tag, HASH, FIRST, [member("a", now)], now)

    assert verdict.breaches == ["step 2 not applied within 5m: a"]


def test_with_nobody_selected_it_waits_then_aborts() -> None:
    tag = canary(select={"zone": "a"})

    def members_at(now: int) -> list[Member]:
        return [member("b", now, labels={"zone": "b"})]

    early = judge(tag, HASH, FIRST, members_at(NOW), NOW)
    assert early.action == "wait"
    assert early.note == "waiting for a live instance to select"
    assert early.selected == []

    late_now = T0 + sec(301)
    late = judge(tag, HASH, FIRST, members_at(late_now), late_now)
    assert late.action == "abort"
    [breach] = late.breaches
    assert "not applied within" in breach
    assert "no live instance is selected" in breach


def test_with_every_selected_instance_gone_before_the_step_it_aborts_at_the_timeout() -> None:
    now = T0 + sec(301)
    members = [member("a", now, last_heard=T0 - sec(60))]

    verdict = judge(canary(), HASH, FIRST, members, now)

    assert verdict.action == "abort"
    assert verdict.breaches == ["step 1 not applied within 5m: no live instance is selected"]


def test_silence_since_the_step_began_without_an_answer_is_a_crash_after_apply() -> None:
    ttl = 3 * BEAT_MS * 10**6
    last = T0 - ttl  # still live when the step began (its TTL ends right then)
    members = [member("a", NOW, **_applied("a")), member("b", NOW, last_heard=last)]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "abort"
    [breach] = verdict.breaches
    assert breach.startswith("crash-after-apply on b: silent for ")
    assert breach.endswith("since the candidate reached it, without an answer")
    assert verdict.selected == ["a"]

    # one nanosecond earlier it had left before the step began: not part of it
    members[1] = member("b", NOW, last_heard=last - 1)
    assert judge(canary(), HASH, FIRST, members, NOW).action == "next"


def test_a_stop_without_an_answer_is_leaving_not_crashing() -> None:
    members = [
        member("a", NOW, **_applied("a")),
        member("b", T0 + sec(5), stopped_at=T0 + sec(5)),  # stopped during the step
    ]

    verdict = judge(canary(), HASH, FIRST, members, NOW)

    assert verdict.action == "next"
    assert verdict.selected == ["a"]


def test_instances_the_tag_does_not_select_are_ignored_whatever_they_said() -> None:
    plan = Plan.build(steps="2,100%", select={"zone": "a"})
    zone_a = names(6, "a-")
    candidates = fleet_of(zone_a, zone="a")
    tag = tag_for(plan, 0, candidates)
    inside = by_rank(zone_a)[:2]
    behind = by_rank(zone_a)[2:]  # right labels, rank past the bound
    members = [member(i, NOW, labels={"zone": "a"}, **_applied(i)) for i in inside]
    members += [member(i, NOW, labels={"zone": "a"}, candidate_refused=refused(i)) for i in behind]
    members += [
        member("b-x", NOW, labels={"zone": "b"}, candidate_refused=refused("b-x")),
        member("b-y", NOW, labels={"zone": "b"}, stopped_at=NOW, **_applied("b-y")),
        member("b-z", NOW, labels={"zone": "b"}, healthy=False, **_applied("b-z")),
    ]

    verdict = judge(tag, HASH, FIRST, members, NOW)

    assert verdict.action == "next"
    assert verdict.selected == sorted(inside)
    # the same refusal inside the selection does abort
    members[0] = member(inside[0], NOW, labels={"zone": "a"}, candidate_refused=refused("x"))
    assert judge(tag, HASH, FIRST, members, NOW).action == "abort"


@pytest.mark.parametrize("state", ["aborted", "promoted"])
def test_an_ended_rollout_judges_nobody(state: str) -> None:
    tag = tag_for(Plan.build(steps="100%"), 0, [], state=state)
    members = [member("a", NOW, candidate_refused=refused("a"))]

    verdict = judge(tag, HASH, FIRST, members, NOW)

    assert verdict.breaches == []
    assert verdict.selected == []


# -- Fleet.observe -------------------------------------------------------------------------


def heartbeat(instance: str = "a", **fields: Any) -> Ack:
    options: dict[str, Any] = {
        "tenant": TENANT,
        "env": ENV,
        "version": 7,
        "instance": instance,
        "service": "shop",
        "status": "heartbeat",
        "channel": "presence",
        "labels": {"zone": "a"},
        "started_at": T0,
        "heartbeat_ms": BEAT_MS,
    }
    options.update(fields)
    return Ack(**options)


def stopped(instance: str = "a") -> Ack:
    return Ack(
        tenant=TENANT, env=ENV, version=7, instance=instance, service="shop", status="stopped"
    )


def feed(fleet: Fleet, ack: Ack, at: int, key: bytes | None = None) -> None:
    fleet.observe(ack.key if key is None else key, msgspec.msgpack.encode(ack), at)


def test_a_heartbeat_says_what_the_instance_is_and_runs() -> None:
    fleet = Fleet()
    beat = heartbeat(
        labels={"zone": "b", "color": "green"},
        started_at=T0 - sec(100),
        heartbeat_ms=5_000,
        healthy=False,
        health_note="db: down",
        version=12,
        candidate_version=44,
        config_hash=HASH,
    )

    feed(fleet, beat, T0)

    [m] = fleet.members(TENANT, ENV).values()
    assert m.instance == "a"
    assert m.service == "shop"
    assert m.labels == {"zone": "b", "color": "green"}
    assert m.started_at == T0 - sec(100)
    assert m.heartbeat_ms == 5_000
    assert (m.healthy, m.health_note) == (False, "db: down")
    assert (m.version, m.candidate_version, m.config_hash) == (12, 44, HASH)
    assert m.last_heard == T0
    assert m.restarted_at == 0
    assert fleet.members(TENANT, "dev") == {}
    assert fleet.members("other", ENV) == {}


def test_a_later_heartbeat_replaces_what_an_earlier_one_said() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat(healthy=False, health_note="x", labels={"zone": "a"}), T0)
    feed(fleet, heartbeat(healthy=True, labels={"zone": "c"}, version=8, service=""), T0 + sec(2))

    m = fleet.members(TENANT, ENV)["a"]
    assert m.service == "shop"  # an ack that does not say keeps what an earlier one said
    assert (m.healthy, m.health_note, m.labels, m.version) == (True, "", {"zone": "c"}, 8)
    assert m.last_heard == T0 + sec(2)
    assert m.restarted_at == 0  # same started_at: no restart


def test_a_heartbeat_with_a_later_start_is_a_restart() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat(started_at=T0), T0 + sec(1))
    feed(fleet, heartbeat(started_at=T0 + sec(30)), T0 + sec(31))

    m = fleet.members(TENANT, ENV)["a"]
    assert m.restarted_at == T0 + sec(30)  # its own start time, the clock of its acks
    assert m.started_at == T0 + sec(30)

    feed(fleet, heartbeat(started_at=T0), T0 + sec(32))  # an older start changes nothing
    assert m.restarted_at == T0 + sec(30)
    assert m.started_at == T0 + sec(30)


def test_an_instance_that_restarted_then_applied_at_start_up_is_not_a_crash() -> None:
    """A pod replaced mid-rollout applies the candidate inside start(), before its
    first heartbeat is written: what counts is when it started, not when it said so."""
    fleet = Fleet()
    feed(fleet, heartbeat(started_at=T0), T0 + sec(1))
    restart = T0 + sec(5)
    at_start_up = applied("a", applied_at=restart + sec(0.5))
    fleet.observe(at_start_up.key, msgspec.msgpack.encode(at_start_up), restart + sec(0.5))
    feed(fleet, heartbeat(started_at=restart), restart + sec(1))

    members = list(fleet.members(TENANT, ENV).values())
    assert members[0].restarted_at == restart
    verdict = judge(canary(bake=0), HASH, FIRST, members, restart + sec(1))
    assert (verdict.action, verdict.breaches) == ("next", [])


def test_a_first_start_time_after_none_is_not_a_restart() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat(started_at=0), T0)
    feed(fleet, heartbeat(started_at=T0), T0 + sec(1))

    assert fleet.members(TENANT, ENV)["a"].restarted_at == 0


def test_a_stopped_instance_is_not_live_until_it_beats_again() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat(), T0)
    assert fleet.members(TENANT, ENV)["a"].live(T0 + sec(1))

    feed(fleet, stopped(), T0 + sec(1))
    m = fleet.members(TENANT, ENV)["a"]
    assert m.stopped_at == T0 + sec(1)
    assert m.last_heard == T0  # a stop is not a sign of life
    assert not m.live(T0 + sec(1))
    assert m.gone_why(T0 + sec(1)) == "stopped"
    assert list(fleet.live(TENANT, ENV, T0 + sec(1))) == []

    feed(fleet, heartbeat(), T0 + sec(3))
    assert m.live(T0 + sec(3))
    assert m.gone_why(T0 + sec(3)) == ""
    assert [x.instance for x in fleet.live(TENANT, ENV, T0 + sec(3))] == ["a"]


def test_a_stop_alone_makes_a_member_that_is_not_live() -> None:
    fleet = Fleet()
    feed(fleet, stopped("z"), T0)

    m = fleet.members(TENANT, ENV)["z"]
    assert m.service == "shop"
    assert not m.live(T0)


def test_a_record_timestamped_earlier_does_not_turn_the_clock_back() -> None:
    # Records come in topic order, but their write times (the producers' clocks) need not.
    fleet = Fleet()
    feed(fleet, heartbeat(), T0 + sec(10))
    feed(fleet, applied("a"), T0 + sec(5))
    feed(fleet, stopped(), T0 + sec(20))
    feed(fleet, stopped(), T0 + sec(15))

    m = fleet.members(TENANT, ENV)["a"]
    assert m.last_heard == T0 + sec(10)
    assert m.stopped_at == T0 + sec(20)
    assert m.candidate_applied == applied("a")


def test_an_instance_is_live_for_three_heartbeats() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat("a", heartbeat_ms=1_000), T0)
    feed(fleet, heartbeat("b", heartbeat_ms=10_000), T0)
    m = fleet.members(TENANT, ENV)

    assert m["a"].live(T0 + sec(3))
    assert not m["a"].live(T0 + sec(3) + 1)
    assert m["a"].gone_why(T0 + sec(4)) == "silent for 4.0s"
    assert m["b"].live(T0 + sec(30))
    assert not m["b"].live(T0 + sec(30) + 1)
    assert [x.instance for x in fleet.live(TENANT, ENV, T0 + sec(10))] == ["b"]


def test_an_instance_without_heartbeats_is_live_for_the_default_ttl() -> None:
    fleet = Fleet()
    feed(fleet, applied("a"), T0)  # a candidate ack, never a heartbeat

    m = fleet.members(TENANT, ENV)["a"]
    assert m.heartbeat_ms == 0
    assert m.live(T0 + sec(DEFAULT_TTL_S))
    assert not m.live(T0 + sec(DEFAULT_TTL_S) + 1)


def test_candidate_acks_are_kept_as_the_last_applied_and_refused() -> None:
    fleet = Fleet()
    first, second = applied("a", version=FIRST), applied("a", version=FIRST + 1)
    no = refused("a", version=FIRST + 2)
    feed(fleet, heartbeat(), T0)
    feed(fleet, first, T0 + sec(1))
    feed(fleet, second, T0 + sec(2))
    feed(fleet, no, T0 + sec(3))

    m = fleet.members(TENANT, ENV)["a"]
    assert m.candidate_applied == second
    assert m.candidate_refused == no
    assert m.last_heard == T0 + sec(3)  # any ack is a sign of life
    assert m.labels == {"zone": "a"}  # not touched by the candidate acks


def test_snapshot_acks_are_not_candidate_acks() -> None:
    fleet = Fleet()
    snapshot = Ack(
        tenant=TENANT, env=ENV, version=9, instance="a", service="shop", status="applied"
    )
    feed(fleet, snapshot, T0)

    m = fleet.members(TENANT, ENV)["a"]
    assert m.candidate_applied is None
    assert m.last_heard == T0


def test_records_that_are_not_an_ack_under_its_own_key_are_ignored() -> None:
    fleet = Fleet()
    beat = heartbeat("a")
    feed(fleet, beat, T0, key=heartbeat("b").key)  # speaking for another instance
    fleet.observe(None, msgspec.msgpack.encode(beat), T0)
    fleet.observe(beat.key, b"\xc1 not msgpack", T0)
    fleet.observe(beat.key, msgspec.msgpack.encode({"status": "heartbeat"}), T0)
    fleet.observe(beat.key, None, T0)

    assert fleet.records == 5
    assert fleet.streams == {}

    feed(fleet, beat, T0)
    assert fleet.records == 6
    assert list(fleet.members(TENANT, ENV)) == ["a"]


def test_the_fleet_feeds_judge() -> None:
    """From acks to a verdict: what the daemon does with the acks topic."""
    fleet = Fleet()
    for i in ("a", "b"):
        feed(fleet, heartbeat(i), T0)
        feed(fleet, applied(i), T0 + sec(1))
    feed(fleet, heartbeat("b", healthy=False, health_note="slow"), T0 + sec(2))
    now = T0 + sec(3)

    verdict = judge(canary(bake=0), HASH, FIRST, fleet.members(TENANT, ENV).values(), now)

    assert verdict.action == "abort"
    assert verdict.breaches == ["health check failed on b: slow"]


# -- a tenant.yml's rollout: block -----------------------------------------------------------


def tenant_tree(make_tree: TreeFactory, rollout: str) -> Path:
    return make_tree(
        {
            "prod/prod.yml": "a: 1\n",
            "dev/dev.yml": "a: 1\n",
            "tenants/t/tenant.yml": (
                "tenant: t\n"
                "environments:\n"
                "  dev: {}\n"
                "  prod:\n"
                "    layer: false\n"
                f"    rollout:{rollout}\n"
            ),
        }
    )


def test_a_rollout_block_gives_the_environment_a_plan(make_tree: TreeFactory) -> None:
    root = tenant_tree(
        make_tree,
        "\n      strategy: canary\n      steps: [1, 25%, 100%]\n      bake: 90s\n"
        "      select: {tier: web}\n      step_timeout: 10m",
    )

    spec = EnvironmentTree(root).tenant("t")

    assert spec.rollouts["prod"] == Plan.build(
        "canary", ["1", "25%", "100%"], 90, {"tier": "web"}, 600
    )
    assert "dev" not in spec.rollouts
    assert spec.environments["prod"] == ()


def test_a_rollout_flow_mapping_with_defaults(make_tree: TreeFactory) -> None:
    root = tenant_tree(make_tree, " {strategy: blue-green, bake: 30}")

    assert EnvironmentTree(root).tenant("t").rollouts["prod"] == Plan.build("blue-green", bake=30)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            "\n      steps: [1, 100%]\n      speed: fast",
            "unknown key 'speed' (allowed: bake, select, step_timeout, steps, strategy)",
        ),
        (" canary", "must be a mapping: strategy, steps, bake, select, step_timeout"),
        (" [1, 100%]", "must be a mapping"),
        ("\n      steps: [0, 100%]", "step '0': say a count"),
        ("\n      steps: [1, 150%]", "step '150%': a share between 0% and 100%"),
        ("\n      steps: 5", "steps: a list such as [1, 10%, 50%, 100%]"),
        ("\n      select: [zone=a]", "select: a mapping of label: value"),
        ("\n      select: {bad key: x}", "'bad key=x': say name=value"),
        ("\n      strategy: linear", "strategy 'linear': say canary or blue-green"),
        ("\n      bake: forever", "bake: 'forever' is not a duration"),
    ],
)
def test_a_bad_rollout_block_is_a_problem_at_its_line(
    make_tree: TreeFactory, block: str, message: str
) -> None:
    root = tenant_tree(make_tree, block)
    tenant_file = root / "tenants/t/tenant.yml"

    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).tenant("t")

    [problem] = caught.value.problems
    assert problem.source == str(tenant_file)
    assert problem.line == line_of(tenant_file, "rollout:")
    assert problem.key == "environments.prod.rollout"
    assert message in problem.message
    assert f"tenant.yml:{problem.line}: environments.prod.rollout: " in str(caught.value)


def test_instances_not_heard_of_for_long_are_forgotten() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat("old", started_at=T0), T0)
    feed(fleet, heartbeat("new", started_at=T0), T0 + sec(100))

    assert fleet.prune(T0 + sec(50)) == 1

    assert set(fleet.members(TENANT, ENV)) == {"new"}
    assert fleet.prune(T0 + sec(200)) == 1
    assert fleet.streams == {}


def test_a_crash_loop_that_applies_the_candidate_again_at_each_start_is_caught() -> None:
    fleet = Fleet()
    feed(fleet, heartbeat(started_at=T0), T0 + sec(1))
    first = applied("a", applied_at=T0 + sec(5))
    fleet.observe(first.key, msgspec.msgpack.encode(first), T0 + sec(5))
    again = applied("a", applied_at=T0 + sec(7))  # died, started at T0+6, applied again
    fleet.observe(again.key, msgspec.msgpack.encode(again), T0 + sec(7))
    feed(fleet, heartbeat(started_at=T0 + sec(6)), T0 + sec(8))

    verdict = judge(canary(bake=0), HASH, FIRST, fleet.members(TENANT, ENV).values(), T0 + sec(8))

    assert verdict.action == "abort"
    assert verdict.breaches == ["crash-after-apply on a: restarted after applying it"]


def test_a_refusal_without_the_candidates_hash_is_nobodys_answer() -> None:
    """A refusal of a record that did not verify carries no hash: the instance could
    not know it was selected, and anyone may write such an ack."""
    members = [
        member("a", NOW, **_applied("a")),
        member("b", NOW, candidate_refused=refused("b", config_hash=""), **_applied("b")),
    ]

    assert judge(canary(), HASH, FIRST, members, NOW).action == "next"


STABLE = "f" * 64


def test_phantoms_that_do_not_run_the_streams_config_are_neither_waited_for_nor_blamed() -> None:
    real = member("a", NOW, config_hash=HASH, **_applied("a"))
    phantom = member("ghost", NOW - sec(100), config_hash="0" * 64)  # forged, then silent
    forged = member("mimic", NOW, config_hash="1" * 64, healthy=False, health_note="forged")

    verdict = judge(canary(), HASH, FIRST, [real, phantom, forged], NOW, stable_hash=STABLE)

    assert (verdict.action, verdict.breaches, verdict.selected) == ("next", [], ["a"])
    assert follows(member("b", NOW, config_hash=STABLE), STABLE, HASH)
    assert not follows(member("c", NOW, config_hash=STABLE, heartbeat_ms=0), STABLE, HASH)


def test_a_heartbeat_with_bad_labels_or_another_stream_is_not_taken() -> None:
    fleet = Fleet(accept=lambda stream: stream == (TENANT, ENV))
    feed(fleet, heartbeat("a", labels={"zone": "a,b"}), T0)  # not a label value
    feed(fleet, heartbeat("b", labels={f"l{n}": "x" for n in range(40)}), T0)  # too many
    other = msgspec.structs.replace(heartbeat("c"), tenant="other")
    fleet.observe(other.key, msgspec.msgpack.encode(other), T0)
    feed(fleet, heartbeat("d", heartbeat_ms=10**12), T0)

    assert set(fleet.members(TENANT, ENV)) == {"d"}
    assert fleet.members("other", ENV) == {}
    assert fleet.ignored == 3
    assert not fleet.members(TENANT, ENV)["d"].live(T0 + sec(16 * 60))  # clamped to 5 min

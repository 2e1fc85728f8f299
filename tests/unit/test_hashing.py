"""Canonical JSON and the config hash: same config, same bytes, whatever the files look like."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import SecretRef, canonical_json, config_hash, freeze

from .helpers import TreeFactory

TIDY = """
app:
  name: api
  workers: 4
  ratio: 0.5
  debug: false
  hosts: [a, b]
db:
  host: db.internal
  password: !secret db/password
  pool: {min: 1, max: 10}
empty: {}
nothing: null
"""

# The same config: other key order at every level, comments, flow/block styles,
# quoting and blank lines.
MESSY = """
# the database first this time
db:
  pool:
    max: 10     # upper bound
    min: 1

  password: !secret "db/password"
  host: "db.internal"

nothing: ~
empty: {}
app: {debug: false, hosts: ["a", 'b'], ratio: 0.50, workers: 4, name: api}
"""


def resolve(make_tree: TreeFactory, text: str, name: str) -> Any:
    return EnvironmentTree(make_tree({"dev/dev.yml": text}, name=name)).resolve("dev")


def test_key_order_comments_and_style_do_not_change_the_hash(make_tree: TreeFactory) -> None:
    tidy = resolve(make_tree, TIDY, "tidy")
    messy = resolve(make_tree, MESSY, "messy")

    assert list(tidy["app"]) != list(messy["app"])  # the orders really differ
    assert tidy.canonical_json == messy.canonical_json
    assert tidy.hash == messy.hash
    assert tidy == messy


def test_canonical_json_is_sorted_compact_json_and_the_hash_is_its_sha256(
    make_tree: TreeFactory,
) -> None:
    config = resolve(make_tree, MESSY, "messy")
    expected = json.dumps(
        config.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()

    assert config.canonical_json == expected
    assert config.hash == hashlib.sha256(expected).hexdigest()
    assert len(config.hash) == 64


def test_secrets_are_encoded_as_a_secret_object_by_name(make_tree: TreeFactory) -> None:
    config = resolve(make_tree, TIDY, "tidy")

    assert b'"password":{"$secret":"db/password"}' in config.canonical_json
    assert json.loads(config.canonical_json)["db"]["password"] == {"$secret": "db/password"}


def changed(make_tree: TreeFactory, old: str, new: str) -> tuple[str, str]:
    assert old in TIDY
    before = resolve(make_tree, TIDY, "before")
    after = resolve(make_tree, TIDY.replace(old, new), "after")
    return before.hash, after.hash


def test_a_changed_value_changes_the_hash(make_tree: TreeFactory) -> None:
    for old, new in [
        ("workers: 4", "workers: 5"),
        ("ratio: 0.5", "ratio: 0.25"),
        ("debug: false", "debug: true"),
        ("hosts: [a, b]", "hosts: [b, a]"),  # list order matters
        ("hosts: [a, b]", "hosts: [a, b, b]"),
        ("workers: 4", 'workers: "4"'),  # a string is not a number
        ("nothing: null", "nothing: false"),
        ("empty: {}", "empty: []"),
        ("!secret db/password", "!secret db/other_password"),
        ("name: api", "Name: api"),  # keys are case-sensitive
        ("pool: {min: 1, max: 10}", "pool: {min: 1, max: 10, extra: null}"),
    ]:
        before, after = changed(make_tree, old, new)
        assert before != after, (old, new)


def test_a_secret_hashes_unlike_a_plain_string_with_its_name() -> None:
    assert config_hash(freeze({"p": SecretRef("db/pw")})) != config_hash(freeze({"p": "db/pw"}))


# -- property: any key order gives the same hash -------------------------------------------

KEYS = st.text(alphabet="abcxyz_.-", min_size=1, max_size=5)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["db/password", "a", "tenants/x.y-z_1"]).map(SecretRef)
)
NESTED = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=12,
)
CONFIGS = st.dictionaries(KEYS, NESTED, max_size=5)

# The same examples on every run and machine: a failure here is the code's, not the seed's,
# and a loaded machine cannot make generation "too slow" (the health check stays on).
# Timing is for benchmarks/, so no per-example deadline.
DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=150)


def shuffled(value: Any, rng: random.Random) -> Any:
    """`value` with the keys of every mapping in a random insertion order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: shuffled(child, rng) for key, child in items}
    if isinstance(value, list):
        return [shuffled(child, rng) for child in value]
    return value


@DETERMINISTIC
@given(CONFIGS, st.randoms(use_true_random=False))
def test_the_hash_ignores_key_order(config: dict[str, Any], rng: random.Random) -> None:
    original, permuted = freeze(config), freeze(shuffled(config, rng))

    assert canonical_json(original) == canonical_json(permuted)
    assert config_hash(original) == config_hash(permuted)


@DETERMINISTIC
@given(CONFIGS)
def test_canonical_json_round_trips_to_the_same_config(config: dict[str, Any]) -> None:
    frozen = freeze(config)

    assert freeze(json.loads(canonical_json(frozen))) == frozen

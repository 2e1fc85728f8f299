"""The merge rules of `configbus.tree.merge.merge`, and the laws they obey.

Layers here are plain dicts and tuples (what a parsed file holds, minus the
freezing); lower values are frozen with `freeze` where immutability matters.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configbus.tree.layer import Layer, LayerKind
from configbus.tree.merge import MergeCache, merge
from configbus.tree.values import DELETE, canonical_json, freeze, thaw, walk


def has_delete(value: Any) -> bool:
    if value is DELETE:
        return True
    if isinstance(value, dict):
        return any(has_delete(v) for v in value.values())
    if isinstance(value, tuple | list):
        return any(has_delete(v) for v in value)
    return False


# -- the rules, one by one -----------------------------------------------------------------


def test_mappings_merge_deeply() -> None:
    lower = freeze({"db": {"host": "a", "port": 1, "pool": {"min": 1, "max": 5}}, "x": 1})
    higher = {"db": {"port": 2, "pool": {"max": 10}}}

    assert thaw(merge(lower, higher)) == {
        "db": {"host": "a", "port": 2, "pool": {"min": 1, "max": 10}},
        "x": 1,
    }


def test_new_keys_are_added_at_every_depth() -> None:
    lower = freeze({"a": {"b": 1}})
    higher = {"a": {"c": 2}, "d": {"e": {"f": 3}}}

    assert thaw(merge(lower, higher)) == {"a": {"b": 1, "c": 2}, "d": {"e": {"f": 3}}}


@pytest.mark.parametrize(
    ("below", "above"),
    [(1, 2), ("a", "b"), (True, False), (1.5, 0), ("x", None), (None, "set")],
)
def test_scalars_replace(below: Any, above: Any) -> None:
    result = merge(freeze({"k": below, "other": 1}), {"k": above})

    assert thaw(result) == {"k": above, "other": 1}


def test_null_is_a_value_not_a_deletion() -> None:
    result = merge(freeze({"k": {"a": 1}}), {"k": None})

    assert "k" in result
    assert result["k"] is None


def test_lists_replace_they_do_not_append() -> None:
    result = merge(freeze({"hosts": ["a", "b", "c"]}), {"hosts": ("z",)})

    assert result["hosts"] == ("z",)


def test_lists_of_mappings_replace_whole_not_item_by_item() -> None:
    lower = freeze({"nodes": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]})

    result = merge(lower, {"nodes": ({"name": "c"},)})

    assert thaw(result) == {"nodes": [{"name": "c"}]}


def test_an_empty_list_replaces_a_full_one() -> None:
    assert merge(freeze({"hosts": ["a"]}), {"hosts": ()})["hosts"] == ()


@pytest.mark.parametrize("below", [5, "text", None, ["a", "b"]])
def test_a_mapping_replaces_a_scalar_or_list(below: Any) -> None:
    result = merge(freeze({"k": below}), {"k": {"a": 1}})

    assert thaw(result) == {"k": {"a": 1}}


@pytest.mark.parametrize("above", [5, "off", None, ("a",)])
def test_a_scalar_or_list_replaces_a_mapping(above: Any) -> None:
    result = merge(freeze({"k": {"a": 1, "b": {"c": 2}}}), {"k": above})

    assert result["k"] == above


def test_delete_removes_a_key_and_keeps_its_siblings() -> None:
    result = merge(freeze({"a": 1, "b": 2}), {"a": DELETE})

    assert thaw(result) == {"b": 2}


def test_delete_removes_a_whole_subtree() -> None:
    lower = freeze({"cache": {"redis": {"nodes": ["a"], "tls": {"ca": "x"}}}, "keep": 1})

    result = merge(lower, {"cache": DELETE})

    assert thaw(result) == {"keep": 1}


def test_delete_inside_a_mapping_removes_only_that_key() -> None:
    lower = freeze({"cache": {"redis": {"port": 1}, "ttl": 5}})

    result = merge(lower, {"cache": {"redis": DELETE}})

    assert thaw(result) == {"cache": {"ttl": 5}}


def test_a_key_can_be_deleted_and_set_again_by_a_higher_layer() -> None:
    lower = freeze({"cache": {"old": 1}})

    result = merge(merge(lower, {"cache": DELETE}), {"cache": {"new": 2}})

    assert thaw(result) == {"cache": {"new": 2}}


def test_delete_of_a_key_absent_below_is_harmless_and_leaves_no_marker() -> None:
    lower = freeze({"a": 1, "n": {"x": 1}})
    higher = {"missing": DELETE, "n": {"also_missing": DELETE}}

    result = merge(lower, higher)

    assert thaw(result) == {"a": 1, "n": {"x": 1}}
    assert not has_delete(result)


def test_delete_below_a_key_that_is_new_or_was_a_scalar_leaves_no_marker() -> None:
    lower = freeze({"was_scalar": 1})
    higher = {"was_scalar": {"gone": DELETE, "z": 2}, "new": {"gone": DELETE, "y": 1}}

    result = merge(lower, higher)

    assert thaw(result) == {"was_scalar": {"z": 2}, "new": {"y": 1}}
    assert not has_delete(result)


def test_the_delete_marker_survives_copy_and_pickle() -> None:
    # Merges test markers by identity, so a copied layer must still hold DELETE itself.
    layer_data = {"a": DELETE, "b": {"c": DELETE}}

    for copied in (copy.deepcopy(layer_data), pickle.loads(pickle.dumps(layer_data))):
        assert copied["a"] is DELETE
        assert copied["b"]["c"] is DELETE
        assert thaw(merge(freeze({"a": 1, "b": {"c": 1, "d": 1}}), copied)) == {"b": {"d": 1}}


def test_an_empty_higher_layer_changes_nothing() -> None:
    lower = freeze({"a": {"b": 1}})

    assert thaw(merge(lower, {})) == {"a": {"b": 1}}
    assert thaw(merge(lower, {"a": {}})) == {"a": {"b": 1}}


def test_inputs_are_never_changed() -> None:
    lower: dict[str, Any] = {"a": {"b": 1, "c": [1, 2]}, "d": 1, "gone": {"x": 1}}
    higher: dict[str, Any] = {"a": {"b": 2, "e": {"f": 1}}, "d": DELETE, "gone": DELETE}
    lower_before, higher_before = copy.deepcopy(lower), copy.deepcopy(higher)

    merge(lower, higher)

    assert lower == lower_before
    assert higher == higher_before
    assert higher["d"] is DELETE


def test_results_are_immutable_all_the_way_down() -> None:
    lower = freeze({"a": {"b": {"c": 1}}, "list": [1, 2]})

    result = merge(lower, {"a": {"b": {"d": 2}}, "new": {"x": (1,)}})

    for mapping in (result, result["a"], result["a"]["b"], result["new"]):
        with pytest.raises(TypeError):
            mapping["z"] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            del mapping[next(iter(mapping))]  # type: ignore[attr-defined]
        with pytest.raises((TypeError, AttributeError)):
            mapping.update({"z": 1})  # type: ignore[attr-defined]
    assert isinstance(result["list"], tuple)
    assert isinstance(result["new"]["x"], tuple)


def test_an_in_place_operator_cannot_change_a_result() -> None:
    result = merge(freeze({"a": 1}), {"b": 2})
    alias = result

    with contextlib.suppress(TypeError):  # refusing is fine; changing `result` is not
        alias |= {"c": 3}  # type: ignore[operator]
    assert thaw(result) == {"a": 1, "b": 2}


# -- stacks of layers: what the tree does --------------------------------------------------


def layer(data: dict[str, Any], name: str = "l") -> Layer:
    return Layer(LayerKind.ENVIRONMENT, name, f"{name}.yml", data)


def fold(stack: list[dict[str, Any]]) -> Any:
    merged: Any = {}
    for data in stack:
        merged = merge(merged, data)
    return merged


def test_merge_cache_merges_a_stack_lowest_first() -> None:
    stack = [layer({"a": 1, "b": {"c": 1}}), layer({"a": 2}), layer({"b": DELETE})]

    assert thaw(MergeCache().merge(stack)) == {"a": 2}


def test_merge_cache_reuses_prefixes_and_a_new_layer_object_misses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    merging = sys.modules[MergeCache.__module__]  # the module (the package exports `merge`)
    steps: list[object] = []  # the layer data merged in, one entry per merge step
    real = merging.merge

    def counted(lower: Any, upper: Any) -> Any:
        steps.append(upper)
        return real(lower, upper)

    monkeypatch.setattr(merging, "merge", counted)
    cache = MergeCache()
    base, env = layer({"a": 1}, "base"), layer({"b": 1}, "env")
    first = cache.merge([base, env, t1 := layer({"c": 1}, "t1")])
    assert steps == [base.data, env.data, t1.data]
    steps.clear()
    second = cache.merge([base, env, t2 := layer({"c": 2}, "t2")])
    assert steps == [t2.data]  # base and env came from the cache
    steps.clear()
    # The same file re-read is a new Layer: its old merge must not be served.
    reread = cache.merge([base, env2 := layer({"b": 9}, "env"), t2])
    assert steps == [env2.data, t2.data]  # only base's merge was reused

    assert thaw(first) == {"a": 1, "b": 1, "c": 1}
    assert thaw(second) == {"a": 1, "b": 1, "c": 2}
    assert thaw(reread) == {"a": 1, "b": 9, "c": 2}


# -- laws, by property ---------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])  # few keys, so layers collide often
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["x", "y", ""])
LEAVES = SCALARS | st.lists(SCALARS, max_size=3).map(tuple)


def layers(deletes: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Nested mappings of scalars and lists; with `deletes`, DELETE markers may stand
    as the value of any mapping key (never in a list, which the parser refuses)."""

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        entry = children | st.just(DELETE) if deletes else children
        return st.dictionaries(KEYS, entry, max_size=4)

    tree = st.recursive(LEAVES, extend, max_leaves=12)
    return st.dictionaries(KEYS, tree | st.just(DELETE) if deletes else tree, max_size=4)


CONFIGS = layers(deletes=False)
LAYERS = layers(deletes=True)


def same(x: Any, y: Any) -> bool:
    return canonical_json(x) == canonical_json(y)


def no_rebuild(middle: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top`, changed so that it never sets a mapping where `middle` holds a
    non-mapping (a scalar, list, null or DELETE): there the fold starts the mapping
    afresh, while merge(middle, top) would forget the reset."""
    out = dict(top)
    for key, value in top.items():
        if key not in middle or not isinstance(value, dict):
            continue
        below = middle[key]
        out[key] = no_rebuild(below, value) if isinstance(below, dict) else "reset"
    return out


@given(CONFIGS, CONFIGS, CONFIGS)
def test_associative_when_the_top_layer_rebuilds_nothing(a: Any, b: Any, c: Any) -> None:
    c = no_rebuild(b, c)

    assert same(merge(merge(a, b), c), merge(a, merge(b, c)))


@given(CONFIGS, LAYERS, CONFIGS)
def test_associative_with_deletes_in_the_middle_layer_only(a: Any, b: Any, c: Any) -> None:
    # The true law with deletions: merge(b, c) can stand in for "b, then c" as long as
    # c deletes nothing and never rebuilds a mapping that b replaced or deleted.
    c = no_rebuild(b, c)

    assert same(merge(merge(a, b), c), merge(a, merge(b, c)))


def test_not_associative_when_a_mapping_is_rebuilt_over_a_replaced_one() -> None:
    # Even without any DELETE: b replaces the mapping with a scalar, c starts a new
    # mapping. Applied in turn, c's mapping is fresh; merge(b, c) forgets b's reset.
    a, b, c = {"db": {"host": "h", "port": 1}}, {"db": "off"}, {"db": {"port": 2}}

    assert thaw(merge(merge(a, b), c)) == {"db": {"port": 2}}
    assert thaw(merge(a, merge(b, c))) == {"db": {"host": "h", "port": 2}}


def test_not_associative_when_a_deleted_mapping_is_rebuilt() -> None:
    a, b, c = {"db": {"host": "h"}}, {"db": DELETE}, {"db": {"port": 2}}

    assert thaw(merge(merge(a, b), c)) == {"db": {"port": 2}}
    assert thaw(merge(a, merge(b, c))) == {"db": {"host": "h", "port": 2}}


@pytest.mark.parametrize("b", [{}, {"k": 2}, {"k": {"x": 1}}])
def test_a_delete_in_the_top_layer_is_spent_on_the_middle_one(b: dict[str, Any]) -> None:
    # merge(b, c) applies c's deletion to b and keeps no marker, so it no longer
    # deletes anything from a: layers must be folded one at a time, lowest first.
    a, c = {"k": 1, "keep": 1}, {"k": DELETE}

    assert thaw(merge(merge(a, b), c)) == {"keep": 1}
    assert thaw(merge(a, merge(b, c))) == {"k": 1, "keep": 1}


@given(CONFIGS, LAYERS, LAYERS, LAYERS)
@settings(max_examples=60)
def test_merge_cache_equals_the_left_fold(a: Any, b: Any, c: Any, d: Any) -> None:
    cache = MergeCache()
    la, lb, lc, ld = (layer(x, n) for x, n in ((a, "a"), (b, "b"), (c, "c"), (d, "d")))
    cache.merge([la, lb, lc])  # fills the cache with prefixes of the next stacks
    cache.merge([la, lb, ld])

    assert same(cache.merge([la, lb, lc, ld]), fold([a, b, c, d]))
    assert same(cache.merge([la, lb, ld]), fold([a, b, d]))


@given(CONFIGS, LAYERS)
def test_applying_a_layer_twice_is_applying_it_once(a: Any, b: Any) -> None:
    once = merge(a, b)

    assert same(merge(once, b), once)


@given(CONFIGS, LAYERS)
def test_the_result_never_holds_a_marker_and_lacks_every_deleted_key(a: Any, b: Any) -> None:
    result = merge(a, b)

    assert not has_delete(result)

    def deleted_paths(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        found = []
        for key, child in value.items():
            if child is DELETE:
                found.append((*path, key))
            elif isinstance(child, dict):
                found += deleted_paths(child, (*path, key))
        return found

    for path in deleted_paths(b):
        _, _, complete = walk(result, path)
        assert not complete, path


@given(CONFIGS)
def test_the_empty_layer_is_an_identity_on_both_sides(a: Any) -> None:
    assert same(merge(a, {}), a)
    assert same(merge({}, a), a)

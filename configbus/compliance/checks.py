"""The `check:` of a rule: a small declarative vocabulary over the paths of a config.

A check names settings and what they must be; every operator given must hold for
every setting its paths match::

    check:
      path: "**.tls.min_version"      # or paths: [a, b]; * and ** wildcards (paths.py)
      version: ">= 1.2"

    equals: VALUE          exactly this value (true is not 1, "1" is not 1)
    one_of: [A, B]         one of these; for a list, each of its items
    none_of: [A, B]        none of these; for a list, none of its items
    min: N   max: N        a number within these bounds
    version: ">= 1.2"      a version, compared part by part ("1.10" is above "1.2");
                           >=, >, <=, < or ==; "TLSv1.2" reads as 1.2
    contains: [A, B]       a list holding each of these
    present: true|false    set and not null, or not set at all
    missing: fail|pass     what a path matching nothing gives (default fail: a
                           setting a rule requires must be there)

A forbidden combination is a condition and a requirement, both in the same words::

    check:
      when: {path: compliance.hipaa, equals: true}
      require: {path: logging.include_request_body, equals: false}

When the condition does not hold (or names nothing), the rule does not apply: n/a.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from configbus.compliance.findings import Observation, Status, one_line, shown
from configbus.compliance.paths import Document, Pattern, pattern_problem
from configbus.tree.values import Path as KeyPath

__all__ = ["OPERATORS", "Check", "Condition", "parse_check", "version_key"]

OPERATORS: Final = (
    "equals",
    "one_of",
    "none_of",
    "min",
    "max",
    "version",
    "contains",
    "present",
)
_CONDITION_KEYS: Final = frozenset({"path", "paths", "missing", *OPERATORS})
_VERSION_SPEC: Final = re.compile(r"\s*(>=|<=|==|>|<)\s*(\d+(?:\.\d+)*)\s*")
_VERSION_VALUE: Final = re.compile(r"\s*(?:tls|ssl)?\s*v?(\d+(?:\.\d+)*)\s*", re.IGNORECASE)
_COMPARE: Final[dict[str, Callable[[int], bool]]] = {
    ">=": lambda c: c >= 0,
    ">": lambda c: c > 0,
    "<=": lambda c: c <= 0,
    "<": lambda c: c < 0,
    "==": lambda c: c == 0,
}

Problems = list[tuple[KeyPath, str]]


# -- comparing values -------------------------------------------------------------------------
def _scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: a boolean equals only a boolean, a number only a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _number(a) and _number(b):
        return bool(a == b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def version_key(value: object) -> tuple[int, ...] | None:
    """A version as numbers to compare part by part: ``"1.10"`` is (1, 10), above
    ``"1.2"``; ``"TLSv1.3"`` is (1, 3). None for anything that is not a version."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    match = _VERSION_VALUE.fullmatch(str(value))
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _compare_versions(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    width = max(len(a), len(b))
    left, right = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (left > right) - (left < right)


def _equals(expected: Any, value: Any) -> bool:
    return _same(value, expected)


def _one_of(allowed: tuple[Any, ...], value: Any) -> bool:
    items = value if isinstance(value, tuple | list) else (value,)
    return all(any(_same(item, a) for a in allowed) for item in items)


def _none_of(forbidden: tuple[Any, ...], value: Any) -> bool:
    items = value if isinstance(value, tuple | list) else (value,)
    return not any(_same(item, f) for item in items for f in forbidden)


def _min(bound: float, value: Any) -> bool:
    return _number(value) and bool(value >= bound)


def _max(bound: float, value: Any) -> bool:
    return _number(value) and bool(value <= bound)


def _version(op: str, wanted: tuple[int, ...], value: Any) -> bool:
    found = version_key(value)
    return found is not None and _COMPARE[op](_compare_versions(found, wanted))


def _contains(needed: tuple[Any, ...], value: Any) -> bool:
    if not isinstance(value, tuple | list):
        return False
    return all(any(_same(item, n) for item in value) for n in needed)


def _present(wanted: bool, value: Any) -> bool:
    return (value is not None) is wanted


@dataclass(frozen=True, slots=True)
class _Test:
    expect: str  # what the value must be, as a reader reads it: `>= 1.2`, `== true`
    ok: Callable[[Any], bool]


# -- conditions and checks --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Condition:
    """Settings (path patterns) and what each must be."""

    patterns: tuple[Pattern, ...]
    tests: tuple[_Test, ...]
    missing_ok: bool = False
    expected: str = field(init=False)  # what each setting must be: `version >= 1.2`

    def __post_init__(self) -> None:
        object.__setattr__(self, "expected", " and ".join(t.expect for t in self.tests))

    def describe(self) -> str:
        return f"{', '.join(p.text for p in self.patterns)} {self.expected}"

    def run(self, doc: Document) -> tuple[bool, list[Observation]]:
        """Whether it holds for every matched setting, and what was looked at."""
        expected = self.expected
        seen: list[Observation] = []
        for pattern in self.patterns:
            matches = doc.find(pattern)
            if not matches:
                seen.append(Observation(pattern.text, None, False, self.missing_ok, expected))
                continue
            for path, value in matches:
                ok = all(test.ok(value) for test in self.tests)
                key = path.rpartition(".")[2]
                seen.append(Observation(path, shown(value, key), True, ok, expected))
        return all(o.ok for o in seen), seen


@dataclass(frozen=True, slots=True)
class Check:
    """A rule's check: a requirement, applying only while `when` holds when given."""

    require: Condition
    when: Condition | None = None
    expected: str = field(init=False)  # the whole check in words

    def __post_init__(self) -> None:
        text = self.require.describe()
        if self.when is not None:
            text = f"when {self.when.describe()}: {text}"
        object.__setattr__(self, "expected", text)

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return (self.when.patterns if self.when else ()) + self.require.patterns

    def run(self, doc: Document) -> tuple[Status, tuple[Observation, ...]]:
        seen: list[Observation] = []
        if self.when is not None:
            holds, seen = self.when.run(doc)
            if not holds:
                return "n/a", tuple(seen)
        ok, required = self.require.run(doc)
        return ("pass" if ok else "fail"), tuple(seen + required)


# -- parsing ----------------------------------------------------------------------------------
def parse_check(spec: object, where: KeyPath, problems: Problems) -> Check | None:
    """A pack's `check:` block (at key path `where`), or None with `problems` added."""
    if not isinstance(spec, Mapping):
        problems.append((where, "must be a mapping: path: and operators, or when: and require:"))
        return None
    if "when" in spec or "require" in spec:
        extra = sorted(set(spec) - {"when", "require"})
        if extra:
            problems.append(
                ((*where, extra[0]), "a check with when: holds only when: and require:")
            )
            return None
        missing = [k for k in ("when", "require") if k not in spec]
        if missing:
            problems.append((where, "when: needs require:, and require: needs when:"))
            return None
        when = _condition(spec["when"], (*where, "when"), problems)
        require = _condition(spec["require"], (*where, "require"), problems)
        return Check(require, when) if when is not None and require is not None else None
    require = _condition(spec, where, problems)
    return Check(require) if require is not None else None


def _condition(spec: object, where: KeyPath, problems: Problems) -> Condition | None:
    if not isinstance(spec, Mapping):
        problems.append((where, "must be a mapping of path: and operators"))
        return None
    before = len(problems)
    for key in spec:
        if key not in _CONDITION_KEYS:
            known = ", ".join(OPERATORS)
            message = f"unknown operator (operators: {known}; and path, paths, missing)"
            problems.append(((*where, key), message))
    patterns = _patterns(spec, where, problems)
    tests: list[_Test] = []
    for name in OPERATORS:
        if name in spec:
            test = _test(name, spec[name], (*where, name), problems)
            if test is not None:
                tests.append(test)
    if not any(name in spec for name in OPERATORS):
        problems.append((where, f"give at least one operator: {', '.join(OPERATORS)}"))
    missing = spec.get("missing", "fail")
    if missing not in ("fail", "pass"):
        problems.append(((*where, "missing"), "must be fail or pass"))
    if len(problems) > before or not patterns:
        return None
    missing_ok = missing == "pass" or spec.get("present") is False
    return Condition(tuple(patterns), tuple(tests), missing_ok)


def _patterns(spec: Mapping[str, Any], where: KeyPath, problems: Problems) -> list[Pattern]:
    if ("path" in spec) == ("paths" in spec):
        problems.append((where, "give path: (one setting) or paths: (a list), not both"))
        return []
    if "path" in spec:
        texts: Sequence[object] = (spec["path"],)
        places: list[KeyPath] = [(*where, "path")]
    else:
        listed = spec["paths"]
        if not isinstance(listed, tuple) or not listed:
            problems.append(((*where, "paths"), "must be a non-empty list of dotted paths"))
            return []
        texts, places = listed, [(*where, "paths", i) for i in range(len(listed))]
    found = []
    for text, place in zip(texts, places, strict=True):
        problem = pattern_problem(text)
        if problem is not None:
            problems.append((place, problem))
        else:
            found.append(Pattern.parse(str(text)))
    return found


def _test(name: str, arg: object, where: KeyPath, problems: Problems) -> _Test | None:
    """One operator and its argument as a test, or None with a problem added."""

    def bad(message: str) -> _Test | None:
        problems.append((where, message))
        return None

    if name == "equals":
        if not _scalar(arg) and not (isinstance(arg, tuple) and all(map(_scalar, arg))):
            return bad("must be a plain value (string, number, true/false, null) or a list")
        return _Test(f"== {one_line(shown(arg))}", partial(_equals, arg))
    if name in ("one_of", "none_of", "contains"):
        items = arg if isinstance(arg, tuple) else (arg,) if name == "contains" else None
        if items is None or not items or not all(map(_scalar, items)):
            return bad("must be a non-empty list of plain values")
        listed = one_line(shown(items))
        if name == "one_of":
            return _Test(f"one of {listed}", partial(_one_of, items))
        if name == "none_of":
            return _Test(f"none of {listed}", partial(_none_of, items))
        return _Test(f"contains {listed}", partial(_contains, items))
    if name in ("min", "max"):
        if isinstance(arg, bool) or not isinstance(arg, int | float):
            return bad("must be a number")
        if name == "min":
            return _Test(f">= {arg}", partial(_min, arg))
        return _Test(f"<= {arg}", partial(_max, arg))
    if name == "version":
        match = _VERSION_SPEC.fullmatch(arg) if isinstance(arg, str) else None
        if match is None:
            return bad('must compare with a version, such as ">= 1.2" (>=, >, <=, <, ==)')
        op, text = match.groups()
        wanted = tuple(int(p) for p in text.split("."))
        return _Test(f"version {op} {text}", partial(_version, op, wanted))
    if name == "present":
        if not isinstance(arg, bool):
            return bad("must be true or false")
        return _Test("set" if arg else "not set", partial(_present, arg))
    raise AssertionError(name)  # pragma: no cover - OPERATORS lists every name above

"""Rule packs: the rules of each compliance regime, kept as data and loaded with checks.

A pack is a YAML file; the built-in ones are ``configbus/compliance/packs/*.yml``::

    regime: gdpr                          # the rules' regime, unless a rule names its own
    title: GDPR (EU General Data Protection Regulation)
    rules:
      - id: gdpr-log-anonymisation        # unique across every pack loaded
        title: Personal data in log lines is anonymised
        severity: high                    # critical | high | medium | low
        blocking: true                    # the publisher refuses a change that breaks it
        environments: [prod]              # where it applies (default: every environment)
        rationale: >-                     # what an auditor reads: the control it serves
          GDPR Art. 32(1)(a) ...
        check:                            # the vocabulary of configbus/compliance/checks.py
          path: logging.anonymisation.enabled
          equals: true

More packs, in the same format, come from directories (or single files) given as
``--packs`` or ``CONFIGBUS_COMPLIANCE_PACKS`` (several joined with ``os.pathsep``).
Every problem found is reported at once, each as one line naming the file, the line and
the key: an unknown field, a bad operator or value, a duplicate rule id. The built-in
packs are parsed once per process; other packs again only when their files change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Final, cast

from configbus.compliance.checks import Check, parse_check
from configbus.compliance.findings import SEVERITIES, Finding, Severity
from configbus.compliance.paths import Document
from configbus.errors import Problem, TreeError, UnknownNameError, display_path
from configbus.tree.values import Path as KeyPath
from configbus.tree.values import format_path
from configbus.tree.yamlfile import parse_yaml

__all__ = [
    "BASELINE",
    "BUILTIN_PACKS",
    "PACKS_VARIABLE",
    "Rule",
    "RuleSet",
    "default_packs",
    "known_regimes",
    "load_packs",
]

BASELINE: Final = "baseline"  # the regime every stream is held to
BUILTIN_PACKS: Final = Path(__file__).resolve().parent / "packs"
PACKS_VARIABLE: Final = "CONFIGBUS_COMPLIANCE_PACKS"
_PACK_KEYS: Final = frozenset({"regime", "title", "rules"})
_RULE_KEYS: Final = frozenset(
    {"id", "regime", "title", "severity", "blocking", "environments", "rationale", "check"}
)
_REQUIRED: Final = ("id", "title", "severity", "blocking", "rationale", "check")
_RULE_ID: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,78}[a-z0-9])?")
_REGIME: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ENV: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ENV_ALIASES: Final = {"development": "dev", "production": "prod"}  # as the tree has them

_Report = Callable[[KeyPath, str], None]  # adds a problem at a key path of the pack


@dataclass(frozen=True, slots=True)
class Rule:
    """One compliance rule, as a pack declares it."""

    id: str
    regime: str
    title: str
    severity: Severity
    blocking: bool
    environments: frozenset[str] | None  # None: every environment
    rationale: str
    check: Check
    source: str
    line: int

    def applies_to(self, env: str | None) -> bool:
        """Whether the rule holds in `env` (None: any environment, every rule)."""
        return env is None or self.environments is None or env in self.environments

    @property
    def where(self) -> str:
        """``environments: prod, staging`` as one word list, or ``all``."""
        return ", ".join(sorted(self.environments)) if self.environments else "all"

    def run(self, data: Document | Mapping[str, Any]) -> Finding:
        """The rule's finding on a config's data (or a `Document` of it, which keeps
        what it found for the next rule)."""
        status, seen = self.check.run(data if isinstance(data, Document) else Document(data))
        return Finding(
            self.id,
            self.regime,
            self.title,
            self.severity,
            self.blocking,
            status,
            self.check.expected,
            self.rationale,
            seen,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "regime": self.regime,
            "title": self.title,
            "severity": self.severity,
            "blocking": self.blocking,
            "environments": sorted(self.environments) if self.environments else None,
            "check": self.check.expected,
            "rationale": self.rationale,
            "source": f"{display_path(self.source)}:{self.line}",
        }


@dataclass(frozen=True)
class RuleSet:
    """The rules of the packs loaded, with the title of each regime."""

    rules: tuple[Rule, ...]
    titles: Mapping[str, str]  # regime -> its pack's title
    sources: tuple[str, ...] = ()
    # (env, regimes, blocking only) -> the rules that apply, in pack order
    _chosen: dict[tuple[str | None, tuple[str, ...], bool], tuple[Rule, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @cached_property
    def anchors(self) -> frozenset[str]:
        """The keys the rules' ``**.key`` patterns look for (see `Document`)."""
        return frozenset(
            anchor for rule in self.rules for p in rule.check.patterns for anchor in p.anchors
        )

    def regimes(self) -> tuple[str, ...]:
        """Every regime of the rules, and the baseline (which always is, rules or not):
        baseline first, then by name."""
        names = {rule.regime for rule in self.rules} | set(self.titles) | {BASELINE}
        return tuple(sorted(names, key=lambda name: (name != BASELINE, name)))

    def regimes_for(self, regimes: Iterable[str] | None) -> tuple[str, ...]:
        """`regimes` plus the baseline, in `regimes()` order; every regime for None.
        Raises `UnknownNameError` naming a regime no pack has."""
        known = self.regimes()
        if regimes is None:
            return known
        wanted = set(regimes) | {BASELINE}
        for name in sorted(wanted - set(known)):
            raise UnknownNameError(
                f"unknown compliance regime {name!r} (the packs have: {', '.join(known)})"
            )
        return tuple(name for name in known if name in wanted)

    def select(
        self, env: str | None, regimes: tuple[str, ...], *, blocking: bool = False
    ) -> tuple[Rule, ...]:
        """The rules of `regimes` that apply to `env` (only blocking ones if asked)."""
        key = (env, regimes, blocking)
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = tuple(
                rule
                for rule in self.rules
                if rule.regime in regimes
                and rule.applies_to(env)
                and (rule.blocking or not blocking)
            )
            if len(self._chosen) >= 1024:
                self._chosen.clear()
            self._chosen[key] = chosen
        return chosen

    def rule(self, rule_id: str) -> Rule:
        """The rule `rule_id`. Raises `UnknownNameError`."""
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise UnknownNameError(f"unknown compliance rule {rule_id!r}")


# -- loading ----------------------------------------------------------------------------------
def load_packs(*places: str | os.PathLike[str], builtin: bool = True) -> RuleSet:
    """The built-in packs (unless `builtin` is false) and those in `places`: directories
    of ``*.yml`` / ``*.yaml`` packs, or pack files. Raises `TreeError` listing every
    problem, each naming its file and line."""
    files = list(_builtin_files()) if builtin else []
    problems: list[Problem] = []
    for place in places:
        found = _pack_files(Path(place))
        if found is None:
            problems.append(Problem(str(place), None, None, "no such pack file or directory"))
        else:
            files += found
    rules: list[Rule] = []
    titles: dict[str, str] = {}
    for path in files:
        pack_rules, regime, title = _load_pack(str(path), problems)
        rules += pack_rules
        if regime is not None:
            titles.setdefault(regime, title or regime)
    problems += _duplicates(rules)
    if problems:
        raise TreeError(sorted(set(problems), key=Problem.sort_key))
    return RuleSet(tuple(rules), titles, tuple(str(p) for p in files))


def default_packs(places: str | os.PathLike[str] | Sequence[str] | None = None) -> RuleSet:
    """The built-in packs plus those in `places` (a directory or file, or several),
    else in ``CONFIGBUS_COMPLIANCE_PACKS`` (joined with ``os.pathsep``). Loaded once
    and kept while their files are unchanged."""
    if places is None:
        raw = os.environ.get(PACKS_VARIABLE, "")
        listed: tuple[str, ...] = tuple(p for p in raw.split(os.pathsep) if p)
    elif isinstance(places, str | os.PathLike):
        listed = (os.fspath(places),)
    else:
        listed = tuple(places)
    if not listed:
        return _builtin_set()
    stamp = tuple(_stamp(Path(place)) for place in listed)
    cached = _LOADED.get(listed)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    loaded = load_packs(*listed)
    if len(_LOADED) >= 64:
        _LOADED.clear()
    _LOADED[listed] = (stamp, loaded)
    return loaded


def known_regimes() -> tuple[str, ...]:
    """The regimes a tenant may declare (tenant.yml ``compliance:``): those of the
    built-in packs and of ``CONFIGBUS_COMPLIANCE_PACKS``."""
    return default_packs().regimes()


_Stamp = tuple[tuple[str, int, int], ...]
_LOADED: dict[tuple[str, ...], tuple[tuple[_Stamp | None, ...], RuleSet]] = {}


@cache
def _builtin_set() -> RuleSet:
    return load_packs()


@cache
def _builtin_files() -> tuple[Path, ...]:
    return tuple(_pack_files(BUILTIN_PACKS) or ())


def _pack_files(place: Path) -> list[Path] | None:
    if place.is_file():
        return [place]
    if not place.is_dir():
        return None
    return sorted(
        p for p in place.iterdir() if p.suffix in (".yml", ".yaml") and not p.name.startswith(".")
    )


def _stamp(place: Path) -> _Stamp | None:
    """What changes when a pack in `place` is edited, added or removed."""
    files = _pack_files(place)
    if files is None:
        return None
    stamps = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        stamps.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _load_pack(source: str, problems: list[Problem]) -> tuple[list[Rule], str | None, str | None]:
    """The rules of one pack file, its regime and title; problems added to `problems`."""
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(source, None, None, f"cannot read: {exc}"))
        return [], None, None
    try:
        parsed = parse_yaml(source, text)
    except TreeError as exc:
        problems += exc.problems
        return [], None, None
    data, lines = parsed.data, parsed.lines

    def problem(path: KeyPath, message: str) -> None:
        line = _line(lines, path)
        problems.append(Problem(source, line, format_path(path) or None, message))

    if parsed.extends is not None:
        problems.append(Problem(source, parsed.extends_line, "extends", _unknown(_PACK_KEYS)))
    if parsed.shares:
        problems.append(Problem(source, parsed.shares_line, "shared_secrets", _unknown(_PACK_KEYS)))
    for key in data:
        if key not in _PACK_KEYS:
            problem((key,), _unknown(_PACK_KEYS))
    regime = data.get("regime")
    if regime is not None and not (isinstance(regime, str) and _REGIME.fullmatch(regime)):
        problem(("regime",), "must be a regime name: lowercase letters, digits, - and _")
        regime = None
    title = data.get("title")
    if title is not None and not (isinstance(title, str) and title.strip()):
        problem(("title",), "must be a line of text")
        title = None
    listed = data.get("rules")
    if not isinstance(listed, tuple) or not listed:
        problem(("rules",), "must be a list of rules (id, title, severity, blocking, ...)")
        return [], regime, title
    rules = []
    for index, spec in enumerate(listed):
        rule = _rule(spec, ("rules", index), regime, source, lines, problem)
        if rule is not None:
            rules.append(rule)
    return rules, regime, title


def _rule(
    spec: object,
    where: KeyPath,
    regime: str | None,
    source: str,
    lines: Mapping[KeyPath, int],
    problem: _Report,
) -> Rule | None:
    if not isinstance(spec, Mapping):
        problem(where, "must be a mapping: id, title, severity, blocking, rationale, check")
        return None
    bad = False

    def fail(key: str, message: str) -> None:
        nonlocal bad
        bad = True
        problem((*where, key), message)

    for key in spec:
        if key not in _RULE_KEYS:
            fail(key, _unknown(_RULE_KEYS))
    for key in _REQUIRED:
        if key not in spec:
            bad = True
            problem(where, f"missing {key}: (a rule needs {', '.join(_REQUIRED)})")
    rule_id = spec.get("id")
    if "id" in spec and not (isinstance(rule_id, str) and _RULE_ID.fullmatch(rule_id)):
        fail("id", "must be lowercase letters, digits and '-', such as gdpr-log-anonymisation")
    own = spec.get("regime", regime)
    if own is None:
        bad = True
        problem(where, "missing regime: (give it here, or once at the top of the pack)")
    elif not (isinstance(own, str) and _REGIME.fullmatch(own)):
        fail("regime", "must be a regime name: lowercase letters, digits, - and _")
    severity = spec.get("severity")
    if "severity" in spec and severity not in SEVERITIES:
        fail("severity", f"must be one of {', '.join(SEVERITIES)}")
    if "blocking" in spec and not isinstance(spec["blocking"], bool):
        fail("blocking", "must be true or false")
    for key in ("title", "rationale"):
        if key in spec and not (isinstance(spec[key], str) and spec[key].strip()):
            fail(key, "must be text")
    good, environments = _environments(spec.get("environments"), (*where, "environments"), problem)
    check_problems: list[tuple[KeyPath, str]] = []
    check = None
    if "check" in spec:
        check = parse_check(spec["check"], (*where, "check"), check_problems)
    for path, message in check_problems:
        problem(path, message)
    if bad or not good or check is None:
        return None
    return Rule(
        id=str(rule_id),
        regime=str(own),
        title=" ".join(str(spec["title"]).split()),
        severity=cast(Severity, severity),
        blocking=bool(spec["blocking"]),
        environments=environments,
        rationale=" ".join(str(spec["rationale"]).split()),
        check=check,
        source=source,
        line=_line(lines, where),
    )


def _environments(
    value: object, where: KeyPath, problem: _Report
) -> tuple[bool, frozenset[str] | None]:
    """Whether a rule's `environments:` is well formed (else reported), and the names
    (None: every environment)."""
    if value is None:
        return True, None
    if not isinstance(value, tuple) or not value:
        problem(where, "must be a list of environments, such as [prod] or [staging, prod]")
        return False, None
    names = []
    for index, name in enumerate(value):
        if not (isinstance(name, str) and _ENV.fullmatch(name)):
            problem((*where, index), "must be an environment name, such as prod")
            return False, None
        names.append(_ENV_ALIASES.get(name, name))
    return True, frozenset(names)


def _duplicates(rules: Sequence[Rule]) -> list[Problem]:
    first: dict[str, Rule] = {}
    problems = []
    for rule in rules:
        seen = first.setdefault(rule.id, rule)
        if seen is not rule:
            problems.append(
                Problem(
                    rule.source,
                    rule.line,
                    "id",
                    f"duplicate rule id {rule.id!r} (first in "
                    f"{display_path(seen.source)}:{seen.line})",
                )
            )
    return problems


def _line(lines: Mapping[KeyPath, int], path: KeyPath) -> int:
    """The line of `path`, or of its nearest parent written in the file."""
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


def _unknown(allowed: frozenset[str]) -> str:
    return f"unknown field (allowed: {', '.join(sorted(allowed))})"

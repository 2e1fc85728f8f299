"""The environment tree on disk, and resolving its streams.

Layout (file names are the contract; see the README for the full rules)::

    <root>/schema.json                       JSON Schema of a resolved config (optional)
    <root>/<env>/<env>.yml                   an environment; may `extends:` a parent file
    <root>/<env>/overrides/<name>.yml        overrides a tenant may select for <env>
    <root>/tenants/<tenant>/tenant.yml       the tenant: its environments and overrides,
                                             and the compliance regimes it is held to
    <root>/tenants/<tenant>/<env>.yml        the tenant's own layer for <env>: optional,
                                             or required when tenant.yml says
                                             `layer: true` for <env>
    <root>/migrations/                       versioned migrations of the tree's keys
                                             (configbus.tree.migrate): not layers

A stream is a (tenant, environment) pair. Its layers, lowest first: the environment
file's `extends:` ancestors, the environment file, the selected overrides in order,
the tenant's layer, then any run-time layers the caller adds (tenant store, emergency
overrides). Parsed files are cached and re-read only when their stat changes.

A tenant layer declared with `layer: true` that is missing or empty is a problem of
its stream, not a layer silently dropped: a file deleted and restored, or truncated
and rewritten, must never publish the stream without the tenant's values.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import Any, Final

from configbus.errors import Problem, SchemaError, SettingsError, TreeError, UnknownNameError
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.merge import MergeCache
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.schema import SchemaValidator
from configbus.tree.sealed import SECRETS_DIR, parse_records
from configbus.tree.values import Path as KeyPath
from configbus.tree.values import SecretRef, Value, attach_sealed, secret_name_problem
from configbus.tree.yamlfile import ParsedFile, parse_yaml

__all__ = ["ENV_ALIASES", "TENANT_ID", "CheckReport", "EnvironmentTree", "TenantSpec"]

TENANTS_DIR: Final = "tenants"
MIGRATIONS_DIR: Final = "migrations"  # versioned migrations (configbus.tree.migrate): no layers
TENANT_FILE: Final = "tenant.yml"
SCHEMA_FILE: Final = "schema.json"
TENANT_ID: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
ENV_ALIASES: Final = {"development": "dev", "production": "prod"}
_TENANT_KEYS: Final = frozenset({"tenant", "name", "environments", "compliance"})
_NO_SCHEMA: Final = SchemaValidator({}, SCHEMA_FILE)  # accepts any config


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """A tenant as `tenants/<id>/tenant.yml` declares it."""

    id: str
    name: str
    environments: Mapping[str, tuple[str, ...]]  # environment -> selected overrides
    source: str
    layers: frozenset[str] = frozenset()  # environments whose tenant layer is required
    # environment -> how every change of the stream is rolled out (a staged rollout's
    # plan, `configbus.ops.rollouts.Plan`); environments without one publish at once
    rollouts: Mapping[str, Any] = field(default_factory=dict)
    # the compliance regimes the tenant is held to (`compliance: [gdpr, soc2]`), besides
    # the baseline every stream is; see configbus/compliance/
    compliance: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `EnvironmentTree.check` looked at and found."""

    streams: int
    files: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


_Signature = tuple[int, int, int, int]
_Attached = tuple["Mapping[str, Value]", dict[str, tuple[str, ...]], "Mapping[str, Value]"]


def _out_of_scope(config: ResolvedConfig) -> list[Problem]:
    """References in a tenant's own layers (its file, its store) to secrets that are not
    the tenant's (``tenants/<tenant>/...``) and that the environment does not share
    (``shared_secrets:``): a tenant layer must not point a service at another secret,
    say the environment's database password beside an address of its choosing."""
    tenant = config.tenant
    if tenant is None:
        return []
    own = f"tenants/{tenant}/"
    shared = {n for layer in config.layers for n in layer.shares}
    problems = []
    for layer in config.layers:
        if layer.kind not in (LayerKind.TENANT, LayerKind.STORE):
            continue
        for path, name in _references(layer.data, ()):
            if bad := secret_name_problem(name):  # a store's `$secret`, say, with `..`
                line, key = layer.lines.get(path), ".".join(map(str, path))
                problems.append(Problem(layer.source, line, key, f"secret {bad}"))
            elif not name.startswith(own) and name not in shared:
                problems.append(
                    Problem(
                        layer.source,
                        layer.lines.get(path),
                        ".".join(map(str, path)),
                        f"secret {name!r} is not tenant {tenant}'s ({own}...) and "
                        f"{config.env} does not share it (shared_secrets: in its file)",
                    )
                )
    return problems


def _references(value: object, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    if isinstance(value, SecretRef):
        yield path, value.name
    elif isinstance(value, Mapping):
        for key, child in value.items():
            yield from _references(child, (*path, key))
    elif isinstance(value, tuple):
        for index, child in enumerate(value):
            yield from _references(child, (*path, index))


class _Files:
    """Parsed files (or their problems) keyed by path, re-read when the stat changes."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[_Signature, ParsedFile | TreeError]] = {}
        self._lock = Lock()

    def get(self, path: str) -> ParsedFile:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise TreeError([Problem(path, None, None, "file not found")]) from None
        except OSError as exc:
            raise TreeError([Problem(path, None, None, f"cannot read: {exc.strerror}")]) from None
        signature = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        cached = self._entries.get(path)
        if cached is None or cached[0] != signature:
            cached = (signature, self._parse(path))
            with self._lock:
                self._entries[path] = cached
        result = cached[1]
        if isinstance(result, TreeError):
            raise result
        return result

    @staticmethod
    def _parse(path: str) -> ParsedFile | TreeError:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError as exc:
            return TreeError([Problem(path, None, None, f"not UTF-8 text: {exc.reason}")])
        except OSError as exc:
            return TreeError([Problem(path, None, None, f"cannot read: {exc.strerror}")])
        try:
            return parse_yaml(path, text)
        except TreeError as exc:
            return exc


class _Listings:
    """Directory listings, re-read when the directory's mtime changes."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, frozenset[str]]] = {}

    def names(self, directory: str) -> frozenset[str]:
        try:
            mtime = os.stat(directory).st_mtime_ns
        except OSError:
            return frozenset()
        cached = self._entries.get(directory)
        if cached is None or cached[0] != mtime:
            try:
                names = frozenset(os.listdir(directory))
            except OSError:
                names = frozenset()
            cached = (mtime, names)
            self._entries[directory] = cached
        return cached[1]


class EnvironmentTree:
    """An environment tree rooted at `root`: discovery, resolution, validation."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._root = str(self.root)
        self._tenants_dir = os.path.join(self._root, TENANTS_DIR)
        if not self.root.is_dir():
            raise TreeError([Problem(str(self.root), None, None, "not a directory")])
        self._files = _Files()
        self._listings = _Listings()
        self._layers: dict[tuple[str, LayerKind, str], tuple[ParsedFile, Layer]] = {}
        # id(merged data) -> (that data, the sealed texts, the data with them attached)
        self._sealed_cache: dict[
            int, tuple[Mapping[str, Value], dict[str, tuple[str, ...]], Mapping[str, Value]]
        ] = {}
        self._merges = MergeCache()
        self._tenants: dict[str, tuple[ParsedFile, TenantSpec]] = {}
        self._schema: tuple[_Signature, SchemaValidator] | None = None

    def __repr__(self) -> str:
        return f"EnvironmentTree({str(self.root)!r})"

    # -- discovery ------------------------------------------------------------------
    def environments(self) -> list[str]:
        """Names of the environments: folders `<env>` holding `<env>/<env>.yml`."""
        found = []
        for name in self._listings.names(self._root):
            if name.startswith((".", "_")) or name in (TENANTS_DIR, MIGRATIONS_DIR):
                continue
            if f"{name}.yml" in self._listings.names(os.path.join(self._root, name)):
                found.append(name)
        return sorted(found)

    def environment(self, name: str) -> str:
        """The canonical name of environment `name`, accepting the usual aliases."""
        wanted = name.strip().lower()
        if self._is_environment(wanted):  # the usual case, without listing every folder
            return wanted
        known = self.environments()
        wanted = wanted if wanted in known else ENV_ALIASES.get(wanted, wanted)
        if wanted not in known:
            raise UnknownNameError(
                f"unknown environment {name!r} (the tree has: {', '.join(known) or 'none'})"
            )
        return wanted

    def _is_environment(self, name: str) -> bool:
        """Whether `name` is in `environments()`, looking at its own folder only."""
        return (
            not name.startswith((".", "_"))
            and name not in (TENANTS_DIR, MIGRATIONS_DIR)
            and name in self._listings.names(self._root)
            and f"{name}.yml" in self._listings.names(os.path.join(self._root, name))
        )

    def overrides(self, env: str) -> list[str]:
        """Names of the overrides available to `env`."""
        names = self._listings.names(os.path.join(self._root, env, "overrides"))
        return sorted(n[:-4] for n in names if n.endswith(".yml") and not n.startswith("."))

    def tenants(self) -> list[str]:
        """Ids of the tenants: folders under `tenants/` holding `tenant.yml`."""
        base = self.root / TENANTS_DIR
        return sorted(
            name
            for name in self._listings.names(str(base))
            if TENANT_FILE in self._listings.names(str(base / name))
        )

    def tenant(self, tenant_id: str) -> TenantSpec:
        """The tenant's declaration. Raises `UnknownNameError` or `TreeError`."""
        folder = os.path.join(self._tenants_dir, tenant_id)
        if "/" in tenant_id or TENANT_FILE not in self._listings.names(folder):
            raise UnknownNameError(
                f"unknown tenant {tenant_id!r} "
                f"(the tree has: {', '.join(self.tenants()) or 'none'})"
            )
        source = os.path.join(folder, TENANT_FILE)
        parsed = self._files.get(source)
        cached = self._tenants.get(tenant_id)
        if cached is not None and cached[0] is parsed:
            return cached[1]  # overrides that vanished since are caught by `layers`
        spec = self._tenant_spec(tenant_id, source, parsed)
        self._tenants[tenant_id] = (parsed, spec)
        return spec

    def streams(self) -> Iterator[tuple[str, str]]:
        """Every declared (tenant, environment) stream. Skips tenants that fail to load."""
        for tenant_id in self.tenants():
            try:
                spec = self.tenant(tenant_id)
            except TreeError:
                continue
            for env in spec.environments:
                yield tenant_id, env

    # -- resolution -----------------------------------------------------------------
    def layers(
        self,
        env: str,
        tenant: str | None = None,
        overrides: Sequence[str] | None = None,
    ) -> list[Layer]:
        """The file layers of a stream, lowest first.

        `overrides=None` takes the tenant's declared overrides for `env` (none without
        a tenant); a list replaces them."""
        env = self.environment(env)
        selected: Sequence[str] = ()
        spec = None
        if tenant is not None:
            spec = self.tenant(tenant)
            if env not in spec.environments:
                raise UnknownNameError(
                    f"tenant {tenant!r} does not run in environment {env!r} "
                    f"(it declares: {', '.join(spec.environments) or 'none'})"
                )
            selected = spec.environments[env]
        if overrides is not None:
            selected = overrides
        available = self.overrides(env)
        unknown = [name for name in selected if name not in available]
        if unknown:
            raise UnknownNameError(
                f"unknown override {unknown[0]!r} for environment {env!r} "
                f"(it has: {', '.join(available) or 'none'})"
            )
        env_dir = os.path.join(self._root, env)
        stack = self._file_layers(os.path.join(env_dir, f"{env}.yml"), LayerKind.ENVIRONMENT, env)
        for name in selected:
            path = os.path.join(env_dir, "overrides", f"{name}.yml")
            stack += self._file_layers(path, LayerKind.OVERRIDE, name)
        if spec is not None:
            stack += self._tenant_layer(spec, env)
            stack += self._secrets_layer(spec, env)
        return stack

    def _tenant_layer(self, spec: TenantSpec, env: str) -> list[Layer]:
        """The tenant's own layer for `env`: none when it has no file, unless tenant.yml
        declares it (`layer: true`); then a missing or empty file is a problem."""
        tenant = spec.id
        tenant_dir = os.path.join(self._tenants_dir, tenant)
        path = os.path.join(tenant_dir, f"{env}.yml")
        required = env in spec.layers
        if f"{env}.yml" not in self._listings.names(tenant_dir) or not os.path.isfile(path):
            if required:
                message = "missing: tenant.yml declares this layer (layer: true)"
                raise TreeError([Problem(path, None, None, message)])
            return []
        layers = self._file_layers(path, LayerKind.TENANT, tenant)
        if required and not layers[-1].data:
            message = "empty: tenant.yml declares this layer (layer: true), so it must set values"
            raise TreeError([Problem(path, None, None, message)])
        return layers

    def _secrets_layer(self, spec: TenantSpec, env: str) -> list[Layer]:
        """The tenant's sealed secrets for `env` (``secrets/<env>.yml``), if any."""
        directory = os.path.join(self._tenants_dir, spec.id, SECRETS_DIR)
        path = os.path.join(directory, f"{env}.yml")
        if f"{env}.yml" not in self._listings.names(directory):
            return []
        parsed = self._files.get(path)
        key = (path, LayerKind.SECRETS, spec.id)
        cached = self._layers.get(key)
        if cached is not None and cached[0] is parsed:
            return [cached[1]]
        records = parse_records(parsed.data, path, parsed.lines)
        sealed = {name: record.versions for name, record in records.items()}
        layer = Layer(LayerKind.SECRETS, spec.id, path, sealed=sealed)
        self._layers[key] = (parsed, layer)
        return [layer]

    def resolve(
        self,
        env: str,
        tenant: str | None = None,
        overrides: Sequence[str] | None = None,
        runtime: Iterable[Layer] = (),
    ) -> ResolvedConfig:
        """The stream's effective config, not yet validated (see `validate`).

        `runtime` layers (tenant store, emergency overrides) go on top, in order."""
        stack = self.layers(env, tenant, overrides)
        stack += runtime
        names = tuple(layer.name for layer in stack if layer.kind is LayerKind.OVERRIDE)
        env = next(layer.name for layer in stack if layer.kind is LayerKind.ENVIRONMENT)
        data = self._merges.merge(stack)
        sealed = {name: texts for layer in stack for name, texts in layer.sealed.items()}
        if sealed:
            data = self._attached(data, sealed)
        config = ResolvedConfig(data, stack, env=env, tenant=tenant, overrides=names)
        if not sealed and b'"$sealed"' in config.canonical_json:  # written by hand: dropped
            config = ResolvedConfig(
                attach_sealed(data, {}), stack, env=env, tenant=tenant, overrides=names
            )
        return config

    def _attached(
        self, data: Mapping[str, Value], sealed: dict[str, tuple[str, ...]]
    ) -> Mapping[str, Value]:
        """`attach_sealed`, kept while the merged data and the sealed texts are the same
        (the merge cache hands out the same data object while the layers are)."""
        kept = self._sealed_cache.get(id(data))
        if kept is not None and kept[0] is data and kept[1] == sealed:
            return kept[2]
        attached: Mapping[str, Value] = attach_sealed(data, sealed)
        if len(self._sealed_cache) >= 4096:
            self._sealed_cache.clear()
        self._sealed_cache[id(data)] = (data, sealed, attached)
        return attached

    def problems(self, config: ResolvedConfig) -> list[Problem]:
        """Every schema violation, plain-text secret and secret reference out of its
        tenant's scope in `config`."""
        validator = self.schema() or _NO_SCHEMA  # no schema: the plain-secret rule still holds
        found = validator.problems(config)
        scope = _out_of_scope(config)
        return sorted(set(found + scope), key=Problem.sort_key) if scope else found

    def validate(self, config: ResolvedConfig) -> ResolvedConfig:
        """`config` itself when valid; otherwise raises `SchemaError` with every problem."""
        found = self.problems(config)
        if found:
            raise SchemaError(found)
        return config

    def schema(self) -> SchemaValidator | None:
        """The tree's schema (`schema.json`), re-read when it changes; None without one."""
        path = self.root / SCHEMA_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TreeError([Problem(str(path), None, None, f"cannot read: {exc}")]) from None
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        if self._schema is None or self._schema[0] != stamp:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TreeError([Problem(str(path), None, None, f"cannot read: {exc}")]) from None
            self._schema = (stamp, SchemaValidator.from_text(text, str(path)))
        return self._schema[1]

    # -- the whole tree -------------------------------------------------------------
    def check(self) -> CheckReport:
        """Parse every file, resolve and validate every environment alone, with each of
        its overrides, and every tenant's declared streams. Reports every problem."""
        problems: list[Problem] = []
        files = 0
        for path in sorted(self.root.rglob("*.yml")):
            if path.relative_to(self.root).parts[0] == MIGRATIONS_DIR:
                continue  # migration files and their record are not layers
            files += 1
            try:
                self._files.get(str(path))
            except TreeError as exc:
                problems += exc.problems
        try:
            self.schema()
        except TreeError as exc:
            return CheckReport(
                0, files, sorted(set(problems + list(exc.problems)), key=Problem.sort_key)
            )

        combos: list[tuple[str, str | None, Sequence[str] | None]] = []
        for env in self.environments():
            combos.append((env, None, ()))
            combos += [(env, None, (name,)) for name in self.overrides(env)]
        for tenant_id in self.tenants():
            try:
                spec = self.tenant(tenant_id)
            except TreeError as exc:
                problems += exc.problems
                continue
            combos += [(env, tenant_id, None) for env in spec.environments]
            problems += self._stray_tenant_layers(spec)
        for env, tenant, overrides in combos:
            try:
                problems += self.problems(self.resolve(env, tenant, overrides))
            except TreeError as exc:
                problems += exc.problems
        return CheckReport(len(combos), files, sorted(set(problems), key=Problem.sort_key))

    # -- internals ------------------------------------------------------------------
    def _file_layers(self, path: str, kind: LayerKind, name: str) -> list[Layer]:
        """The layer of `path`, preceded by its `extends:` ancestors (kind BASE)."""
        chain: list[tuple[str, ParsedFile]] = []
        current = os.path.normpath(path)
        while True:
            if any(seen == current for seen, _ in chain):
                cycle = (
                    " -> ".join(self._short(p) for p, _ in chain) + f" -> {self._short(current)}"
                )
                last, parsed = chain[-1]
                raise TreeError([Problem(last, parsed.extends_line, "extends", f"cycle: {cycle}")])
            parsed = self._files.get(current)
            chain.append((current, parsed))
            if parsed.extends is None:
                break
            parent = os.path.normpath(os.path.join(os.path.dirname(current), parsed.extends))
            if not os.path.isfile(parent):
                raise TreeError(
                    [
                        Problem(
                            current,
                            parsed.extends_line,
                            "extends",
                            f"parent file {parsed.extends!r} not found",
                        )
                    ]
                )
            current = parent
        layers = []
        for depth, (source, parsed) in enumerate(reversed(chain)):
            own = depth == len(chain) - 1
            layer_kind, layer_name = (kind, name) if own else (LayerKind.BASE, None)
            layers.append(self._layer(source, parsed, layer_kind, layer_name))
        return layers

    def _layer(self, source: str, parsed: ParsedFile, kind: LayerKind, name: str | None) -> Layer:
        """The layer of a parsed file, the same object while the file is unchanged (so
        merge caches keyed by layers hit). A BASE layer is named by its path."""
        key = (source, kind, name or "")
        cached = self._layers.get(key)
        if cached is not None and cached[0] is parsed:
            return cached[1]
        if parsed.shares and kind not in (LayerKind.ENVIRONMENT, LayerKind.BASE):
            raise TreeError(
                [
                    Problem(
                        source,
                        parsed.shares_line,
                        "shared_secrets",
                        "only an environment's files may share secrets with its tenants",
                    )
                ]
            )
        layer = Layer(
            kind,
            name or self._short(source),
            source,
            parsed.data,
            parsed.lines,
            shares=parsed.shares,
            shares_line=parsed.shares_line,
        )
        self._layers[key] = (parsed, layer)
        return layer

    def _short(self, path: str) -> str:
        try:
            return os.path.relpath(path, self.root)
        except ValueError:
            return path

    def _tenant_spec(self, tenant_id: str, source: str, parsed: ParsedFile) -> TenantSpec:
        data, lines = parsed.data, parsed.lines
        problems: list[Problem] = []

        def problem(path: KeyPath, message: str) -> None:
            line = lines.get(path, 1)
            problems.append(Problem(source, line, ".".join(map(str, path)) or None, message))

        if not TENANT_ID.fullmatch(tenant_id):
            problem((), f"tenant id {tenant_id!r} must be lowercase letters, digits and '-'")
        for key in data:
            if key not in _TENANT_KEYS:
                problem((key,), f"unknown key (allowed: {', '.join(sorted(_TENANT_KEYS))})")
        if data.get("tenant") != tenant_id:
            problem(("tenant",), f"must be {tenant_id!r}, the name of the tenant's folder")
        name = data.get("name", tenant_id)
        if not isinstance(name, str):
            problem(("name",), "must be a string")
        envs = data.get("environments")
        declared: dict[str, tuple[str, ...]] = {}
        required: set[str] = set()
        plans: dict[str, Any] = {}
        if not isinstance(envs, Mapping) or not envs:
            problem(
                ("environments",), "must map each environment the tenant runs in to its overrides"
            )
            envs = {}
        known = self.environments()
        for env, spec in envs.items():
            where: KeyPath = ("environments", env)
            if env not in known:
                problem(where, f"unknown environment (the tree has: {', '.join(known)})")
                continue
            selected = spec.get("overrides", ()) if isinstance(spec, Mapping) else None
            if not isinstance(spec, Mapping) or set(spec) - {"overrides", "layer", "rollout"}:
                problem(
                    where,
                    "must be a mapping of overrides: [names], layer: true|false and rollout: "
                    "{strategy, steps, bake, select, step_timeout}",
                )
                continue
            if "rollout" in spec:
                plan = _rollout_plan(spec["rollout"])
                if isinstance(plan, str):
                    problem((*where, "rollout"), plan)
                    continue
                plans[env] = plan
            if not isinstance(spec.get("layer", False), bool):
                problem((*where, "layer"), "must be true or false")
                continue
            if spec.get("layer", False):
                required.add(env)
            if not isinstance(selected, tuple) or not all(isinstance(s, str) for s in selected):
                problem((*where, "overrides"), "must be a list of override names")
                continue
            available = self.overrides(env)
            for index, override in enumerate(selected):
                if override not in available:
                    problem(
                        (*where, "overrides", index),
                        f"unknown override {override!r} "
                        f"(available: {', '.join(available) or 'none'})",
                    )
            declared[env] = tuple(str(s) for s in selected)
        regimes = data.get("compliance", ())
        for where, message in _regime_problems(regimes):
            problem(("compliance", *where), message)
        if problems:
            raise TreeError(problems)
        return TenantSpec(
            tenant_id,
            str(name),
            declared,
            source,
            frozenset(required),
            plans,
            tuple(str(r) for r in regimes) if isinstance(regimes, tuple) else (),
        )

    def _stray_tenant_layers(self, spec: TenantSpec) -> list[Problem]:
        tenant_dir = self.root / TENANTS_DIR / spec.id
        strays = []
        for name in sorted(self._listings.names(str(tenant_dir))):
            if name.endswith(".yml") and name != TENANT_FILE and name[:-4] not in spec.environments:
                strays.append(
                    Problem(
                        str(tenant_dir / name),
                        None,
                        None,
                        f"tenant {spec.id!r} does not declare environment {name[:-4]!r}, "
                        "so this layer is never used",
                    )
                )
        return strays


def _regime_problems(regimes: object) -> list[tuple[KeyPath, str]]:
    """What is wrong with a tenant.yml `compliance:` list of regimes, by position."""
    from configbus.compliance.packs import known_regimes  # above the tree; only its names

    if not isinstance(regimes, tuple) or not all(isinstance(r, str) for r in regimes):
        return [((), "must be a list of compliance regimes, such as [gdpr, soc2]")]
    if not regimes:
        return []
    try:
        known = known_regimes()
    except TreeError as exc:  # a broken pack in CONFIGBUS_COMPLIANCE_PACKS
        return [((), f"cannot tell the regimes: {exc.problems[0]}")]
    found: list[tuple[KeyPath, str]] = []
    for index, name in enumerate(regimes):
        if name not in known:
            found.append(((index,), f"unknown regime {name!r} (known: {', '.join(known)})"))
        elif name in regimes[:index]:
            found.append(((index,), f"regime {name!r} is listed twice"))
    return found


_ROLLOUT_KEYS: Final = frozenset({"strategy", "steps", "bake", "select", "step_timeout"})


def _rollout_plan(spec: object) -> Any:
    """A tenant.yml `rollout:` block as a `Plan`, or what is wrong with it."""
    from configbus.ops.rollouts import Plan  # above the tree; only its parsing is used

    if not isinstance(spec, Mapping):
        return "must be a mapping: strategy, steps, bake, select, step_timeout"
    unknown = sorted(set(spec) - _ROLLOUT_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_ROLLOUT_KEYS))})"
    select = spec.get("select")
    if select is not None and not isinstance(select, Mapping):
        return "select: a mapping of label: value"
    steps = spec.get("steps")
    if steps is not None and not isinstance(steps, str | tuple | list):
        return "steps: a list such as [1, 10%, 50%, 100%]"
    try:
        return Plan.build(
            spec.get("strategy"), steps, spec.get("bake"), select, spec.get("step_timeout")
        )
    except SettingsError as exc:
        return str(exc)

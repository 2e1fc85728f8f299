"""Validation of resolved configs: the tree's JSON Schema plus the plain-secret rule.

Every problem points at the file and line that set the offending value (found through
the config's provenance), and no message ever repeats a value held under a key whose
name says it is secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from configbus.errors import Problem, TreeError
from configbus.tree.layer import LayerKind
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.values import Path, Value, format_path, looks_secret

__all__ = ["SchemaValidator", "plain_secret_paths"]

_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


class SchemaValidator:
    """A compiled JSON Schema (draft 2020-12) that reports `Problem`s."""

    def __init__(self, schema: dict[str, Any], source: str) -> None:
        self.source = source
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = format_path(tuple(exc.absolute_path)) or None
            raise TreeError(
                [Problem(source, None, where, f"not a valid JSON Schema: {exc.message}")]
            ) from None
        self._validator = cls(schema)

    @classmethod
    def from_text(cls, text: str, source: str) -> SchemaValidator:
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TreeError(
                [Problem(source, exc.lineno, None, f"invalid JSON: {exc.msg}")]
            ) from None
        if not isinstance(schema, dict):
            raise TreeError([Problem(source, 1, None, "a JSON Schema must be an object")])
        return cls(schema, source)

    def problems(self, config: ResolvedConfig) -> list[Problem]:
        """Every way `config` breaks the schema or holds a plain-text secret."""
        found: list[Problem] = []
        plain = set(plain_secret_paths(config.data))
        for path in sorted(plain, key=format_path):
            found.append(
                _problem(
                    config,
                    path,
                    "plain-text value under a secret key; write a reference: !secret NAME",
                )
            )
        for error in self._validator.iter_errors(config.to_dict()):
            path = tuple(error.absolute_path)
            if any(path[: len(p)] == p for p in plain):
                continue  # already reported, more clearly, as a plain secret
            found.extend(_explain(config, error, path))
        return sorted(set(found), key=Problem.sort_key)


def plain_secret_paths(value: Value, path: Path = ()) -> Iterator[Path]:
    """Paths of non-empty plain strings held under keys that name a secret."""
    if isinstance(value, Mapping):
        for key, child in value.items():
            if isinstance(child, str) and child and looks_secret(key):
                yield (*path, key)
            else:
                yield from plain_secret_paths(child, (*path, key))
    elif isinstance(value, tuple):
        for index, child in enumerate(value):
            yield from plain_secret_paths(child, (*path, index))


def _explain(config: ResolvedConfig, error: ValidationError, path: Path) -> Iterator[Problem]:
    instance = error.instance
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        patterns = (
            error.schema.get("patternProperties", {}) if isinstance(error.schema, dict) else {}
        )
        for key in instance:
            if key not in allowed and not any(re.search(p, key) for p in patterns):
                yield _problem(config, (*path, key), "unknown key (the schema does not allow it)")
        return
    if error.validator == "required" and isinstance(instance, dict):
        required = error.validator_value if isinstance(error.validator_value, list) else []
        for key in required:
            if key not in instance:
                yield _problem(config, path, f"missing required key {key!r}")
        return
    secret = any(looks_secret(part) for part in path)
    if error.validator == "type":
        got = _JSON_TYPES.get(type(instance), type(instance).__name__)
        yield _problem(config, path, f"expected {_or(error.validator_value)}, got {got}")
    elif error.validator == "enum" and not secret:
        yield _problem(config, path, f"{instance!r} is not one of {_or(error.validator_value)}")
    elif secret:
        yield _problem(config, path, f"breaks the schema rule {error.validator!r}")
    else:
        yield _problem(config, path, error.message)


def _or(values: Any) -> str:
    if isinstance(values, list):
        return ", ".join(repr(v) if not isinstance(v, str) else v for v in values)
    return str(values)


def _problem(config: ResolvedConfig, path: Path, message: str) -> Problem:
    origin = config.origin(path) if path else None
    key = format_path(path) or None
    if origin is not None:
        return Problem(origin.layer.source, origin.line, key, message)
    # The root, or a key no layer set: point at the stream's environment file.
    for layer in config.layers:
        if layer.kind is LayerKind.ENVIRONMENT:
            return Problem(layer.source, 1, key, message)
    return Problem(config.layers[-1].source if config.layers else "", None, key, message)

"""Loading a config: YAML files, ``--set`` overrides, validation errors worth reading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xlearner.config.pipeline import PipelineConfig
from xlearner.store import open_store


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set squeeze.method=prune")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError) as err:
        problem = (
            str(err).splitlines()[0] if isinstance(err, yaml.YAMLError) else "nested too deeply"
        )
        raise ConfigError(
            f"--set {key.strip()}: the value {raw!r} is not valid YAML ({problem}); "
            "quote a string value, close every [ and {"
        ) from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            where = ".".join(path[:i]) or "the config"
            if isinstance(node, list):
                index = _list_index(node, part, key, where)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(
                    f"--set {key}: {where} is {node!r}, not a section or a list, "
                    f"so it has no field {part!r}; set {where} itself"
                )
    return data


def _list_index(node: list, part: str, key: str, where: str) -> int:
    """List items are addressed by index or by their ``name`` (``sources.shapes.val_fraction``)."""
    if part.isdigit():
        if int(part) >= len(node):
            raise ConfigError(
                f"--set {key}: {where} has {len(node)} item(s), so no item {part}; "
                f"use an index 0..{len(node) - 1} or an item's name"
            )
        return int(part)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item["name"] for item in node if isinstance(item, dict) and "name" in item]
    raise ConfigError(f"--set {key}: no item of {where} is named {part!r}; names: {names}")


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], origin: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def load_config(source: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML (or JSON) config from a local file or a store URI (the flow publishes
    the config its stages read in the store), apply ``key=value`` overrides, validate it."""
    text = _config_text(str(source))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {source} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {source} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {source}: top level must be a mapping, got {type(data).__name__}"
        )
    data = apply_overrides(data, overrides or [])
    return validate_config(data, origin=str(source))


def _config_text(source: str) -> str:
    if "://" in source:
        parent, _, name = source.rpartition("/")
        return open_store(parent).read_bytes(name).decode()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return path.read_text()

"""Loading settings and checking them: a file or a DEDUP_* variable that names no setting is
refused with the closest valid name; errors and dumps never show a secret."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from sidecar.config.settings import CONFIG_FILE, Settings
from sidecar.errors import ConfigError


def load(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings: defaults < ``config_file`` (or $DEDUP_CONFIG) < environment < ``overrides``.

    ``overrides`` are nested dicts per section, as flags produce them: ``kafka={"topics": [...]}``.
    """
    raw = config_file or os.environ.get("DEDUP_CONFIG")
    path = Path(raw) if raw else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist (flag --config or DEDUP_CONFIG)")
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for dotted, hint in unknown_settings(data):
            raise ConfigError(f"unknown setting {dotted!r} in {path}{hint}")
    check_environment(os.environ)
    token = CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    finally:
        CONFIG_FILE.reset(token)


#: DEDUP_* variables that are not settings: the file's name, test-only fault hooks, and the
#: local services' download cache (deploy/local/services).
_OTHER_VARIABLES = ("DEDUP_CONFIG", "DEDUP_TESTONLY_", "DEDUP_CACHE_DIR")


def _fields(model: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """A model's setting names; for a section, its model (its keys are settings too)."""
    out: dict[str, type[BaseModel] | None] = {}
    for name, f in model.model_fields.items():
        kind = f.annotation
        out[name] = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return out


def _hint(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return (
        f"; did you mean {prefix + close[0]!r}?" if close else f"; valid here: {', '.join(sorted(choices))}"
    )


def unknown_settings(
    data: dict[str, Any], model: type[BaseModel] = Settings, where: str = ""
) -> list[tuple[str, str]]:
    """Keys of a settings file (as nested dicts) that name no setting: (dotted name, hint)."""
    found: list[tuple[str, str]] = []
    fields = _fields(model)
    for key, value in data.items():
        dotted = where + key
        if key not in fields:
            found.append((dotted, _hint(key, list(fields), where)))
        elif fields[key] is not None and isinstance(value, dict):
            found += unknown_settings(value, fields[key] or Settings, dotted + ".")
    return found


#: librdkafka properties whose values are secrets (kafka.consumer / kafka.producer pass-through).
_SECRET_PROPERTY = re.compile(r"password|secret|key\.pem|oauthbearer\.config|jaas", re.IGNORECASE)
REDACTED = "**********"


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready data with every secret masked: SecretStr fields (pydantic masks
    them) and the secret librdkafka properties of the pass-through sections."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for kind in ("consumer", "producer"):
        section = data["kafka"][kind]
        for name in section:
            if _SECRET_PROPERTY.search(name):
                section[name] = REDACTED
    return data


def describe_errors(exc: ValidationError) -> str:
    """A ValidationError as one line per setting, without the values given: a value may be a
    secret, and the setting's name and the rule are what a person needs."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in err["loc"]) or "settings"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse a DEDUP_* variable that names no setting, with the closest valid name."""
    top = _fields(Settings)
    for var in sorted(environ):
        if not var.startswith("DEDUP_") or var.startswith(_OTHER_VARIABLES):
            continue
        parts = var[len("DEDUP_") :].lower().split("__")
        section = top.get(parts[0], ...)
        if section is ... or (section is None and len(parts) > 1):
            names = [f"DEDUP_{n.upper()}" for n in top]
            raise ConfigError(f"unknown environment variable {var}{_hint(var, names)}")
        if section is not None and len(parts) > 1:
            fields = _fields(section)
            if parts[1] not in fields:
                names = [f"DEDUP_{parts[0].upper()}__{n.upper()}" for n in fields]
                raise ConfigError(f"unknown environment variable {var}{_hint(var, names)}")

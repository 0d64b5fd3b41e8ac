"""Loading the config file: YAML → ``${VAR}`` expansion on string values → ``*_file`` secrets
read → pydantic models (types, ranges, unknown keys, matchers, phone numbers, the storage URL) →
cross-references (group ids, levels, templates). Every problem is reported as
``path.to.key: what is wrong``, all at once, in a :class:`ConfigError`. Nothing downstream ever
reads the raw YAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from receiver.config.model import Config, format_duration
from receiver.render import template_error


class ConfigError(Exception):
    """The config is invalid; ``errors`` holds every ``path.to.key: what is wrong`` line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Keys whose value may instead be read from a file named by "<key>_file".
_SECRET_KEYS = {"api_key", "password", "grafana_hmac_secret", "secret", "bearer_tokens"}


def _expand(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _VAR.sub(lambda m: env.get(m[1]) or (m[2] or ""), node)
    if isinstance(node, list):
        return [_expand(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _expand(v, env) for k, v in node.items()}
    return node


def _read_secret_files(node: Any, base: Path, path: str, errors: list[str]) -> Any:
    """Replace every ``<key>_file`` by ``<key>`` holding the file's content."""
    if isinstance(node, list):
        return [_read_secret_files(v, base, f"{path}.{i}", errors) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[Any, Any] = {}
    for key, value in node.items():
        here = f"{path}.{key}" if path else str(key)
        stem = key[:-5] if isinstance(key, str) and key.endswith("_file") else None
        if stem not in _SECRET_KEYS:
            out[key] = _read_secret_files(value, base, here, errors)
            continue
        if node.get(stem) not in (None, "", []):
            errors.append(f"{here}: give either {stem} or {key}, not both")
            continue
        file = base / str(value)
        try:
            content = file.read_text(encoding="utf-8")
        except OSError as exc:
            errors.append(f"{here}: cannot read {str(value)!r}: {exc.strerror or exc}")
            continue
        if stem == "bearer_tokens":  # one token per line
            out[stem] = [line.strip() for line in content.splitlines() if line.strip()]
        else:
            out[stem] = content.strip()
    return out


_PYDANTIC_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _format_pydantic(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = _PYDANTIC_MESSAGES.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return lines


def lease_problem(cfg: Config, storage_kind: str) -> str | None:
    """Why ``dispatch.lease`` is too short for a shared (postgresql) outbox, if it is. A reload
    checks it against the storage the process runs on, not the file's (a storage change waits
    for a restart)."""
    if storage_kind != "postgresql":
        return None
    # Another replica takes a claim over once its lease runs out, and a request that could end
    # after it is not started: the lease must outlast the sends of one message.
    most = max((len(g.members) for g in cfg.groups), default=1)
    requests = -(-most // cfg.dispatch.batch_size)
    needed = cfg.clickatell.timeout * requests
    if cfg.dispatch.lease > needed:
        return None
    return (f"dispatch.lease: {format_duration(cfg.dispatch.lease)} is not longer than one message's "
            f"sends can take ({requests} request(s) × clickatell.timeout "
            f"{format_duration(cfg.clickatell.timeout)}); with postgresql storage another replica "
            f"would send it again: make it more than {format_duration(needed)}")


def _cross_check(cfg: Config) -> list[str]:
    """Checks that span sections: references between ids, levels and templates."""
    errors: list[str] = []
    names = cfg.level_names
    seen_levels: set[str] = set()
    seen_severities: dict[str, str] = {}
    for i, level in enumerate(cfg.levels):
        if level.name in seen_levels:
            errors.append(f"levels.{i}.name: duplicate level {level.name!r}")
        seen_levels.add(level.name)
        for j, sev in enumerate(level.severities):
            other = seen_severities.setdefault(sev.lower(), level.name)
            if other != level.name:
                errors.append(
                    f"levels.{i}.severities.{j}: {sev!r} already belongs to level {other!r}"
                )
    if cfg.default_level not in names:
        errors.append(f"default_level: unknown level {cfg.default_level!r} (levels: {', '.join(names)})")

    group_ids: set[str] = set()
    for i, group in enumerate(cfg.groups):
        if group.id in group_ids:
            errors.append(f"groups.{i}.id: duplicate group id {group.id!r}")
        group_ids.add(group.id)
        if group.level is not None and group.level not in names:
            errors.append(f"groups.{i}.level: unknown level {group.level!r} (levels: {', '.join(names)})")
        if group.template not in cfg.templates:
            errors.append(
                f"groups.{i}.template: unknown template {group.template!r} "
                f"(templates: {', '.join(sorted(cfg.templates))})"
            )
        if len(set(group.members)) != len(group.members):
            errors.append(f"groups.{i}.members: the same number is listed twice")
        qh = group.quiet_hours
        if qh is not None:
            if qh.min_level is not None and qh.min_level not in names:
                errors.append(f"groups.{i}.quiet_hours.min_level: unknown level {qh.min_level!r} "
                              f"(levels: {', '.join(names)})")
            if qh.start == qh.end:
                errors.append(f"groups.{i}.quiet_hours: start and end are the same time")
            if not qh.days:
                errors.append(f"groups.{i}.quiet_hours.days: name at least one day")
    if cfg.paging.urgent_level is not None and cfg.paging.urgent_level not in names:
        errors.append(f"paging.urgent_level: unknown level {cfg.paging.urgent_level!r} "
                      f"(levels: {', '.join(names)})")

    for i, route in enumerate(cfg.routes):
        for j, gid in enumerate(route.groups):
            if gid not in group_ids:
                errors.append(f"routes.{i}.groups.{j}: unknown group id {gid!r}")
    for j, gid in enumerate(cfg.default_groups):
        if gid not in group_ids:
            errors.append(f"default_groups.{j}: unknown group id {gid!r}")

    for name, source in cfg.templates.items():
        problem = template_error(source)
        if problem:
            errors.append(f"templates.{name}: {problem}")
    problem = lease_problem(cfg, cfg.storage.kind)
    if problem:
        errors.append(problem)
    return errors


def parse_config(text: str, *, env: Mapping[str, str], base_dir: Path) -> Config:
    """Parse a config document. ``env`` feeds ``${VAR}``; ``*_file`` paths are relative to
    ``base_dir``. Raise :class:`ConfigError` listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError([f"(file): {where}: {getattr(exc, 'problem', None) or exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of keys such as listen, groups, routes"])
    errors: list[str] = []
    raw = _read_secret_files(_expand(raw, env), base_dir, "", errors)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(errors + _format_pydantic(exc)) from None
    errors += _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file (``env`` defaults to the process environment)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {str(file)!r}: {exc.strerror or exc}"]) from None
    return parse_config(text, env=os.environ if env is None else env, base_dir=file.parent)


def config_warnings(cfg: Config) -> list[str]:
    """Things that are valid but that an operator must hear about at start."""
    out = []
    if cfg.dry_run:
        out.append(
            "DRY-RUN MODE: no Clickatell API key is configured (clickatell.api_key); "
            "messages are recorded and logged but NOT sent"
        )
    if not cfg.webhook_auth.configured:
        out.append("webhook_auth is not configured: anyone who can reach the webhook endpoints can page")
    if not cfg.admin_auth.configured:
        out.append("admin_auth is not configured: /send, /-/reload and /api/v1 are open")
    if not cfg.callbacks.secret.get_secret_value():
        out.append("callbacks.secret is not configured: anyone can post delivery reports and replies")
    if not cfg.groups:
        out.append("no groups are configured: alerts are recorded as unrouted and nothing is sent")
    return out

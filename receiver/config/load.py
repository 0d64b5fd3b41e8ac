"""Loading the config file: YAML (a duplicate key is an error) → ``${VAR}`` expansion on string
values → ``*_file`` secrets read → pydantic models (types, ranges, unknown keys, matchers, phone
numbers, the storage URL) → cross-references (group ids, levels, templates). Every problem is
reported as ``path.to.key: what is wrong``, all at once, in a :class:`ConfigError`: the
cross-references are checked on the raw mapping, so a structural error elsewhere does not hide
them. Relative paths (``*_file``, a ``sqlite://`` file) are relative to the config file's
directory. Nothing downstream ever reads the raw YAML.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from receiver.config.model import DEFAULT_LEVELS, Config, TlsConfig, format_duration
from receiver.phone import to_e164
from receiver.render import template_error
from receiver.tls import TlsError, load_tls


class ConfigError(Exception):
    """The config is invalid; ``errors`` holds every ``path.to.key: what is wrong`` line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Keys whose value may instead be read from a file named by "<key>_file".
_SECRET_KEYS = {"api_key", "password", "grafana_hmac_secret", "secret", "bearer_tokens"}
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records every mapping key given twice, at any depth, with both lines
    (plain YAML keeps the last copy silently). ``paths`` maps ``id(node)`` to its key path."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []
        self.paths: dict[int, str] = {}
        self.lines: dict[str, int] = {}  # key path → line, to list errors in the file's order

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue  # keys from a << merge may be overridden: that is what it is for
                line, key = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
                if key not in seen:
                    seen[key] = line
                    continue
                here = _join(self.paths.get(id(node), ""), key_node.value)
                self.duplicates.append(
                    f"{here}: the key is given twice (lines {seen[key]} and {line}) and YAML would keep "
                    "only the second: write it once")
        return super().construct_mapping(node, deep)


def _node_paths(node: yaml.Node, path: str, loader: _StrictLoader) -> None:
    loader.lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in loader.paths:  # an alias: named by its first use
        return
    loader.paths[id(node)] = path
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            loader.lines.setdefault(_join(path, key), key_node.start_mark.line + 1)
            _node_paths(value, _join(path, key), loader)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_paths(item, _join(path, i), loader)


def _in_file_order(errors: list[str], lines: Mapping[str, int]) -> list[str]:
    """``errors`` sorted by the line of the key each names (its nearest written parent when the
    key itself is not written), so that the list reads along with the file."""
    def line(error: str) -> int:
        path = error.split(": ", 1)[0]
        while path not in lines and "." in path:
            path = path.rsplit(".", 1)[0]
        return lines.get(path, 0)
    return sorted(errors, key=line)


def _load_yaml(text: str, errors: list[str], lines: dict[str, int]) -> Any:
    """The document, duplicate keys appended to ``errors`` and each key's line put in ``lines``;
    ConfigError on a syntax error."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _node_paths(node, "", loader)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError([f"(file): {where}: {getattr(exc, 'problem', None) or exc}"]) from None
    finally:
        loader.dispose()
    errors += loader.duplicates
    lines.update(loader.lines)
    return data


def _expand(node: Any, env: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in string values. A bare ``${VAR}`` that is unset or
    empty is an error: an empty secret would silently mean "open"."""
    if isinstance(node, str):
        def value(m: re.Match[str]) -> str:
            name, default = m[1], m[2]
            if env.get(name):
                return env[name]
            if default is not None:
                return default
            state = "empty" if name in env else "not set"
            errors.append(f"{path or '(top level)'}: ${{{name}}} is {state} (set it, or write "
                          f"${{{name}:-}} to allow it empty)")
            return ""
        return _VAR.sub(value, node)
    if isinstance(node, list):
        return [_expand(v, env, _join(path, i), errors) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _expand(v, env, _join(path, k), errors) for k, v in node.items()}
    return node


def _read_secret_files(node: Any, base: Path, path: str, errors: list[str]) -> Any:
    """Replace every ``<key>_file`` by ``<key>`` holding the file's content (``bearer_tokens``:
    one token a line; blank lines and ``#`` comments skipped). An empty file is an error."""
    if isinstance(node, list):
        return [_read_secret_files(v, base, f"{path}.{i}", errors) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[Any, Any] = {}
    for key, value in node.items():
        here = _join(path, key)
        stem = key[:-5] if isinstance(key, str) and key.endswith("_file") else None
        if stem not in _SECRET_KEYS:
            out[key] = _read_secret_files(value, base, here, errors)
            continue
        if node.get(stem) not in (None, "", []):
            errors.append(f"{here}: give either {stem} or {key}, not both")
            continue
        if not isinstance(value, str) or not value.strip():
            errors.append(f"{here}: expected the path of a file holding the {stem}")
            continue
        file = base / value
        try:
            content = file.read_text(encoding="utf-8")
        except OSError as exc:
            errors.append(f"{here}: cannot read {value!r}: {exc.strerror or exc}")
            continue
        if stem == "bearer_tokens":
            lines = (line.strip() for line in content.splitlines())
            out[stem] = [line for line in lines if line and not line.startswith("#")]
            empty = not out[stem]
        else:
            out[stem] = content.strip()
            empty = not out[stem]
        if empty:
            errors.append(f"{here}: {value!r} ({file}) is empty: put the {stem} in it, or remove {key}")
    return out


_PYDANTIC_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "tuple_type": "expected a list (one '- item' per line, or [a, b])",
    "model_type": "expected a mapping (key: value lines, or {key: value})",
    "dict_type": "expected a mapping (key: value lines, or {key: value})",
}


def _known_keys() -> set[str]:
    """Every key name (field or alias, and ``<secret>_file``) of the config's models."""
    keys: set[str] = set()
    todo: list[Any] = [Config]
    visited: set[type] = set()
    while todo:
        ann = todo.pop()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if ann in visited:
                continue
            visited.add(ann)
            for name, info in ann.model_fields.items():
                key = info.alias or name
                keys |= {key, f"{key}_file"} if key in _SECRET_KEYS else {key}
                todo.append(info.annotation)
        else:
            todo += typing.get_args(ann)
    return keys


def _format_pydantic(exc: ValidationError, raw: Mapping[str, Any]) -> list[str]:
    lines = []
    bad_members: dict[int, set[int]] = {}
    known: set[str] | None = None
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = _PYDANTIC_MESSAGES.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        msg = msg.removeprefix(f"{where}: ")  # a validator that names its key itself
        if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            known = _known_keys() if known is None else known
            # a key valid in another section is still unknown here: never suggest itself
            close = difflib.get_close_matches(loc[-1], sorted(known - {loc[-1]}), n=1, cutoff=0.7)
            msg += f": did you mean {close[0]}?" if close else ""
        if len(loc) == 4 and loc[0] == "groups" and loc[2] == "members" and isinstance(loc[3], int):
            bad_members.setdefault(loc[1], set()).add(loc[3])  # type: ignore[arg-type]
        lines.append(f"{where}: {msg}")
    groups = raw.get("groups")
    for i, bad in sorted(bad_members.items()):
        members = groups[i].get("members") if isinstance(groups, list) and isinstance(groups[i], dict) else None
        if isinstance(members, list) and len(bad) == len(members):
            names = ", ".join(repr(m) for m in members)
            lines.append(f"groups.{i}.members: none of the members is a valid number ({names}): the group "
                         "has no members")
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


def _items(value: Any) -> list[tuple[int, dict[str, Any]]]:
    """The mapping entries of a list, with their index; nothing when it is not a list."""
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)] if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _one_of(what: str, names: list[str]) -> str:
    return f"({what}: {', '.join(names)})" if names else f"(no {what} are defined)"


def _cross_check(raw: Mapping[str, Any]) -> list[str]:
    """Checks that span sections: references between ids, levels and templates. They read the
    raw mapping, leniently (a value of the wrong type is the models' error, skipped here), so that
    they are reported in the same run as any structural error."""
    from receiver.config.model import _time_of_day

    errors: list[str] = []
    names: list[str] | None = [level.name for level in DEFAULT_LEVELS]
    if "levels" in raw:
        names = [n for _, lv in _items(raw["levels"]) if (n := _text(lv.get("name")))] \
            if isinstance(raw["levels"], list) else None  # not a list: no level check can be trusted
    seen_levels: set[str] = set()
    seen_severities: dict[str, str] = {}
    for i, level in _items(raw.get("levels")):
        name = _text(level.get("name"))
        if name is None:
            continue
        if name in seen_levels:
            errors.append(f"levels.{i}.name: duplicate level {name!r}: give each level its own name")
        seen_levels.add(name)
        severities = level.get("severities")
        for j, sev in enumerate(severities if isinstance(severities, list) else []):
            if not isinstance(sev, str):
                continue
            other = seen_severities.setdefault(sev.lower(), name)
            if other != name:
                errors.append(f"levels.{i}.severities.{j}: {sev!r} already belongs to level {other!r}: "
                              "list it under one level only")

    def level_ref(where: str, value: Any) -> None:
        if names is not None and isinstance(value, str) and value not in names:
            errors.append(f"{where}: unknown level {value!r} {_one_of('levels', names)}")

    level_ref("default_level", raw.get("default_level", "warning"))
    paging = raw.get("paging")
    if isinstance(paging, dict):
        level_ref("paging.urgent_level", paging.get("urgent_level"))

    templates = raw.get("templates", {})
    template_names = sorted({*map(str, templates), "default"}) if isinstance(templates, dict) else None
    group_ids: dict[str, int] = {}
    groups_ok = isinstance(raw.get("groups", []), list)
    for i, group in _items(raw.get("groups")):
        gid = _text(group.get("id"))
        if gid is not None:
            if gid in group_ids:
                errors.append(f"groups.{i}.id: duplicate group id {gid!r} (also groups.{group_ids[gid]}.id): "
                              "give each group its own id")
            group_ids.setdefault(gid, i)
        level_ref(f"groups.{i}.level", group.get("level"))
        template = group.get("template", "default")
        if template_names is not None and isinstance(template, str) and template not in template_names:
            errors.append(f"groups.{i}.template: unknown template {template!r} "
                          f"{_one_of('templates', template_names)}")
        members = group.get("members")
        seen: dict[str, int] = {}
        for j, member in enumerate(members if isinstance(members, list) else []):
            try:
                number = to_e164(member)
            except ValueError:
                continue  # the models' error
            if number in seen:
                errors.append(f"groups.{i}.members.{j}: the same number as groups.{i}.members.{seen[number]}: "
                              "list it once")
            seen.setdefault(number, j)
        qh = group.get("quiet_hours")
        if isinstance(qh, dict):
            level_ref(f"groups.{i}.quiet_hours.min_level", qh.get("min_level"))
            try:
                same = _time_of_day(qh.get("start")) == _time_of_day(qh.get("end"))
            except ValueError:
                same = False
            if same:
                errors.append(f"groups.{i}.quiet_hours: start and end are the same time")
            if qh.get("days") == []:
                errors.append(f"groups.{i}.quiet_hours.days: name at least one day")

    def group_ref(where: str, gid: Any) -> None:
        if groups_ok and isinstance(gid, str) and gid not in group_ids:
            errors.append(f"{where}: unknown group id {gid!r} {_one_of('group ids', list(group_ids))}")

    for i, route in _items(raw.get("routes")):
        refs = route.get("groups")
        for j, gid in enumerate(refs if isinstance(refs, list) else []):
            group_ref(f"routes.{i}.groups.{j}", gid)
    default_groups = raw.get("default_groups")
    for j, gid in enumerate(default_groups if isinstance(default_groups, list) else []):
        group_ref(f"default_groups.{j}", gid)
    for i, group in _items(raw.get("groups")):  # escalation chains name groups
        escalate = group.get("escalate")
        targets = escalate.get("to") if isinstance(escalate, dict) else None
        for j, gid in enumerate(targets if isinstance(targets, list) else []):
            group_ref(f"groups.{i}.escalate.to.{j}", gid)
        if isinstance(escalate, dict):
            level_ref(f"groups.{i}.escalate.level", escalate.get("level"))

    for name, source in templates.items() if isinstance(templates, dict) else ():
        problem = template_error(source) if isinstance(source, str) else None
        if problem:
            errors.append(f"templates.{name}: {problem}")
    errors += _check_send_templates(raw)
    return errors


def _check_send_templates(raw: Mapping[str, Any]) -> list[str]:
    """``groups[].send_template`` names a ``send_templates`` entry (not an alert template: those
    render ``[WARNING] FIRING 0:`` without alerts); each entry compiles and renders within the
    budget in its syntax."""
    from receiver.render import send_template_error

    errors: list[str] = []
    send_templates = raw.get("send_templates", {})
    names = sorted(map(str, send_templates)) if isinstance(send_templates, dict) else None
    alert_templates = raw.get("templates") if isinstance(raw.get("templates"), dict) else {}
    for i, group in _items(raw.get("groups")):
        ref = group.get("send_template")
        if names is None or not isinstance(ref, str) or ref in names:
            continue
        also = (f"; {ref!r} is an alert template (templates:), which has no alerts to show for /send"
                if ref in alert_templates or ref == "default" else "")
        errors.append(f"groups.{i}.send_template: unknown send template {ref!r} "
                      f"{_one_of('send_templates', names)}{also}")
    for name, entry in send_templates.items() if isinstance(send_templates, dict) else ():
        text = entry if isinstance(entry, str) else entry.get("text") if isinstance(entry, dict) else None
        syntax = entry.get("syntax", "seed") if isinstance(entry, dict) else "seed"
        if isinstance(text, str) and text and syntax in ("seed", "jinja2"):
            where = f"send_templates.{name}" + ("" if isinstance(entry, str) else ".text")
            if problem := send_template_error(text, syntax):
                errors.append(f"{where}: {problem}")
    return errors


def _tls_problems(raw: Mapping[str, Any], base_dir: Path) -> list[str]:
    """The listener's certificate and key, read as ``run`` would (a section that is not valid
    is reported by the model)."""
    server = raw.get("server")
    tls = server.get("tls") if isinstance(server, Mapping) else None
    if not isinstance(tls, Mapping):
        return []
    try:
        load_tls(TlsConfig.model_validate(tls, context={"base_dir": str(base_dir)}))
    except ValidationError:
        return []
    except TlsError as exc:
        return [str(exc)]
    return []


def parse_config(text: str, *, env: Mapping[str, str], base_dir: Path) -> Config:
    """Parse a config document. ``env`` feeds ``${VAR}``; relative ``*_file`` paths and a
    relative ``sqlite://`` file are relative to ``base_dir``. Raise :class:`ConfigError` listing
    every problem of the document (structural and cross-references) at once."""
    errors: list[str] = []
    lines: dict[str, int] = {}
    raw = _load_yaml(text, errors, lines)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of keys such as listen, groups, routes"])
    base_dir = Path(os.path.abspath(base_dir))
    unset: list[str] = []
    raw = _read_secret_files(_expand(raw, env, "", unset), base_dir, "", errors)
    cfg: Config | None = None
    later: list[str] = []
    try:
        cfg = Config.model_validate(raw, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        later += _format_pydantic(exc, raw)
    later += _cross_check(raw)
    later += _tls_problems(raw, base_dir)
    problem = lease_problem(cfg, cfg.storage.kind) if cfg is not None else None
    if problem:
        later.append(problem)
    # What an unset variable's empty value causes ('' is not HOST:PORT) is said once, by its error.
    blamed = {e.split(": ", 1)[0] for e in unset}
    errors += unset + [e for e in later if not any(
        b == (p := e.split(": ", 1)[0]) or b.startswith(p + ".") for b in blamed)]
    if errors or cfg is None:
        raise ConfigError(_in_file_order(errors, lines))
    return cfg


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file (``env`` defaults to the process environment); relative
    paths in it are relative to the file's directory."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {str(file)!r}: {exc.strerror or exc}"]) from None
    return parse_config(text, env=os.environ if env is None else env, base_dir=file.parent)


def config_warnings(cfg: Config, listen: str | None = None) -> list[str]:
    """Things that are valid but that an operator must hear about at start; ``listen``: the
    address actually listened on, when ``run --listen`` overrides the file's."""
    out = []
    if cfg.dry_run:
        out.append(
            "DRY-RUN MODE: no Clickatell API key is configured (clickatell.api_key); "
            "messages are recorded and logged but NOT sent"
        )
    out += _auth_warnings(cfg, listen or cfg.listen)
    if not cfg.groups:
        out.append("no groups are configured: alerts are recorded as unrouted and nothing is sent")
    out += _two_way_warnings(cfg)
    return out


def _two_way_warnings(cfg: Config) -> list[str]:
    """Two-way groups whose replies cannot come back or cannot silence anything."""
    out = []
    two_way = [g.id for g in cfg.groups if g.two_way]
    if two_way and not cfg.clickatell.from_:
        out.append(f"groups {', '.join(two_way)} have two_way on but clickatell.from is not set: replies "
                   "come back only to a two-way number sent from; set clickatell.from to it")
    if two_way and not cfg.alertmanager.urls:
        out.append("two_way is on but alertmanager.urls is empty: an SMS ACK is recorded and stops "
                   "escalation, but creates no silence")
    for g in cfg.groups:
        if g.escalate is not None and not g.two_way:
            out.append(f"group {g.id} has escalate but two_way off: its own pages are not numbered and never "
                       "escalate; its escalate.to only continues the chains of pages escalated to it")
    return out


def _listens_on_loopback(listen: str) -> bool:
    from receiver.config.model import split_listen

    host = split_listen(listen)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or every interface (0.0.0.0, ::)


def _auth_warnings(cfg: Config, listen: str) -> list[str]:
    """What is open, refused or ignored about authentication (closed by default: see auth.py)."""
    out = []
    local = _listens_on_loopback(listen)
    where = "" if local else f" (listen {listen} is not loopback-only)"
    hook = cfg.webhook_auth
    hmac_only = not hook.configured and bool(hook.grafana_hmac_secret.get_secret_value())
    if hook.configured and hook.allow_unauthenticated:
        out.append("webhook_auth.allow_unauthenticated is ignored: credentials are configured and always required")
    elif not hook.configured and hook.allow_unauthenticated:
        out.append(f"webhook_auth.allow_unauthenticated: anyone who can reach "
                   f"{'/webhook/alertmanager' if hmac_only else 'the webhook endpoints'} can page"
                   f"{where or ' (listen is loopback-only: anyone on this host)'}")
    elif not hook.configured:
        out.append(f"webhook_auth has no credentials: {'/webhook/alertmanager refuses' if hmac_only else 'webhooks are refused'}"
                   " (401) until bearer_tokens or basic_auth (or allow_unauthenticated: true) is set")
    admin = cfg.admin_auth
    if admin.configured and admin.allow_unauthenticated:
        out.append("admin_auth.allow_unauthenticated is ignored: credentials are configured and always required")
    elif not admin.configured and admin.allow_unauthenticated:
        out.append(f"admin_auth.allow_unauthenticated: /send, /-/reload and /api/v1 (members' numbers, message "
                   f"texts) are open to anyone who can reach them{where}")
    elif not admin.configured and where:
        out.append(f"admin_auth has no credentials: /send, /-/reload and /api/v1 answer clients on this host "
                   f"only (403 to others){where}")
    cb = cfg.callbacks
    if cb.secret.get_secret_value() and cb.allow_unauthenticated:
        out.append("callbacks.allow_unauthenticated is ignored: callbacks.secret is configured and always required")
    elif cb.allow_unauthenticated:
        out.append(f"callbacks.allow_unauthenticated: anyone who can reach the callback endpoint can post "
                   f"delivery reports{where}")
    elif not cb.secret.get_secret_value() and not cfg.dry_run:
        out.append("callbacks.secret is not configured: Clickatell delivery reports are refused (401)")
    return out

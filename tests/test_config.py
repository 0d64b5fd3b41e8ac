from pathlib import Path

import pytest
import yaml

from receiver.config import ConfigError, load_config, parse_config, parse_duration
from tests.helpers import make_config

ROOT = Path(__file__).parent.parent


def errors_of(text: str, env: dict[str, str] | None = None, base_dir: Path = ROOT) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {}, base_dir=base_dir)
    return info.value.errors


def test_repo_config_yaml_is_valid_and_dry_run_without_key():
    cfg = load_config(ROOT / "config.yaml", env={})
    assert cfg.dry_run
    assert cfg.groups[0].members == ("+886911960999", "+886911960998")  # with or without "+"
    assert not cfg.webhook_auth.configured  # "${WEBHOOK_TOKEN}" unset: dropped, not ""


def test_env_expansion_and_defaults():
    cfg = load_config(ROOT / "config.yaml", env={
        "CLICKATELL_API_KEY": "k==", "WEBHOOK_TOKEN": "t1", "SMS_RECEIVER_LISTEN": "127.0.0.1:1234",
    })
    assert cfg.clickatell.api_key.get_secret_value() == "k=="
    assert not cfg.dry_run
    assert [t.get_secret_value() for t in cfg.webhook_auth.bearer_tokens] == ["t1"]
    assert cfg.listen == "127.0.0.1:1234"
    assert cfg.clickatell.base_url == "https://platform.clickatell.com"  # ${VAR:-default}


def test_secret_files(tmp_path: Path):
    (tmp_path / "key").write_text("secret-key==\n")
    (tmp_path / "tokens").write_text("a\n\nb\n")
    cfg = parse_config(
        "clickatell: {api_key_file: key}\nwebhook_auth: {bearer_tokens_file: tokens}\n",
        env={}, base_dir=tmp_path,
    )
    assert cfg.clickatell.api_key.get_secret_value() == "secret-key=="
    assert [t.get_secret_value() for t in cfg.webhook_auth.bearer_tokens] == ["a", "b"]
    assert "secret-key" not in repr(cfg)


def test_secret_file_errors(tmp_path: Path):
    errs = errors_of("clickatell: {api_key: x, api_key_file: key}\n"
                     "groups: [{id: a, members: ['+886911960999'], api_key_file: missing}]\n",
                     base_dir=tmp_path)
    assert "clickatell.api_key_file: give either api_key or api_key_file, not both" in errs
    assert any(e.startswith("groups.0.api_key_file: cannot read 'missing'") for e in errs)


def test_every_structural_error_is_reported_with_its_path():
    errs = errors_of("""
listen: nowhere
bogus: 1
clickatell: {api: soap, max_parts: 99}
groups:
  - id: a
    members: ["12", "+886911960999"]
  - {id: b, members: []}
routes:
  - matchers: ['team=~"("', 'no operator']
    groups: [a]
dedup_window: soon
""")
    text = "\n".join(errs)
    assert "listen: 'nowhere' is not HOST:PORT" in text
    assert "bogus: unknown key" in errs
    assert any(e.startswith("clickatell.api: ") for e in errs)
    assert any(e.startswith("clickatell.max_parts: ") for e in errs)
    assert any(e.startswith("groups.0.members.0: '12' is not") for e in errs)
    assert "groups.1.members: the group has no members: list at least one phone number, e.g. " \
           "members: ['+886911960999']" in errs
    assert any(e.startswith("routes.0.matchers.0: invalid regular expression") for e in errs)
    assert any(e.startswith("routes.0.matchers.1: 'no operator' is not a matcher") for e in errs)
    assert any(e.startswith("dedup_window: 'soon' is not a duration") for e in errs)


def test_cross_reference_errors():
    errs = errors_of("""
default_level: urgent
levels: [{name: critical, severities: [critical]}, {name: warning, severities: [warning, CRITICAL]}]
groups:
  - {id: a, members: ['+886911960999'], level: nope, template: missing}
  - {id: a, members: ['+886911960998']}
routes:
  - {matchers: ['team="x"'], groups: [a, ghost]}
default_groups: [phantom]
templates:
  broken: "{% for a in alerts %}"
""")
    assert "default_level: unknown level 'urgent' (levels: critical, warning)" in errs
    assert "levels.1.severities.1: 'CRITICAL' already belongs to level 'critical': list it under one " \
           "level only" in errs
    assert "groups.0.level: unknown level 'nope' (levels: critical, warning)" in errs
    assert "groups.0.template: unknown template 'missing' (templates: broken, default)" in errs
    assert "groups.1.id: duplicate group id 'a' (also groups.0.id): give each group its own id" in errs
    assert "routes.0.groups.1: unknown group id 'ghost' (group ids: a)" in errs
    assert "default_groups.0: unknown group id 'phantom' (group ids: a)" in errs
    assert any(e.startswith("templates.broken: ") and "line 1" in e for e in errs)


def test_yaml_syntax_error_names_line():
    errs = errors_of("groups:\n  - id: a\n   members: [\n")
    assert errs[0].startswith("(file): line ")


def test_durations():
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration(15) == 15
    with pytest.raises(ValueError):
        parse_duration("5 minutes")


def test_group_level_defaults_to_most_urgent():
    cfg = make_config(groups=[{"id": "x", "members": ["+886911960999"]}], routes=[], default_groups=[])
    assert cfg.group_level(cfg.groups[0]) == "critical"


def test_default_template_always_present():
    cfg = make_config(templates={"other": "x"})
    assert set(cfg.templates) == {"default", "other"}


@pytest.mark.parametrize("url,problem", [
    ("sqlite://", "names no file"),
    ("sqlite:///var/lib/x/", "names no file"),
    ("sqlite://:memory:", "names no file"),
    ("sqlite:///x.db?busy_timeout=1s", "takes no options"),
    ("postgresql://sms@db:99999/sms", "its port is not a number from 1 to 65535"),
    ("postgresql://sms@db:0/sms", "its port is not a number from 1 to 65535"),
    ("postgresql://sms@db/sms?password=x", "a password in the query"),
    ("postgresql://sms@db/sms?sslmode=sometimes", "sslmode 'sometimes' is not one of"),
    ("postgresql://sms@db/sms?sslmode=require&sslmode=disable", "sslmode is given 2 times"),
    ("postgresql://sms@db/sms#x", "no #fragment"),
    ("mysql://x", "is not a storage URL"),
])
def test_storage_is_exactly_what_run_can_open(url, problem):
    errs = errors_of(f"storage: {url!r}\n")
    assert len(errs) == 1 and errs[0].startswith("storage: ") and problem in errs[0], errs


def test_postgresql_storage_and_its_password(tmp_path: Path):
    """A PostgreSQL URL as asyncpg takes it (TLS options passed through); the password in the
    URL, in a file beside it, or from PGPASSWORD; never shown when the storage is printed."""
    url = "postgresql://sms:s3cret@db.example:5433/sms?sslmode=verify-full&sslrootcert=/ca.pem"
    s = make_config(storage=url).storage
    assert (s.kind, s.url, s.password) == ("postgresql", url, None)
    assert "s3cret" not in str(s) and "s3cret" not in repr(s) and str(s).startswith("postgresql://sms:***@db")
    (tmp_path / "pw").write_text("from-a-file\n")
    cfg = parse_config("storage: {url: 'postgresql://sms@db/sms', password_file: pw}\n", env={},
                       base_dir=tmp_path)
    assert (cfg.storage.url, cfg.storage.password) == ("postgresql://sms@db/sms", "from-a-file")
    assert "from-a-file" not in repr(cfg)
    assert make_config(storage="postgres://db/sms").storage.kind == "postgresql"  # PG* fill the rest
    (both,) = errors_of("storage: {url: 'postgresql://sms:x@db/sms', password: y}\n")
    assert both.startswith("storage: ") and "not both" in both
    (stray,) = errors_of("storage: {url: 'postgresql://db/sms', pasword: y}\n")
    assert "unknown key 'pasword'" in stray
    # a password left unencoded (# / ? in it) is still masked, in errors too
    for url in ("postgresql://sms:s3cr#et@db/sms", "postgresql://sms:a/b?c@db:5432/sms"):
        (err,) = errors_of(f"storage: {url!r}\n")
        assert "postgresql://sms:***@db" in err and "s3cr" not in err and "a/b" not in err, err
    assert make_config(storage="postgresql://h1:5432,h2:5433/sms").storage.kind == "postgresql"
    # the SSL key's passphrase is the driver's: passed through, never shown
    ssl = make_config(storage="postgresql://db/sms?sslmode=require&sslpassword=LEAKssl").storage
    assert "LEAKssl" not in str(ssl) and "sslpassword=***" in str(ssl)
    for key in ("password", "PassWord"):
        (err,) = errors_of(f"storage: 'postgresql://db/sms?{key}=LEAKpw'\n")
        assert "a password in the query" in err and "LEAKpw" not in err, err


def test_with_replicas_a_lease_must_outlast_one_messages_sends():
    """Another replica takes over a claim whose lease ran out: a lease no longer than a
    message's requests could take would page twice from two live replicas."""
    pg = "storage: postgresql://db/sms\n"
    (err,) = errors_of(pg + "dispatch: {lease: 10s}\nclickatell: {timeout: 10s}\n")
    assert err.startswith("dispatch.lease: 10s is not longer") and "more than 10s" in err
    ok = "dispatch: {lease: 11s}\nclickatell: {timeout: 10s}\n"
    assert parse_config(pg + ok, env={}, base_dir=ROOT).dispatch.lease == 11.0
    # one process on SQLite never takes its own claims over while it sends them
    assert parse_config("dispatch: {lease: 5s}\nclickatell: {timeout: 10s}\n", env={}, base_dir=ROOT)


def test_storage_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A relative sqlite file is relative to the config file's directory, like *_file secrets
    (Prometheus' and Alertmanager's rule), whatever the working directory."""
    assert make_config(storage="sqlite:///var/lib/x.db").storage.path == "/var/lib/x.db"
    here = make_config(storage="sqlite://data/x.db", base_dir=tmp_path).storage
    assert (here.path, str(here)) == (str(tmp_path / "data/x.db"), "sqlite://data/x.db")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "token").write_text("t\n")
    (tmp_path / "etc" / "sms.yaml").write_text(
        "storage: sqlite://./data/outbox.db\nadmin_auth: {bearer_tokens_file: token}\n")
    cfg = load_config(tmp_path / "etc" / "sms.yaml", env={})
    assert cfg.storage.path == str(tmp_path / "etc" / "data" / "outbox.db")
    assert [t.get_secret_value() for t in cfg.admin_auth.bearer_tokens] == ["t"]
    # a relative config path: still the file's directory, made absolute at load
    monkeypatch.chdir(tmp_path)
    cfg = load_config("etc/sms.yaml", env={})
    assert cfg.storage.path == str(tmp_path / "etc" / "data" / "outbox.db")


def _keys(model: type, prefix: str = "") -> list[str]:
    """Every config key as a dotted path (``groups[].quiet_hours.start``); values with a syntax
    of their own (``{username, password}``, ``{digest: 15m}``, ``{count, window}``) are one key."""
    import typing

    from pydantic import BaseModel

    from receiver.config.model import BasicAuth, Delivery, ThrottleRule

    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        args = typing.get_args(field.annotation)
        inner = next((a for a in (field.annotation, *args, *[x for a in args for x in typing.get_args(a)])
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None or inner in (BasicAuth, Delivery, ThrottleRule):
            out.append(path)
        else:
            listed = typing.get_origin(field.annotation) is tuple
            out += _keys(inner, f"{path}[]." if listed else f"{path}.")
    return out


def test_every_config_key_is_in_the_readme_table():
    """A key is documented by a row of its own, or named in the row of the nearest enclosing key
    that has one (``groups[]``'s row names ``quiet_hours``' ``timezone``)."""
    import re

    from receiver.config import Config

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("### Templates")]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            for key in re.findall(r"`([^`]+)`", first):
                rows[key] = line
    missing = []
    for path in _keys(Config):
        if path in rows:
            continue
        parts = path.split(".")
        enclosing = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                          if ".".join(parts[:i]) in rows), None)
        if enclosing is None or f"`{parts[-1]}`" not in rows[enclosing]:
            missing.append(path)
    assert missing == [], f"config keys missing from the README's Configuration table: {missing}"


# ---------------------------------------------------------------------------------------------
# One pass, errors that say what to do (issue 21), no empty secret from an unset variable (20.4)

TEN_MISTAKES = ROOT / "tests" / "fixtures" / "ten-mistakes.yaml"
TEN_MISTAKES_ERRORS = [  # in the file's order, each starting with the key it is about
    "listen: the key is given twice (lines 3 and 23) and YAML would keep only the second: write it once",
    "admin_auth.bearer_tokens.0: ${TEN_MISTAKES_ADMIN_TOKEN} is not set (set it, or write "
    "${TEN_MISTAKES_ADMIN_TOKEN:-} to allow it empty)",
    "dedup_window: 'soon' is not a duration such as 30s, 5m or 1h",
    "groups.0.members.0: '0912345678' is a local number without a country code: write it in international "
    "form with its country code, e.g. ",
    "groups.0.members: none of the members is a valid number ('0912345678'): the group has no members",
    "groups.0.level: unknown level 'urgent' (levels: critical, warning, info)",
    "groups.1.members: the group has no members: list at least one phone number, e.g. members: ['+886911960999']",
    "groups.1.template: unknown template 'shortt' (templates: default, short)",
    "groups.2.id: duplicate group id 'db' (also groups.0.id): give each group its own id",
    "grups: unknown key: did you mean groups?",
    "routes.0.groups.0: unknown group id 'dba' (group ids: db, web)",
    "templates.short: template syntax error at line 1: ",
]


def _matches(errors: list[str], expected: list[str]) -> bool:
    """Each error starts with its expected text (one for one, in order)."""
    return len(errors) == len(expected) and all(e.startswith(x) for e, x in zip(errors, expected))


def test_ten_mistakes_in_one_run():
    """Structural and cross-reference mistakes mixed: every one reported at once, naming its key
    and what to write instead, in the order of the file."""
    with pytest.raises(ConfigError) as info:
        load_config(TEN_MISTAKES, env={})
    assert _matches(info.value.errors, TEN_MISTAKES_ERRORS), "\n".join(info.value.errors)
    assert "+886912345678 for TW" in info.value.errors[3]


def test_ten_mistakes_through_the_cli():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TEN_MISTAKES")}
    run = subprocess.run([sys.executable, "-m", "receiver", "check-config", str(TEN_MISTAKES)],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert run.returncode == 1, run
    assert _matches(run.stdout.splitlines(), TEN_MISTAKES_ERRORS), run.stdout + run.stderr


def test_a_local_number_gets_its_international_forms():
    """'0912345678' is valid in several countries: every mobile form is offered, none chosen."""
    (err,) = errors_of("groups: [{id: a, members: ['+886911960999', '0912345678']}]\n")
    assert err.startswith("groups.0.members.1: '0912345678' is a local number without a country code: "
                          "write it in international form with its country code, e.g. ")
    assert "+886912345678 for TW" in err and "+66912345678 for TH" in err
    (err,) = errors_of("groups: [{id: a, members: ['+886911960999', '0151 12345678']}]\n")
    assert err.endswith("e.g. +8615112345678 for CN, +4915112345678 for DE")
    (err,) = errors_of("groups: [{id: a, members: ['+886911960999', '+0912345678']}]\n")
    assert "is a local number" in err and "Could not interpret" not in err
    (err,) = errors_of("groups: [{id: a, members: ['+886911960999', '12']}]\n")
    assert err == ("groups.0.members.1: '12' is not a phone number: write it in international form, + then "
                   "the country code and number, e.g. +886911960999")


def test_a_group_whose_members_are_all_invalid_names_them():
    errs = errors_of("groups: [{id: a, members: ['0912', '12']}]\n")
    assert "groups.0.members: none of the members is a valid number ('0912', '12'): the group has no " \
           "members" in errs
    assert len(errs) == 3  # and each member's own error
    # one good member: no summary line
    assert len(errors_of("groups: [{id: a, members: ['0912', '+886911960999']}]\n")) == 1


def test_an_unset_or_empty_variable_is_an_error_naming_it():
    doc = ("admin_auth: {bearer_tokens: ['${ADMIN_TOKEN}']}\n"
           "callbacks: {secret: 'x-${CB}-y'}\n"
           "clickatell: {api_key: '${KEY:-}', base_url: '${URL:-https://example.test}'}\n")
    errs = errors_of(doc, env={"CB": ""})
    assert errs == [
        "admin_auth.bearer_tokens.0: ${ADMIN_TOKEN} is not set (set it, or write ${ADMIN_TOKEN:-} to allow "
        "it empty)",
        "callbacks.secret: ${CB} is empty (set it, or write ${CB:-} to allow it empty)",
    ]
    cfg = parse_config(doc, env={"ADMIN_TOKEN": "a", "CB": "c"}, base_dir=ROOT)
    assert cfg.callbacks.secret.get_secret_value() == "x-c-y"
    assert (cfg.clickatell.api_key.get_secret_value(), cfg.clickatell.base_url) == ("", "https://example.test")
    # ${VAR:-} stays allowed: the empty token is dropped, not an (open) empty token
    assert parse_config("admin_auth: {bearer_tokens: ['${T:-}']}\n", env={}, base_dir=ROOT
                        ).admin_auth.bearer_tokens == ()


def test_secret_file_comments_and_empty_files(tmp_path: Path):
    (tmp_path / "tokens").write_text("# rotated 2026-11-01\n\n  tok-a  \n# old: tok-z\n\ntok-b\n")
    cfg = parse_config("webhook_auth: {bearer_tokens_file: tokens}\n", env={}, base_dir=tmp_path)
    assert [t.get_secret_value() for t in cfg.webhook_auth.bearer_tokens] == ["tok-a", "tok-b"]
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "comments").write_text("# nothing yet\n")
    errs = errors_of("clickatell: {api_key_file: empty}\nadmin_auth: {bearer_tokens_file: comments}\n"
                     "callbacks: {secret_file: ''}\n", base_dir=tmp_path)
    assert errs == [  # in the file's order
        f"clickatell.api_key_file: 'empty' ({tmp_path / 'empty'}) is empty: put the api_key in it, or remove "
        "api_key_file",
        f"admin_auth.bearer_tokens_file: 'comments' ({tmp_path / 'comments'}) is empty: put the bearer_tokens "
        "in it, or remove bearer_tokens_file",
        "callbacks.secret_file: expected the path of a file holding the secret",
    ]


def test_a_key_given_twice_at_any_level_is_an_error_naming_both_lines():
    errs = errors_of("groups: []\n"
                     "routes: []\n"
                     "groups:\n"
                     "  - id: a\n"
                     "    members: ['+886911960999']\n"
                     "    id: b\n"
                     "clickatell: {api: rest, api: http}\n")
    assert errs == [
        "groups: the key is given twice (lines 1 and 3) and YAML would keep only the second: write it once",
        "groups.0.id: the key is given twice (lines 4 and 6) and YAML would keep only the second: write it once",
        "clickatell.api: the key is given twice (lines 7 and 7) and YAML would keep only the second: write it "
        "once",
    ]
    # a << merge is how YAML overrides on purpose: not a duplicate
    cfg = parse_config("groups:\n  - &base {id: a, members: ['+886911960999']}\n  - {<<: *base, id: b}\n",
                       env={}, base_dir=ROOT)
    assert [g.id for g in cfg.groups] == ["a", "b"]


def test_an_unknown_key_suggests_the_nearest_one():
    errs = errors_of("groups: [{id: a, membres: ['+886911960999']}]\ndefault_group: [a]\n")
    assert "groups.0.membres: unknown key: did you mean members?" in errs
    assert "default_group: unknown key: did you mean default_groups?" in errs


def test_an_unset_variable_is_said_once_not_with_what_its_empty_value_causes():
    errs = errors_of('groups: [{id: a, members: ["${PHONE}"]}]\nlisten: "${LISTEN}"\n')
    assert errs == [
        "groups.0.members.0: ${PHONE} is not set (set it, or write ${PHONE:-} to allow it empty)",
        "listen: ${LISTEN} is not set (set it, or write ${LISTEN:-} to allow it empty)",
    ]


def test_a_value_of_the_wrong_shape_says_which_shape_to_write():
    errs = errors_of("levels: 3\ngroups: [3]\nclickatell: 5\n")
    assert errs == [
        "levels: expected a list (one '- item' per line, or [a, b])",
        "groups.0: expected a mapping (key: value lines, or {key: value})",
        "clickatell: expected a mapping (key: value lines, or {key: value})",
    ]
    (err,) = errors_of("storage: {url: 'postgresql://db/sms', pasword: y}\n")
    assert err == "storage: unknown key 'pasword'"  # named once, not "storage: storage: …"


def test_basic_auth_needs_a_password_and_suggestions_are_never_the_key_itself():
    doc = {"groups": [{"id": "g", "members": ["+14155550123"]}],
           "webhook_auth": {"basic_auth": {"username": "bob"}, "bearer_token": ["t"]},
           "admin_auth": {"basic_auth": {"username": "ann", "password": "${ANN_PASS:-}"}}}
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(doc), env={}, base_dir=Path("."))
    errors = "\n".join(caught.value.errors)
    assert "webhook_auth.basic_auth.password: required key is missing" in errors, errors
    assert "admin_auth.basic_auth.password: the password is empty" in errors, errors
    assert "webhook_auth.bearer_token: unknown key: did you mean bearer_tokens?" in errors, errors


def test_a_configured_callback_secret_gives_no_warning_about_it():
    from receiver.config import config_warnings

    cfg = make_config(callbacks={"secret": "s3"}, clickatell={"api_key": "k"})
    assert not [w for w in config_warnings(cfg) if "callbacks" in w]
    assert any("callbacks.secret is not configured" in w
               for w in config_warnings(make_config(callbacks={}, clickatell={"api_key": "k"})))
    # the address actually listened on decides what is said about exposure
    assert any("not loopback-only" in w for w in config_warnings(make_config(), "0.0.0.0:9097"))
    assert not any("not loopback-only" in w for w in config_warnings(make_config(), "127.0.0.1:9097"))

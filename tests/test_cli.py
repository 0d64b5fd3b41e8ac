"""The command line, run as a user runs it: a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "receiver", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_check_config_ok():
    r = cli("check-config", "config.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    assert "DRY-RUN" in r.stderr


def test_check_config_lists_every_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n  - {id: a, members: ['+1']}\nroutes:\n  - {matchers: ['x'], groups: [zz]}\nnope: 1\n")
    r = cli("check-config", str(bad))
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert any(line.startswith("groups.0.members.0: ") for line in lines)
    assert any(line.startswith("routes.0.matchers.0: ") for line in lines)
    assert "nope: unknown key" in lines


def test_render_captured_alertmanager_payload_exactly():
    r = cli("render", "--config", "config.yaml", "--payload", str(FIXTURES / "alertmanager-0.25-grouped-firing.json"),
            "--json", "--now", "2026-11-22T20:40:00Z")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["source"] == "alertmanager" and out["dryRun"] is True
    (db,) = out["messages"]  # DiskFull is warning: web-oncall (critical only) does not take it
    assert db["group"] == "yer8agvrjl4b"
    assert db["recipients"] == ["+886911960999", "+886911960998"]
    assert db["text"] == ("[WARNING] FIRING 2: DiskFull db-1:9100 Disk / above 90% since 20:35 UTC; "
                          "DiskFull db-2:9100 Disk / above 90% since 20:35 UTC")
    assert db["encoding"] == "GSM-7" and db["parts"] == 1
    assert out["filtered"] == []


def test_render_human_output_and_grafana_guess():
    r = cli("render", "--config", "config.yaml", "--payload", str(FIXTURES / "grafana-webhook-firing.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("source: grafana, 2 alert(s)")
    assert "recipients: +886911960999, +886911960998" in r.stdout
    assert "| [WARNING] FIRING 2: High memory usage" in r.stdout


def test_render_bad_payload(tmp_path: Path):
    p = tmp_path / "x.json"
    p.write_text('{"alerts": [{"status": "firing"}]}')
    r = cli("render", "--config", "config.yaml", "--payload", str(p))
    assert r.returncode == 1
    assert "alerts.0.labels: required" in r.stderr


def test_render_tells_which_paging_policy_applies(tmp_path: Path):
    import yaml

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["levels"][1]["delivery"] = {"digest": "15m"}  # warning
    path = tmp_path / "digest.yaml"
    path.write_text(yaml.safe_dump(cfg))
    payload = str(FIXTURES / "alertmanager-0.25-grouped-firing.json")
    r = cli("render", "--config", str(path), "--payload", payload, "--json", "--now", "2026-11-22T20:40:00Z")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["messages"][0]["policy"] == "held: digest 15m until 2026-11-22T20:45:00+00:00"
    assert out["throttle"].startswith("at most 1 per 1m, 5 per 15m, 11 per 1h, 21 per 3h")
    r = cli("render", "--config", "config.yaml", "--payload", payload, "--now", "2026-11-22T20:40:00Z")
    assert "policy: immediate; then per number: at most 1 per 1m" in r.stdout


def test_a_settled_process_freezes_its_start_up_heap_and_a_reload_lets_the_old_config_go():
    # in a child process: freezing is process-wide
    code = """
import gc
from receiver import gc_tuning
gc_tuning.after_reload()  # never settled: leaves the collector alone
assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] == 700
gc_tuning.settle()
frozen = gc.get_freeze_count()
assert frozen > 1000 and gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD
class Config: pass
old = Config(); old.me = old  # a reference cycle, as an old config's objects may hold
gc.freeze()  # as if it had been there at start-up
import weakref
gone = weakref.ref(old)
del old
gc_tuning.after_reload()
assert gone() is None, "the old config's cycle is collected after a reload"
assert gc.get_freeze_count() > 0
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_check_config_refuses_a_storage_run_could_not_open(tmp_path: Path):
    """check-config accepts exactly what run can run: sqlite:// without a file, options or a
    malformed PostgreSQL URL are errors in both, not an OK followed by a start that fails or
    loses pages."""
    for url, problem in (("sqlite://", "names no file"), ("postgresql://sms@db:0x/sms", "its port is not a number")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"storage: {url!r}\n")
        checked = cli("check-config", str(cfg))
        assert checked.returncode == 1 and checked.stdout.startswith("storage: ") and problem in checked.stdout
        ran = cli("run", "--config", str(cfg), "--listen", "127.0.0.1:0")
        assert ran.returncode == 1 and problem in ran.stderr


# ---------------------------------------------------------------------------------------------
# run: the listener's errors, --log-level; every argument helped and documented


def test_a_taken_port_is_one_clear_line_and_exit_1(tmp_path: Path):
    import socket

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: sqlite://{tmp_path}/outbox.db\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("run", "--config", str(cfg), "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].endswith(f"cannot listen on 127.0.0.1:{port}: address already in use "
                             "(is another sms-receiver running?)")
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr
    assert not (tmp_path / "outbox.db").exists()  # nothing else was started


def test_log_level_flag_wins_over_the_config_and_debug_shows_accepted_webhooks(tmp_path: Path):
    import select
    import signal
    import time
    import urllib.request

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: sqlite://{tmp_path}/outbox.db\nlog_level: error\n"
                   "webhook_auth: {bearer_tokens: [tok-1]}\n"
                   "groups: [{id: db, members: ['+886911960999']}]\ndefault_groups: [db]\n")
    proc = subprocess.Popen([sys.executable, "-m", "receiver", "run", "--config", str(cfg), "--listen",
                             "127.0.0.1:0", "--log-level", "debug"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert proc.stderr is not None
        seen, deadline, port = [], time.monotonic() + 30, None
        while port is None and time.monotonic() < deadline:  # the line that names the port taken
            if select.select([proc.stderr], [], [], 1)[0]:
                line = proc.stderr.readline()
                assert line, "".join(seen)
                seen.append(line)
                if " listening on http://127.0.0.1:" in line:
                    port = int(line.split("127.0.0.1:")[1].split()[0])
        assert port, "".join(seen)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/webhook/alertmanager", method="POST",
            data=(FIXTURES / "alertmanager-0.25-firing.json").read_bytes(),
            headers={"Authorization": "Bearer tok-1", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "DEBUG" in err and "outcome=accepted" in err, err


def _subcommands():
    import argparse

    from receiver.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_every_argument_of_every_command_has_help_text():
    import argparse

    parser, commands = _subcommands()
    missing = []
    for name, command in [("", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"arguments without help: {missing}"


def test_the_readme_commands_table_documents_every_flag():
    import argparse

    import fake_clickatell

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    parser, commands = _subcommands()
    fake = argparse.ArgumentParser()
    fake_clickatell._add_arguments(fake)  # the command hands its arguments to the fake's parser
    undocumented = []
    for name, command in [*commands.items(), ("fake-clickatell", fake)]:
        assert f"`sms-receiver {name}" in table, name
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help") and f"{flag}" not in table:
                    undocumented.append(f"{name} {flag}")
    assert not undocumented, f"flags missing from README's Commands table: {undocumented}"


def test_check_config_and_run_refuse_a_tls_file_they_cannot_load(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: sqlite://{tmp_path}/outbox.db\n"
                   "server: {tls: {cert_file: certs/missing.crt, key_file: certs/missing.key}}\n")
    checked = cli("check-config", str(cfg))
    assert checked.returncode == 1
    assert checked.stdout.strip() == (f"server.tls.cert_file: cannot read '{tmp_path}/certs/missing.crt': "
                                      "No such file or directory")
    ran = cli("run", "--config", str(cfg), "--listen", "127.0.0.1:0")
    assert ran.returncode == 1 and "server.tls.cert_file: cannot read" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr


def test_run_raises_its_open_files_limit_and_warns_when_max_connections_does_not_fit():
    import resource

    code = ("import resource; from receiver.logs import setup_logging; from receiver.cli import _open_files_limit; "
            "setup_logging(); _open_files_limit({}); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")

    def limit(soft: int, hard: int):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    raised = subprocess.run([sys.executable, "-c", code.format(1000)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, preexec_fn=limit(256, 1500))
    assert raised.stdout.strip() == "1500" and raised.stderr == "", raised.stderr
    short = subprocess.run([sys.executable, "-c", code.format(2000)], capture_output=True, text=True,
                           timeout=60, cwd=ROOT, preexec_fn=limit(256, 1500))
    assert "server.max_connections 2000 does not fit the open-files limit 1500" in short.stderr, short.stderr

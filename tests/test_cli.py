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
    assert db["text"] == ("[WARNING] FIRING 2: DiskFull db-1:9100 Disk / above 90% since 20:35; "
                          "DiskFull db-2:9100 Disk / above 90% since 20:35")
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

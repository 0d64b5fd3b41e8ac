"""``sms-receiver`` (and ``python -m receiver``): run, check-config, render, fake-clickatell."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from receiver import __version__, gc_tuning
from receiver.config import (
    Config,
    ConfigError,
    config_warnings,
    format_duration,
    load_config,
    split_listen,
)
from receiver.ingest import InvalidPayload, parse_webhook
from receiver.logs import setup_logging
from receiver.models import NewMessage
from receiver.pipeline import Snapshot, plan_notification, policy, refs_wanted, with_refs

log = logging.getLogger("sms_receiver")


def _throttle_text(cfg: Config) -> str:
    p = cfg.paging
    if not p.throttle:
        return "no throttle"
    rules = ", ".join(f"{r.count} per {format_duration(r.window)}" for r in p.throttle)
    urgent = p.urgent_level or cfg.levels[0].name
    c, bound = p.urgent_ceiling, format_duration(p.urgent_max_delay)
    past = f" up to {c.count} per {format_duration(c.window)}, then held at most {bound}" if c else ""
    return f"at most {rules} (held into a bundle; firing {urgent} at once{past}; resolved at most {bound})"


# ---------------------------------------------------------------------------------------------
# run


class ListenError(Exception):
    """The listening socket could not be opened: one line, said before anything else started."""


def _listen_error(listen: str, exc: OSError) -> ListenError:
    import errno
    import os

    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    hint = {errno.EADDRINUSE: " (is another sms-receiver running?)",
            errno.EACCES: " (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: " (no interface of this machine has that address)"}.get(exc.errno or 0, "")
    return ListenError(f"cannot listen on {listen}: {reason}{hint}")


def _open_files_limit(wanted: int) -> None:
    """Raise the soft open-files limit to the hard one (as Go programs do at start: the soft
    default of 1,024 is for select()-era programs), and warn when server.max_connections still
    does not fit: at the limit accept() fails and nobody gets in, the cap would close idle
    connections first instead."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and wanted > soft - FD_RESERVE:
        log.warning("server.max_connections %d does not fit the open-files limit %d (ulimit -n, "
                    "LimitNOFILE=) minus %d for the outbox and Clickatell: lower it or raise the "
                    "limit", wanted, soft, FD_RESERVE)


FD_RESERVE = 100  # file descriptors kept for everything but the listener's connections


async def _serve(cfg: Config, config_path: Path, listen: str) -> int:
    """Serve until SIGTERM/SIGINT (0), or until the receiver fails for good (1: restart me).
    The port is bound first, so a taken port is one error line and nothing else started."""
    from aiohttp import web

    from receiver.app import Receiver
    from receiver.clock import SystemClock
    from receiver.listener import Listener
    from receiver.metrics import Metrics
    from receiver.web import create_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    broken: list[str] = []
    metrics, clock = Metrics(), SystemClock()
    listener = Listener(settings=lambda: cfg.server, metrics=metrics, clock=clock)
    listener.load_tls(cfg)
    host, port = split_listen(listen)
    try:
        await listener.bind(host, port)
    except OSError as exc:
        raise _listen_error(listen, exc) from None
    _open_files_limit(cfg.server.max_connections)
    receiver = Receiver(cfg, config_path=config_path, metrics=metrics, clock=clock)
    listener.guard.settings = lambda: receiver.config.server  # the live config's: a reload applies
    receiver.reload_hooks.append(listener.reload_tls)
    receiver.listen = listen

    def on_fatal(reason: str) -> None:
        broken.append(reason)
        stop.set()

    receiver.on_fatal = listener.on_fatal = on_fatal
    app = create_app(receiver)
    listener.install(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await receiver.start()
        await runner.setup()
        await listener.serve(runner)
    except BaseException:
        await listener.close()
        await runner.cleanup()
        await receiver.stop()
        raise
    gc_tuning.settle()
    bound = f"[{host}]:{listener.port}" if ":" in host else f"{host}:{listener.port}"  # port 0: the one taken
    log.info("sms-receiver %s listening on %s://%s (storage %s)", __version__, listener.scheme, bound,
             cfg.storage)

    reloads: set[asyncio.Task[list[str]]] = set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(receiver.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if broken:
        log.critical("stopping: %s; exiting with status 1 so that the supervisor restarts the "
                     "receiver", broken[0])
    else:
        log.info("shutting down: finishing requests and sends in flight")
    await listener.close()
    await runner.cleanup()
    await receiver.stop()
    return 1 if broken else 0


def _load_or_report(path: str) -> Config | None:
    """The config, or None after printing every error to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"invalid config {path}:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    setup_logging(args.log_format or cfg.log_format, args.log_level or cfg.log_level)
    listen = args.listen or cfg.listen
    try:
        split_listen(listen)
    except ValueError:
        print(f"--listen: {listen!r} is not HOST:PORT", file=sys.stderr)
        return 2
    from receiver.store import StoreError
    from receiver.tls import TlsError

    try:
        return asyncio.run(_serve(cfg, Path(args.config), listen))
    except TlsError as exc:
        print(f"invalid config {args.config}:\n  {exc}", file=sys.stderr)
        return 1
    except (StoreError, ListenError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc.strerror or exc)
        return 1


# ---------------------------------------------------------------------------------------------
# check-config


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        for line in exc.errors:
            print(line)
        return 1
    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{args.file}: OK ({len(cfg.groups)} groups, {len(cfg.routes)} routes, "
        f"{len(cfg.levels)} levels, {len(cfg.templates)} templates)"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# render


def _message_json(m: NewMessage, snap: Snapshot, now: float) -> dict[str, Any]:
    """What ``render --json`` says of one message."""
    return {
        "group": m.group_id,
        "level": m.level,
        "recipients": list(m.recipients),
        "text": m.sms.text,
        "encoding": m.sms.encoding,
        "parts": m.sms.parts,
        "truncated": m.sms.truncated,
        "templateError": m.template_error,
        "policy": policy(m, snap, now).describe(),
    }


def _print_message(m: NewMessage, snap: Snapshot, now: float, throttle: str) -> None:
    """What ``render`` says of one message, after its heading line: recipients, policy,
    encoding and parts, a template failure, the text."""
    print(f"  recipients: {', '.join(m.recipients)}")
    print(f"  policy: {policy(m, snap, now).describe()}; then per number: {throttle}")
    print(f"  {m.sms.encoding}, {m.sms.parts} part(s), {len(m.sms.text)} characters"
          + (", cut to clickatell.max_parts" if m.sms.truncated else ""))
    if m.template_error:
        print(f"  TEMPLATE FAILED ({m.template_error}): the fallback text below is sent")
    print("  text:")
    for line in m.sms.text.splitlines() or [""]:
        print(f"    | {line}")


def _guess_source(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return "alertmanager"
    grafana = isinstance(data, dict) and ("orgId" in data or "state" in data or data.get("version") == "1")
    return "grafana" if grafana else "alertmanager"


def cmd_render(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    if args.payload is None:
        return _render_send(args, cfg)
    try:
        body = Path(args.payload).read_bytes()
    except OSError as exc:
        print(f"--payload: cannot read {args.payload!r}: {exc.strerror}", file=sys.stderr)
        return 1
    source = args.source or _guess_source(body)
    try:
        notification = parse_webhook(body, source)
    except InvalidPayload as exc:
        print(f"{args.payload}: {exc.reason}", file=sys.stderr)
        return 1
    now = _render_time(args)
    snap = Snapshot.build(cfg)
    plan = plan_notification(notification, "-", snap, now)
    plan = with_refs(plan, range(1, refs_wanted(plan, snap) + 1), snap, now)  # two-way: " #1", " #2" …
    throttle = _throttle_text(cfg)

    if args.json:
        out: dict[str, Any] = {
            "source": source,
            "alerts": len(notification.alerts),
            "dryRun": cfg.dry_run,
            "messages": [
                {**_message_json(m, snap, now), "status": str(m.status)}
                for m in plan.messages
            ],
            "throttle": throttle,
            "unrouted": [dict(a.labels) for a in plan.routing.unrouted],
            "filtered": [dict(a.labels) for a in plan.routing.filtered],
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0

    print(f"source: {source}, {len(notification.alerts)} alert(s), "
          f"{len(plan.messages)} message(s){' — DRY-RUN: no API key configured' if cfg.dry_run else ''}")
    for m in plan.messages:
        group = cfg.groups_by_id[m.group_id]
        print()
        print(f"group {m.group_id}" + (f" ({group.name})" if group.name else "")
              + f": level {m.level}, {m.status}, {m.alert_count} alert(s), template {group.template}")
        _print_message(m, snap, now, throttle)
    for title, alerts in (("matched no route", plan.routing.unrouted),
                          ("taken by no matched group (level or send_resolved)", plan.routing.filtered)):
        if alerts:
            print(f"\n{len(alerts)} alert(s) {title}: "
                  + ", ".join(a.labels.get("alertname", "?") for a in alerts))
    return 0


def _render_time(args: argparse.Namespace) -> float:
    if args.now:
        return datetime.fromisoformat(args.now.replace("Z", "+00:00")).timestamp()
    from receiver.clock import SystemClock

    return SystemClock().now()


def _render_send(args: argparse.Namespace, cfg: Config) -> int:
    """``render --send '[{…}]'`` / ``--send-file``: what ``POST /send`` would store for each item,
    from the same code (:func:`receiver.send.plan_item`). Exit 1 when an item would be refused
    (the endpoint's 422 for that item), with the reason."""
    from receiver.ingest import parse_send
    from receiver.send import plan_item

    if args.send is not None:
        body, where = args.send.encode(), "--send"
    else:
        where = "--send-file"
        try:
            body = Path(args.send_file).read_bytes()
        except OSError as exc:
            print(f"--send-file: cannot read {args.send_file!r}: {exc.strerror}", file=sys.stderr)
            return 1
    try:
        items = parse_send(body)
    except InvalidPayload as exc:
        print(f"{where}: {exc.reason}", file=sys.stderr)
        return 1
    now = _render_time(args)
    snap = Snapshot.build(cfg)
    planned = [(i, item, plan_item(item, snap, now, "-")) for i, item in enumerate(items)]
    throttle = _throttle_text(cfg)

    def group_id(item: Any) -> str | None:
        return getattr(item, "groupId", None)

    if args.json:
        out = {
            "source": "send",
            "items": len(items),
            "dryRun": cfg.dry_run,
            "messages": [
                {
                    "index": i,
                    **_message_json(m, snap, now),
                    "template": (item.template or cfg.groups_by_id[m.group_id].send_template)
                    if item.useTemplate else None,
                }
                for i, item, m in planned if not isinstance(m, str)
            ],
            "rejected": [{"index": i, "groupId": group_id(item), "error": m}
                         for i, item, m in planned if isinstance(m, str)],
            "throttle": throttle,
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 1 if out["rejected"] else 0

    accepted = sum(not isinstance(m, str) for _, _, m in planned)
    print(f"source: send, {len(items)} item(s), {accepted} message(s)"
          f"{' — DRY-RUN: no API key configured' if cfg.dry_run else ''}")
    for i, item, m in planned:
        print()
        if isinstance(m, str):
            print(f"item {i} (groupId {group_id(item)!r}): REJECTED (422): {m}")
            continue
        group = cfg.groups_by_id[m.group_id]
        what = (f"send template {item.template or group.send_template}" if item.useTemplate
                else "message" + (" with variables" if item.variables else ""))
        print(f"item {i}: group {m.group_id}" + (f" ({group.name})" if group.name else "")
              + f": level {m.level}, {what}")
        _print_message(m, snap, now, throttle)
    return 0 if accepted == len(items) else 1


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sms-receiver", description="SMS paging receiver for Alertmanager and Grafana."
    )
    parser.add_argument("--version", action="version", version=f"sms-receiver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the receiver")
    run.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    run.add_argument("--listen", help="HOST:PORT, overriding the config's listen")
    run.add_argument("--log-format", choices=("text", "json"), help="overrides the config's log_format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     help="overrides the config's log_level (default info; debug also logs every "
                     "accepted webhook)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", help="the config file to check (as run would load it, TLS files included)")
    check.set_defaults(func=cmd_check_config)

    render = sub.add_parser("render", help="print the SMS a payload (or /send items) would produce; "
                            "sends nothing")
    render.add_argument("--config", required=True, help="the config file whose routes and templates apply")
    what = render.add_mutually_exclusive_group(required=True)
    what.add_argument("--payload", help="a webhook body (JSON file)")
    what.add_argument("--send", metavar="JSON", help="a /send body: '[{\"groupId\": ID, \"useTemplate\": "
                      "true, \"variables\": {...}}]' (exit 1 when an item would be refused)")
    what.add_argument("--send-file", metavar="FILE", help="a /send body from a file")
    render.add_argument("--source", choices=("alertmanager", "grafana"),
                        help="default: guessed from the payload")
    render.add_argument("--now", help="RFC 3339 time to render at (default: now)")
    render.add_argument("--json", action="store_true", help="machine-readable output")
    render.set_defaults(func=cmd_render)

    fake = sub.add_parser("fake-clickatell", help="a local stand-in for Clickatell (for trying "
                          "the receiver and for tests; the fake_clickatell package)")
    fake.set_defaults(func=lambda args: _fake_clickatell([]))
    return parser


def _fake_clickatell(argv: list[str]) -> int:
    """The fake lives outside the runtime package, in ``fake_clickatell``: imported only for
    this command, which hands it its own arguments."""
    import fake_clickatell

    return fake_clickatell.main(argv)


def main(argv: list[str] | None = None) -> int:
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # process-wide: no "_created" twin of every counter and histogram
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-clickatell"]:
        return _fake_clickatell(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


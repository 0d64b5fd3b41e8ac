"""Crashes and faults against the real receiver process: kill -9, power loss, a second process on
the same file, a full disk, a failed fsync.

The promise under test: a webhook answered 2xx (or a ``/send`` answered 202) is delivered to
every recipient, whatever happens to the process or the disk afterwards; and an SMS Clickatell
accepted is sent again only when the process died between Clickatell's acceptance and the
commit of that result (the one at-least-once window). Each test counts, per (clientMessageId,
recipient), the copies the fake Clickatell received against the copies that window allows.

Faults on the disk come from tests/faults/faultfs.c, an LD_PRELOAD shim on SQLite's write, pwrite
and fsync calls (see its header), compiled once per session.

Seeds: ``CRASH_SEED=<n> pytest tests/test_crash.py`` replays the random choices of a run (each
test prints the seed it used, and names it when it fails): what each round does to Clickatell,
when it kills. Where a kill lands also depends on timing, which no seed replays.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_KEY, Fake, eventually
from tests.helpers import BASE
from tests.tools import (
    DB_MEMBERS,
    Outbox,
    ReceiverProcess,
    alert_body,
    free_port,
    need,
    read_outbox,
    receiver_config,
)

JSON = {"Content-Type": "application/json"}
FAULTS = Path(__file__).parent / "faults"
DISPATCH = {"retry_initial": "50ms", "retry_max": "300ms", "poll_interval": "100ms"}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def faultfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/faults/faultfs.c, compiled: the path of the shared object to LD_PRELOAD."""
    gcc = need("gcc", "gcc libc6-dev")
    out = tmp_path_factory.mktemp("faultfs") / "faultfs.so"
    r = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out),
                        str(FAULTS / "faultfs.c"), "-ldl"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out)


def shim(faultfs: str, data: Path, *, shadow: Path | None = None,
         control: Path | None = None) -> dict[str, str]:
    """The environment that puts the shim between the receiver and its data directory."""
    env = {"LD_PRELOAD": faultfs, "FAULTFS_DATA": str(data.resolve())}
    if shadow is not None:
        env["FAULTFS_SHADOW"] = str(shadow.resolve())
    if control is not None:
        env["FAULTFS_CONTROL"] = str(control.resolve())
    return env


def seeded(request: pytest.FixtureRequest) -> tuple[int, random.Random]:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 32))
    print(f"{request.node.name}: seed {seed} (CRASH_SEED={seed} replays it)")
    return seed, random.Random(seed)


def make_receiver(tmp_path: Path, fake: Fake, data: Path | None = None, **dispatch: Any) -> ReceiverProcess:
    """A receiver process (not started) whose outbox is ``<data>/outbox.db`` (default: tmp_path),
    sending to the fake with a timeout far above any delay the fake is given here."""
    data = data or tmp_path
    data.mkdir(parents=True, exist_ok=True)
    config = receiver_config(
        tmp_path, fake.url, {**DISPATCH, **dispatch},
        storage=f"sqlite://{data}/outbox.db",
        clickatell={"api_key": API_KEY, "base_url": fake.url, "timeout": "10s"},
        # the db group is two-way: its pages (refs, page alerts) are written in the same
        # transactions the kills interrupt
        groups=[{**g, "two_way": True} if g["id"] == "db" else g for g in BASE["groups"]],
    )
    return ReceiverProcess(config, free_port(), tmp_path / "receiver.log")


async def healthy_fake(fake: Fake, http: aiohttp.ClientSession) -> None:
    await fake.mode(http, fail_next={}, delay=0, answer_delay=0, global_error=None)


async def post_webhook(http: aiohttp.ClientSession, url: str, name: str,
                       bulk: int = 0) -> tuple[int, dict[str, Any] | str]:
    async with http.post(f"{url}/webhook/alertmanager", data=alert_body(name, bulk), headers=JSON) as r:
        text = await r.text()
        return r.status, (json.loads(text) if r.content_type == "application/json" else text)


async def accepted(http: aiohttp.ClientSession, url: str, name: str) -> str:
    """Post a webhook that must be answered 2xx; its notification id."""
    status, body = await post_webhook(http, url, name)
    assert status == 200 and isinstance(body, dict) and body["status"] == "accepted", (status, body)
    return str(body["notification"])


async def status_of(http: aiohttp.ClientSession, url: str, path: str) -> int:
    async with http.get(f"{url}{path}") as r:
        await r.read()
        return r.status


async def message_state(http: aiohttp.ClientSession, url: str, message_id: str) -> str | None:
    async with http.get(f"{url}/api/v1/messages/{message_id}") as r:
        return (await r.json())["state"] if r.status == 200 else None


def message_of(fake: Fake, notification_id: str) -> str:
    """The one message id the fake has seen of a notification."""
    (mid,) = {m["clientMessageId"] for m in of(fake, notification_id)}
    return mid


async def until_state(http: aiohttp.ClientSession, url: str, message_id: str, state: str,
                      timeout: float) -> None:
    async def reached() -> bool:
        return await message_state(http, url, message_id) == state

    await eventually(reached, timeout=timeout)


def copies(fake: Fake) -> Counter[tuple[str, str]]:
    """SMS the fake accepted, per (clientMessageId, recipient)."""
    return Counter((m["clientMessageId"], m["to"]) for m in fake.state.messages)


def of(fake: Fake, prefix: str) -> list[dict[str, Any]]:
    """SMS the fake accepted for a message id (or the messages of a notification id)."""
    return [m for m in fake.state.messages if m["clientMessageId"].startswith(prefix)]


def per_member(fake: Fake, message_id: str) -> dict[str, int]:
    """Copies of one message, per recipient."""
    return {to: n for (m, to), n in copies(fake).items() if m == message_id}


def undelivered(fake: Fake, ids: Iterable[str]) -> list[str]:
    """Of notification ids (their messages' ids start with it) and /send message ids: those
    that did not reach every member of group "db" yet."""
    reached: dict[str, set[str]] = defaultdict(set)
    for m in fake.state.messages:
        reached[m["clientMessageId"][:27]].add(m["to"])
    return [i for i in ids if not reached[i] >= set(DB_MEMBERS)]


async def delivered(fake: Fake, ids: Iterable[str], timeout: float) -> None:
    ids = list(ids)

    async def done() -> bool:
        return not undelivered(fake, ids)

    try:
        await eventually(done, timeout=timeout)
    except AssertionError:
        missing = undelivered(fake, ids)
        raise AssertionError(f"{len(missing)} of {len(ids)} answered pages never reached both "
                             f"members: {missing[:10]}") from None


async def no_send_in_flight(fake: Fake) -> None:
    """Wait until the fake has answered every send it received: after a kill, what it will ever
    accept from the dead process is in its list."""

    async def idle() -> bool:
        return fake.state.in_flight == 0

    await eventually(idle, timeout=15)


@dataclass
class Ledger:
    """The duplicate budget. A kill allows one more copy of each (clientMessageId, recipient)
    Clickatell had accepted and the dead process's file did not record: the restarted process
    sends it again. Only of those Clickatell accepted a copy of since the previous kill, though:
    one still unrecorded from an earlier kill, not sent again since (Clickatell was down), was
    allowed its copy at that kill already. This is tighter than counting every kill at which a
    pair is unrecorded, and implies it."""

    allowed: Counter[tuple[str, str]] = field(default_factory=Counter)
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)  # copies at the last kill
    kills: int = 0

    def killed(self, fake: Fake, outbox: Outbox) -> set[tuple[str, str]]:
        """Call once the fake has answered every send of the dead process (no_send_in_flight).
        Returns the pairs whose copy of this round the dead process did not record."""
        self.kills += 1
        now = copies(fake)
        at_risk = {pair for pair, n in now.items() if n > self.seen[pair]} - outbox.recorded
        self.allowed.update(at_risk)
        self.seen = now
        return at_risk

    def check(self, fake: Fake, seed: int | None = None) -> tuple[int, int]:
        """Once everything is delivered and recorded: assert no copy beyond the budget, and that
        the budget was used up (what the file did not record was sent again: the receiver
        cannot know Clickatell had it). Returns (duplicates, duplicates the kills allowed)."""
        sent = copies(fake)
        over = {pair: (n, 1 + self.allowed[pair]) for pair, n in sent.items()
                if n > 1 + self.allowed[pair]}
        assert not over, (f"(copies, allowed) of SMS sent more often than the crash windows allow "
                          f"(seed {seed}): {dict(list(over.items())[:10])}")
        under = {pair: (n, 1 + self.allowed[pair]) for pair, n in sent.items()
                 if n < 1 + self.allowed[pair]}
        assert not under, (f"(copies, expected) of SMS accepted by Clickatell, not recorded, and "
                           f"not sent again after the kill (seed {seed}): {dict(list(under.items())[:10])}")
        return sum(n - 1 for n in sent.values()), sum(self.allowed.values())


@dataclass
class Load:
    """Webhooks (and /send items) posted by a few concurrent connections until ``stop``; what
    was answered. A request the receiver did not answer (killed) counts as not answered."""

    http: aiohttp.ClientSession
    url: str
    tag: str
    rng: random.Random
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    notifications: dict[str, str] = field(default_factory=dict)  # answered 2xx: id -> alertname
    sends: list[str] = field(default_factory=list)  # /send message ids answered 202
    refused: int = 0  # answered 5xx
    unanswered: int = 0  # no answer: the connection broke or was refused
    in_flight: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, webhook_connections: int = 3, send_connections: int = 1,
              limit: int = 150, pause: float = 0.01) -> None:
        for c in range(webhook_connections):
            self.tasks.append(asyncio.create_task(self._webhooks(f"{self.tag}w{c}", limit, pause)))
        for c in range(send_connections):
            self.tasks.append(asyncio.create_task(self._sends(f"{self.tag}s{c}", limit // 3, pause * 4)))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    @property
    def answered(self) -> list[str]:
        return [*self.notifications, *self.sends]

    async def _post(self, path: str, body: bytes) -> tuple[int, Any] | None:
        self.in_flight += 1
        try:
            async with self.http.post(f"{self.url}{path}", data=body, headers=JSON) as r:
                text = await r.text()
                return r.status, (json.loads(text) if r.content_type == "application/json" else text)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.unanswered += 1
            return None
        finally:
            self.in_flight -= 1

    async def _webhooks(self, tag: str, limit: int, pause: float) -> None:
        for i in range(limit):
            if self.stop.is_set():
                return
            name = f"Crash{tag}n{i}"
            answer = await self._post("/webhook/alertmanager", alert_body(name))
            if answer is None:
                return  # the receiver is gone
            status, body = answer
            if status == 200:
                assert body["status"] == "accepted", body
                self.notifications[body["notification"]] = name
            elif status == 503:
                self.refused += 1
            else:
                raise AssertionError(f"webhook answered {status}: {body}")
            await asyncio.sleep(self.rng.uniform(0, pause))

    async def _sends(self, tag: str, limit: int, pause: float) -> None:
        for i in range(limit):
            if self.stop.is_set():
                return
            item = [{"groupId": "db", "message": f"crash test /send {tag}n{i}"}]
            answer = await self._post("/send", json.dumps(item).encode())
            if answer is None:
                return
            status, body = answer
            if status == 202:
                self.sends.append(body["results"][0]["messageId"])
            elif status == 503:
                self.refused += 1
            else:
                raise AssertionError(f"/send answered {status}: {body}")
            await asyncio.sleep(self.rng.uniform(0, pause))


def summary(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}")


# ---------------------------------------------------------------------------------------------
# 1. kill -9, twenty times, at random moments


ROUNDS = 20
KINDS = ("healthy", "flaky", "slow", "window", "down")


@pytest.mark.timeout(170)
async def test_kill9_rounds_deliver_every_answered_page_and_resend_only_the_window(
        tmp_path: Path, fake: Fake, http: aiohttp.ClientSession, request, capsys):
    seed, rng = seeded(request)
    rx = make_receiver(tmp_path, fake)
    db = tmp_path / "outbox.db"
    ledger = Ledger()
    answered: list[str] = []
    landed: Counter[str] = Counter()  # where the kills landed

    async def killed(n: int, load: Load | None) -> tuple[Outbox, set[tuple[str, str]]]:
        """After a kill: what the file holds, checked against what was answered."""
        if load is not None:
            await load.finish()
        await no_send_in_flight(fake)
        outbox = read_outbox(db)
        unrecorded = ledger.killed(fake, outbox)
        lost = [i for i in answered + (load.answered if load else []) if not outbox.holds(i)]
        assert not lost, f"round {n} (seed {seed}): answered, then not in the file: {lost[:10]}"
        return outbox, unrecorded

    kinds = [KINDS[i % len(KINDS)] for i in range(ROUNDS)]  # each as often, in a random order
    rng.shuffle(kinds)
    at_startup = set(rng.sample(range(ROUNDS), ROUNDS // 5))  # an extra kill as it starts
    in_shutdown = set(rng.sample(range(ROUNDS), ROUNDS // 5))  # SIGTERM, then kill -9
    try:
        for n, kind in enumerate(kinds):
            await healthy_fake(fake, http)
            if kind == "flaky":  # Clickatell fails, then recovers mid-round
                await fake.mode(http, fail_next={"count": rng.randint(5, 30), "status": 503})
            elif kind == "slow":
                await fake.mode(http, delay=rng.uniform(0.02, 0.2))
            elif kind == "window":  # a long time between accepting and answering
                await fake.mode(http, answer_delay=rng.uniform(0.2, 0.6))
            elif kind == "down":  # the round's pages wait in the outbox
                await fake.mode(http, fail_next={"count": 1_000_000, "status": 503})
            if n in at_startup:  # killed while it starts: opening, recovering, releasing claims
                rx.spawn()
                await asyncio.sleep(rng.uniform(0.05, 0.7))
                rx.kill9()
                await killed(n, None)
                landed["startup"] += 1
            await rx.start(http)
            load = Load(http, rx.url, f"r{n}", random.Random(rng.getrandbits(64)))
            load.start()
            if kind == "window":  # kill while a send waits for its answer, at least some of the time

                async def sending() -> bool:
                    return fake.state.in_flight > 0

                with_send = rng.random() < 0.7
                if with_send:
                    await eventually(sending, timeout=10)
                await asyncio.sleep(rng.uniform(0.0, 0.3) if with_send else rng.uniform(0.1, 1.2))
            else:
                await asyncio.sleep(rng.uniform(0.1, 1.2))
            assert rx.running, f"round {n}: the receiver died before the kill:\n{rx.log_text()[-3000:]}"
            accepting, sending_now = load.in_flight, fake.state.in_flight
            shutdown = n in in_shutdown
            if shutdown:  # killed while it shuts down (finishing requests and sends in flight)
                assert rx.proc is not None
                rx.proc.terminate()
                await asyncio.sleep(rng.uniform(0.0, 0.2))
            rx.kill9()
            outbox, unrecorded = await killed(n, load)
            answered += load.answered
            landed.update({"accept": accepting > 0, "plan": bool(outbox.notifications),
                           "send": sending_now > 0 or bool(unrecorded), "shutdown": shutdown})
            print(f"round {n:2} {kind:8}{' (killed at startup first)' * (n in at_startup)} answered {len(load.answered):3} refused {load.refused} "
                  f"unanswered {load.unanswered} | at the kill{' (shutting down)' * shutdown}: "
                  f"webhooks in flight {accepting}, unplanned {len(outbox.notifications)}, sends "
                  f"in flight {sending_now}, SMS accepted and unrecorded {len(unrecorded)}")

        await healthy_fake(fake, http)
        await rx.start(http)
        await delivered(fake, answered, timeout=60)

        async def drained() -> bool:
            async with http.get(f"{rx.url}/api/v1/status") as r:
                outbox = (await r.json())["outbox"]
            return outbox["pending"] == 0

        await eventually(drained, timeout=20)
        rx.stop()
        assert rx.proc is not None and rx.proc.returncode == 0, rx.log_text()[-3000:]
        final = read_outbox(db)
        assert not final.notifications and set(final.states) == {"sent"}, final.states
        duplicates, allowed = ledger.check(fake, seed)
        assert len(set(answered)) == len(answered)
        summary(capsys, f"kill -9: {ROUNDS} rounds, {ledger.kills} kills (seed {seed}): "
                        f"{len(answered)} webhooks and /send answered, all delivered; "
                        f"{len(fake.state.messages)} SMS, {duplicates} duplicates ({allowed} "
                        f"allowed by the kills); kills with webhooks in flight {landed['accept']}, "
                        f"with unplanned notifications {landed['plan']}, in a send "
                        f"{landed['send']}, at startup {landed['startup']}, in a shutdown "
                        f"{landed['shutdown']}")
        assert landed["send"] > 0, "no kill landed in a send"
    finally:
        rx.stop()


# ---------------------------------------------------------------------------------------------
# 2. The at-least-once window, and nothing outside it


async def test_kill_between_accepted_and_answered_sends_once_more(tmp_path: Path, fake: Fake, http):
    # A short lease, but longer than the fake's answer: a claim that runs out while its send
    # waits is another matter (test_send_slower_than_the_lease_is_not_sent_twice).
    rx = make_receiver(tmp_path, fake, lease="5s")
    await fake.mode(http, answer_delay=3.0)
    try:
        await rx.start(http)
        nid = await accepted(http, rx.url, "WindowKill")

        async def accepted_by_clickatell() -> bool:
            return {m["to"] for m in of(fake, nid)} == set(DB_MEMBERS)

        await eventually(accepted_by_clickatell, timeout=10)
        assert fake.state.in_flight == 1  # the receiver is waiting for the answer
        rx.kill9()
        outbox = read_outbox(tmp_path / "outbox.db")
        mid = message_of(fake, nid)
        assert outbox.states == {"sending": 1} and not outbox.recorded  # accepted, not recorded

        await rx.start(http)  # the answer is still 3 s away for the new send too

        await until_state(http, rx.url, mid, "sent", timeout=20)
        assert copies(fake) == {(mid, to): 2 for to in DB_MEMBERS}  # one more, not more
        # and not a third one later: another page goes through the dispatcher after it
        await fake.mode(http, answer_delay=0)
        later = await accepted(http, rx.url, "WindowKillLater")
        await delivered(fake, [later], timeout=10)
        assert per_member(fake, mid) == {to: 2 for to in DB_MEMBERS}
    finally:
        rx.stop()


async def test_kill_after_result_recorded_sends_nothing_again(tmp_path: Path, fake: Fake, http):
    rx = make_receiver(tmp_path, fake, lease="1s")
    try:
        await rx.start(http)
        nid = await accepted(http, rx.url, "RecordedKill")
        await delivered(fake, [nid], timeout=10)
        mid = message_of(fake, nid)

        await until_state(http, rx.url, mid, "sent", timeout=10)
        rx.kill9()
        assert read_outbox(tmp_path / "outbox.db").recorded == {(mid, to) for to in DB_MEMBERS}
        await rx.start(http)
        later = await accepted(http, rx.url, "RecordedKillLater")
        await delivered(fake, [later], timeout=10)  # the dispatcher has been round since the restart
        await no_send_in_flight(fake)
        assert per_member(fake, mid) == {to: 1 for to in DB_MEMBERS}
        assert set(copies(fake).values()) == {1} and len(fake.state.messages) == 4
    finally:
        rx.stop()


async def test_send_slower_than_the_lease_is_not_sent_twice(tmp_path: Path, fake: Fake, http):
    """One process, no crash: a message whose send takes longer than ``dispatch.lease`` (a slow
    Clickatell, within clickatell.timeout) must not be claimed and sent again meanwhile."""
    rx = make_receiver(tmp_path, fake, lease="1s")
    await fake.mode(http, answer_delay=2.5)
    try:
        await rx.start(http)
        nid = await accepted(http, rx.url, "SlowerThanLease")
        await delivered(fake, [nid], timeout=10)
        mid = message_of(fake, nid)

        await until_state(http, rx.url, mid, "sent", timeout=20)
        await fake.mode(http, answer_delay=0)
        later = await accepted(http, rx.url, "SlowerThanLeaseLater")
        await delivered(fake, [later], timeout=10)
        await no_send_in_flight(fake)
        assert per_member(fake, mid) == {to: 1 for to in DB_MEMBERS}
    finally:
        rx.stop()


# ---------------------------------------------------------------------------------------------
# 3. Power loss: only what was fsync'd survives


def power_loss(data: Path, shadow: Path) -> tuple[list[str], int]:
    """Replace the outbox's files in ``data`` by the shim's shadow copies: what the disk held
    after a power loss. Returns the files left, and how many of the dead process's 4 KiB
    pages of them were not synced (dropped)."""
    dropped = 0
    for name in ("outbox.db", "outbox.db-wal"):
        if (data / name).exists():
            now = (data / name).read_bytes()
            synced = (shadow / name).read_bytes() if (shadow / name).exists() else b""
            dropped += sum(now[i:i + 4096] != synced[i:i + 4096] for i in range(0, len(now), 4096))
    for f in data.iterdir():
        if f.name.startswith("outbox.db"):  # the file, its WAL, its -shm, its lock
            f.unlink()
    kept = []
    for name in ("outbox.db", "outbox.db-wal"):
        if (shadow / name).exists():
            shutil.copyfile(shadow / name, data / name)
            kept.append(name)
    return kept, dropped


@pytest.mark.timeout(120)
async def test_power_loss_keeps_every_answered_page(tmp_path: Path, fake: Fake, http, request,
                                                    faultfs: str, capsys):
    seed, rng = seeded(request)
    data, shadow = tmp_path / "data", tmp_path / "shadow"
    shadow.mkdir()
    rx = make_receiver(tmp_path, fake, data)
    env = shim(faultfs, data, shadow=shadow)
    ledger = Ledger()
    answered: list[str] = []
    rounds = 3
    try:
        for n in range(rounds):
            await healthy_fake(fake, http)  # slow, and failing now and then: pages wait
            await fake.mode(http, delay=rng.uniform(0.02, 0.1),
                            fail_next={"count": rng.randint(5, 40), "status": 503})
            await rx.start(http, env=env)
            load = Load(http, rx.url, f"p{n}", random.Random(rng.getrandbits(64)))
            load.start()
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            assert rx.running, f"the receiver died under the shim:\n{rx.log_text()[-3000:]}"
            rx.kill9()
            await load.finish()
            await no_send_in_flight(fake)
            kept, dropped = power_loss(data, shadow)
            assert "outbox.db" in kept, "the shim copied nothing: it is not between SQLite and the disk"
            outbox = read_outbox(data / "outbox.db")
            answered += load.answered
            lost = [i for i in answered if not outbox.holds(i)]
            assert not lost, (f"round {n} (seed {seed}): answered, and not in what was synced: "
                              f"{lost[:10]} of {len(answered)}")
            unrecorded = ledger.killed(fake, outbox)
            print(f"power loss {n}: answered {len(load.answered)}, unsynced pages dropped "
                  f"{dropped}, unplanned at the loss {len(outbox.notifications)}, SMS accepted "
                  f"and unrecorded {len(unrecorded)}")
        await healthy_fake(fake, http)
        await rx.start(http)  # without the shim: the synced files, recovered by SQLite
        await delivered(fake, answered, timeout=60)
        duplicates, allowed = ledger.check(fake, seed)
        summary(capsys, f"power loss: {rounds} rounds (seed {seed}), {len(answered)} answered, all "
                        f"delivered; {len(fake.state.messages)} SMS, {duplicates} duplicates "
                        f"({allowed} allowed)")
    finally:
        rx.stop()


# ---------------------------------------------------------------------------------------------
# 4. A second process on the same file


async def test_second_process_on_the_same_file_refuses_to_start(tmp_path: Path, fake: Fake, http):
    first = make_receiver(tmp_path, fake)
    second = ReceiverProcess(first.config, free_port(), tmp_path / "second.log")
    db = tmp_path / "outbox.db"
    answered: list[str] = []
    try:
        await first.start(http)
        answered.append(await accepted(http, first.url, "TwoProcesses0"))
        second.spawn()
        # the first keeps answering while the second starts and gives up
        i = 1
        while second.running and i < 200:
            answered.append(await accepted(http, first.url, f"TwoProcesses{i}"))
            i += 1
        assert await second.exited(timeout=20) != 0
        log = second.log_text()
        assert f"storage {db} is in use by another sms-receiver (pid {first.pid}" in log, log
        for j in range(i, i + 5):
            answered.append(await accepted(http, first.url, f"TwoProcesses{j}"))
        await delivered(fake, answered, timeout=20)
        assert first.running
        assert max(copies(fake).values()) == 1
    finally:
        second.stop()
        first.stop()


# ---------------------------------------------------------------------------------------------
# 5. A full disk


async def dispatcher_ran_after(http: aiohttp.ClientSession, url: str, at: float) -> bool:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("sms_receiver_dispatcher_last_run_timestamp_seconds "):
            return float(line.split()[1]) > at
    return False


async def result_kept(http: aiohttp.ClientSession, rx: ReceiverProcess, fake: Fake, control: Path,
                      name: str, fault: str) -> tuple[str, float]:
    """Accept a webhook, switch ``fault`` on while Clickatell holds the answer to its send, and
    wait until the receiver keeps the result it could not record: its message id, and when it
    was claimed."""
    nid = await accepted(http, rx.url, name)

    async def sending() -> bool:
        return fake.state.in_flight > 0 and len(of(fake, nid)) == 2

    await eventually(sending, timeout=10)
    control.write_text(fault)  # Clickatell has accepted; its answer is on the way
    mid = message_of(fake, nid)
    claimed_before = min(m["received_at"] for m in of(fake, nid))
    await no_send_in_flight(fake)

    async def kept() -> bool:
        return f"could not record the result of message {mid}" in rx.log_text()

    await eventually(kept, timeout=10)
    return mid, claimed_before


async def test_disk_full_while_sending_records_later_and_sends_once(
        tmp_path: Path, fake: Fake, http, faultfs: str):
    data, control = tmp_path / "data", tmp_path / "faults"
    control.write_text("")
    lease = 2.0  # longer than the fake's answer (see test_send_slower_than_the_lease...)
    rx = make_receiver(tmp_path, fake, data, lease=f"{lease}s")
    await fake.mode(http, answer_delay=1.5)
    try:
        await rx.start(http, env=shim(faultfs, data, control=control))
        mid, claimed_before = await result_kept(http, rx, fake, control, "FullWhileSending", "ENOSPC")
        status, body = await post_webhook(http, rx.url, "FullWhileSendingRefused")
        assert status == 503, body
        # (readiness while the disk is full: test_readiness_stays_503_while_the_disk_is_full)
        assert await status_of(http, rx.url, "/-/healthy") == 200
        assert rx.running

        # the disk stays full past the message's lease, and the dispatcher goes round meanwhile:
        # a claim of it now would send it again
        async def lease_over() -> bool:
            return await dispatcher_ran_after(http, rx.url, claimed_before + lease + 0.2)

        await eventually(lease_over, timeout=10)
        status, body = await post_webhook(http, rx.url, "FullWhileSendingRefusedAgain")
        assert status == 503, body
        assert rx.running
        control.write_text("")

        await until_state(http, rx.url, mid, "sent", timeout=10)
        assert await status_of(http, rx.url, "/-/ready") == 200
        await fake.mode(http, answer_delay=0)
        later = await accepted(http, rx.url, "FullWhileSendingLater")
        await delivered(fake, [later], timeout=10)
        await no_send_in_flight(fake)
        assert copies(fake) == {(m, to): 1 for m in (mid, of(fake, later)[0]["clientMessageId"])
                                for to in DB_MEMBERS}
        assert f"result of message {mid} recorded" in rx.log_text()
        assert rx.running
    finally:
        rx.stop()


async def test_unrecordable_result_is_not_claimed_again_while_claims_work(
        tmp_path: Path, fake: Fake, http, faultfs: str):
    """A nearly full disk: the commit of a send's result fails (the shim refuses the writes of
    pages holding a recipient state 'accepted') while smaller ones, claims included, succeed. The
    message's lease runs out meanwhile; the dispatcher must still not claim it again."""
    data, control = tmp_path / "data", tmp_path / "faults"
    control.write_text("")
    lease = 2.0
    rx = make_receiver(tmp_path, fake, data, lease=f"{lease}s")
    await fake.mode(http, answer_delay=1.0)
    try:
        await rx.start(http, env=shim(faultfs, data, control=control))
        mid, claimed_before = await result_kept(http, rx, fake, control, "ResultDoesNotFit",
                                                "ENOSPC_IF=accepted")
        # other writes work: a webhook is stored, planned, claimed and sent (its result is kept too)
        other = await accepted(http, rx.url, "ResultDoesNotFitOther")
        await delivered(fake, [other], timeout=10)

        async def lease_over() -> bool:  # and the dispatcher went round after A's lease ran out
            return await dispatcher_ran_after(http, rx.url, claimed_before + lease + 0.3)

        await eventually(lease_over, timeout=10)
        await no_send_in_flight(fake)
        assert per_member(fake, mid) == {to: 1 for to in DB_MEMBERS}
        control.write_text("")

        await until_state(http, rx.url, mid, "sent", timeout=10)
        await fake.mode(http, answer_delay=0)
        later = await accepted(http, rx.url, "ResultDoesNotFitLater")
        await delivered(fake, [later], timeout=10)
        await no_send_in_flight(fake)
        assert set(copies(fake).values()) == {1} and len(copies(fake)) == 6
        assert rx.running
    finally:
        rx.stop()


async def test_readiness_stays_503_while_the_disk_is_full(tmp_path: Path, fake: Fake, http,
                                                           faultfs: str):
    data, control = tmp_path / "data", tmp_path / "faults"
    control.write_text("")
    rx = make_receiver(tmp_path, fake, data)
    try:
        await rx.start(http, env=shim(faultfs, data, control=control))
        control.write_text("ENOSPC")
        status, body = await post_webhook(http, rx.url, "ReadyWhileFull")
        assert status == 503, body
        refused_at = time.time()
        answers = []

        async def dispatcher_went_round_twice() -> bool:  # (poll_interval is 100ms)
            answers.append(await status_of(http, rx.url, "/-/ready"))
            return await dispatcher_ran_after(http, rx.url, refused_at + 0.25)

        await eventually(dispatcher_went_round_twice, timeout=10)
        answers.append(await status_of(http, rx.url, "/-/ready"))
        status, body = await post_webhook(http, rx.url, "ReadyWhileFullAgain")
        assert status == 503, body  # writes still fail ...
        assert set(answers) == {503}, answers  # ... and readiness must say so all along
        control.write_text("")

        async def ready() -> bool:
            return await status_of(http, rx.url, "/-/ready") == 200

        await eventually(ready, timeout=10)
        await delivered(fake, [await accepted(http, rx.url, "ReadyAfterFull")], timeout=10)
    finally:
        rx.stop()


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        reason = f"cannot mount a tmpfs: {r.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI runs as root and must)")
        pytest.skip(reason)


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(path: Path) -> int:
    """Write ``path`` until its file system has no room left; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


@pytest.mark.timeout(90)
async def test_real_full_tmpfs_answers_503_then_2xx_once_there_is_room(tmp_path: Path, fake: Fake, http):
    data = tmp_path / "tmpfs"
    mount_tmpfs(data, "16m")
    rx = make_receiver(tmp_path, fake, data)
    answered: list[str] = []
    try:
        await rx.start(http)
        answered += [await accepted(http, rx.url, f"BeforeFull{i}") for i in range(5)]
        filler = data / "filler"
        assert fill(filler) > 0
        # webhooks with a large annotation (not in the SMS text): the WAL must grow into the full
        # file system; a burst of them outruns the checkpoints that let it start over
        refused = 0
        for i in range(300):
            status, body = await post_webhook(http, rx.url, f"WhileFull{i}", bulk=200_000)
            if status == 200:
                answered.append(body["notification"])
            else:
                assert status == 503, body
                refused += 1
                break
        assert refused, "no webhook was refused on a full file system"
        assert await status_of(http, rx.url, "/-/healthy") == 200
        assert rx.running
        filler.unlink()

        async def stored_again() -> bool:  # Alertmanager retries the refused webhook
            status, body = await post_webhook(http, rx.url, f"WhileFull{i}", bulk=200_000)
            if status == 200:
                answered.append(body["notification"])
            return status == 200

        await eventually(stored_again, timeout=20)
        await delivered(fake, answered, timeout=30)
        await no_send_in_flight(fake)
        assert max(copies(fake).values()) == 1
        assert rx.running
    finally:
        rx.stop()
        unmount(data)


# ---------------------------------------------------------------------------------------------
# 6. A failed fsync: the process exits, and loses nothing answered


@pytest.mark.timeout(90)
async def test_failed_fsync_exits_and_loses_nothing_answered(tmp_path: Path, fake: Fake, http,
                                                             faultfs: str):
    data, control = tmp_path / "data", tmp_path / "faults"
    control.write_text("")
    rx = make_receiver(tmp_path, fake, data)
    # Clickatell is down: what is answered waits in the outbox through the fault
    await fake.mode(http, fail_next={"count": 1_000_000, "status": 503})
    try:
        await rx.start(http, env=shim(faultfs, data, control=control))
        answered = [await accepted(http, rx.url, f"BeforeFsyncFault{i}") for i in range(20)]
        control.write_text("EIO_FSYNC")
        load = Load(http, rx.url, "eio", random.Random(0))
        load.start(webhook_connections=3, send_connections=1, limit=1000, pause=0.02)
        code = await rx.exited(timeout=30)
        await load.finish()
        assert code == 1, rx.log_text()[-3000:]
        assert load.answered == [], "answered 2xx while every fsync failed"
        assert load.refused + load.unanswered > 0
        log = rx.log_text()
        assert "the outbox failed (disk I/O error); exiting with status 1" in log, log[-3000:]

        await healthy_fake(fake, http)
        await rx.start(http)  # no fault: the supervisor's restart
        await delivered(fake, answered, timeout=20)
        await no_send_in_flight(fake)
        assert max(copies(fake).values()) == 1
    finally:
        rx.stop()

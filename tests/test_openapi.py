"""The OpenAPI 3.1 document (receiver/openapi.json, issue 19 items 3 and 4): it lists exactly the
routes the app registers, it is served at /api/v1/openapi.json, and schemathesis runs it against a
live receiver (a real aiohttp server on 127.0.0.1 sending to the fake Clickatell): no 5xx, and
every answer matches its documented status, content type, headers and schema."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from fake_clickatell import FakeState
from fake_clickatell import create_app as create_fake_app
from receiver.app import Receiver
from receiver.config import load_config
from receiver.web import create_app, openapi_document
from tests.conftest import API_KEY
from tests.helpers import BASE

DOC: dict[str, Any] = json.loads(openapi_document())
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in DOC["paths"].items() for method in item if method in METHODS}


def registered(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path == "/{path}":  # web.py's catch-all that answers unknown paths 404/405: not an endpoint
            continue
        if route.method == "HEAD":  # aiohttp adds HEAD beside every GET (add_get's allow_head)
            continue
        routes.add((route.method, path))
    return routes


def test_the_document_lists_every_route_the_app_registers_and_no_other():
    app = create_app(Receiver(load_config(Path(__file__).parent.parent / "config.yaml", env={})))
    assert registered(app) == documented()


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_well_formed():
    assert DOC["openapi"].startswith("3.1.")
    for ref in _refs(DOC):  # every reference resolves
        node: Any = DOC
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    schemes = DOC["components"]["securitySchemes"]
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            assert op["operationId"] and op["responses"], (method, path)
            for requirement in op.get("security", []):
                assert set(requirement) <= set(schemes), (method, path)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(part[1:-1] for part in path.split("/") if part.startswith("{")), (method, path)
    import schemathesis
    from schemathesis.core.result import Err

    loaded = list(schemathesis.openapi.from_dict(DOC).get_all_operations())
    assert [str(op.err()) for op in loaded if isinstance(op, Err)] == []
    assert len(loaded) == len(documented())


# ---------------------------------------------------------------------------------------------
# A live receiver, in a thread of its own (schemathesis's calls are synchronous)


class Live:
    """The fake Clickatell and a receiver, on 127.0.0.1, served by an event loop in a thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []
        self.receiver: Receiver | None = None
        self.url = ""

    def start(self) -> Live:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _start(self) -> None:
        fake_url = await self._serve(create_fake_app(FakeState(api_keys=None)))
        config = self.tmp / "config.yaml"
        config.write_text(yaml.safe_dump({
            **BASE,
            "storage": f"sqlite://{self.tmp}/outbox.db",
            "clickatell": {"api_key": API_KEY, "base_url": fake_url, "timeout": "2s"},
            "dispatch": {"retry_initial": "20ms", "retry_max": "100ms", "poll_interval": "50ms"},
            "send_templates": {"page": "[PAGE] {name}"},
            "groups": [{**BASE["groups"][0], "send_template": "page"}, *BASE["groups"][1:]],
        }))
        self.receiver = Receiver(load_config(config), config_path=config)
        await self.receiver.start()
        self.url = await self._serve(create_app(self.receiver))

    async def _stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.receiver is not None:
            await self.receiver.stop()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("openapi")).start()
    yield server
    server.stop()


def test_the_document_is_served_open(live):
    import urllib.request

    with urllib.request.urlopen(f"{live.url}/api/v1/openapi.json", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert json.loads(r.read()) == DOC


def _checks() -> list[Any]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance,
            response_headers_conformance, response_schema_conformance]


def test_real_answers_match_the_document(live):
    """Requests as Alertmanager, Grafana, a /send script, Clickatell and an admin make them, so
    that the answers generated input rarely reaches (accepted items, stored messages, a page's
    detail) are checked against their schemas too."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(DOC)
    checks = _checks()

    def call(path: str, method: str, status: int, **case: Any) -> Any:
        response = schema[path][method].Case(**case).call_and_validate(
            base_url=live.url, checks=checks, timeout=10, allow_redirects=False)
        assert response.status_code == status, (method, path, response.text[:300])
        return response

    fixtures = Path(__file__).parent / "fixtures"
    am = json.loads((fixtures / "alertmanager-0.25-firing.json").read_text())
    assert call("/webhook/alertmanager", "POST", 200, body=am).json()["status"] == "accepted"
    assert call("/webhook/alertmanager", "POST", 200, body=am).json() == {"status": "duplicate"}
    call("/webhook/grafana", "POST", 200, body=json.loads((fixtures / "grafana-webhook-firing.json").read_text()))
    good = [{"groupId": "db", "useTemplate": True, "variables": {"name": "Ann"}},
            {"groupId": "web", "message": "plain"}]
    sent = call("/send", "POST", 202, body=good).json()
    call("/send", "POST", 207, body=[*good, {"groupId": "ghost", "message": "x"}])
    call("/send", "POST", 422, body=[{"groupId": "web", "useTemplate": True}])
    call("/send", "POST", 422, body={"groupId": "db", "useTemplate": True, "variables": {}})
    mid = sent["results"][0]["messageId"]
    call("/api/v1/messages/{id}", "GET", 200, path_parameters={"id": mid})
    call("/api/v1/messages/{id}", "GET", 404, path_parameters={"id": "nope"})
    assert call("/api/v1/messages", "GET", 200, query={"limit": 1000}).json()["messages"]
    call("/api/v1/messages", "GET", 400, query={"limit": 0})
    call("/api/v1/groups", "GET", 200)
    call("/api/v1/status", "GET", 200)
    call("/callbacks/clickatell/status", "POST", 200, body={"messageId": "unknown", "statusCode": 4},
         media_type="application/json")
    call("/callbacks/clickatell/status/{secret}", "GET", 200, path_parameters={"secret": "s"},
         query={"messageId": "unknown", "statusCode": "4"})
    call("/callbacks/clickatell/status", "GET", 400, query={"statusCode": "x"})
    call("/-/reload", "POST", 200)
    call("/-/healthy", "GET", 200)
    call("/-/ready", "GET", 200)
    call("/metrics", "GET", 200)
    call("/api/v1/openapi.json", "GET", 200)
    call("/ui", "GET", 302)
    call("/ui/", "GET", 200, query={"group": "db"})
    call("/ui/", "GET", 400, query={"level": "nope"})
    call("/ui/messages/{id}", "GET", 200, path_parameters={"id": mid})
    call("/ui/messages/{id}", "GET", 404, path_parameters={"id": "nope"})
    call("/ui/groups", "GET", 200)
    call("/ui/export.csv", "GET", 200)


OPERATIONS = sorted(documented(), key=lambda mp: (mp[1], mp[0]))
CASES = 100  # per operation and generation mode (200 an operation): ~25 operations × 2 × 100, about 75 s


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis(live, method, path, mode):
    """Generated requests for one operation: the receiver never answers 5xx, and every answer
    is documented and matches its schema. Bounded by CASES examples, derandomized (the same
    cases each run), no deadline (the machine is shared)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_dict(DOC)
    operation = schema[path][method]
    checks = _checks()
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    session = requests.Session()

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=live.url, session=session, checks=checks, timeout=10,
                             allow_redirects=False)

    try:
        run()
    except Unsatisfiable:
        # negative mode: every input of this operation is a free string (or there is none), so
        # there is no invalid request to make
        assert mode == "negative"
    finally:
        session.close()

"""The ceiling: an aiohttp handler that only parses the JSON body and answers 200."""

import json
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(text='{"status":"ok"}', content_type="application/json")


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/webhook/alertmanager", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)

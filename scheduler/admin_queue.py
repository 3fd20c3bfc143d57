"""GET /admin/queue: the requests waiting in the fair queue and running on nodes, with each user's
fair-share standing (scheduler.jobs, scheduler.fairness). Metadata only: no prompt or answer is ever
on the board, so none can be in this reply."""

from __future__ import annotations

from aiohttp import web

from scheduler.admin_http import admin_token, reply
from scheduler.state import ADMISSION, JOBS, SETTINGS


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/queue", queue)


async def queue(request: web.Request) -> web.Response:
    await admin_token(request)
    app = request.app
    return reply(app[JOBS].state(app[ADMISSION].standing, app[SETTINGS].max_queued))

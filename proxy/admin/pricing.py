"""The admin API's pricing routes: `GET /admin/pricing` (the table in force, a refused edit) and
`POST /admin/pricing/reload` (re-read the file now) over `pricing/live.py: LivePrices`.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin.routes import GuardedRoutes
from proxy.forwarding.responses import error_response, unknown_parameter
from proxy.pricing.live import LivePrices, Outcome

__all__ = ["admin_routes"]


def admin_routes(admin: GuardedRoutes, key: web.AppKey[LivePrices]) -> None:
    """Add `GET /pricing` and `POST /pricing/reload` to the admin sub-app, before its catch-all route.

    `key` names the `LivePrices` in the app (or a parent app: it is read through `config_dict`)."""

    async def show(request: web.Request) -> web.StreamResponse:
        if (refused := unknown_parameter(request.query, ())) is not None:
            return refused
        return web.json_response(request.config_dict[key].status())

    async def reload(request: web.Request) -> web.StreamResponse:
        live = request.config_dict[key]
        outcome = await live.refresh(force=True)
        if outcome is Outcome.REFUSED and live.error is not None:
            return error_response(400, f"pricing edit refused, version {live.version} stays in force: "
                                  f"{live.error.message}", "invalid_request_error", "invalid_pricing")
        return web.json_response({"reloaded": outcome is Outcome.LOADED, **live.summary()})

    admin.router.add_get("/pricing", show)
    admin.router.add_post("/pricing/reload", reload)

"""The app's routes, in the order Starlette tries them: none is hidden behind another.

api/main.py puts the busiest routers first (each request is matched against the routes in turn);
that is safe only while no route answers a path meant for one registered later."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute, Match

from api.main import app


def _flat(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        inner = getattr(route, "original_router", None)  # an included router
        yield from _flat(inner.routes) if inner is not None else [route]


def _sample(route: BaseRoute) -> dict[str, object]:
    path = re.sub(r"\{[^}]+\}", "x", getattr(route, "path", ""))
    if isinstance(route, APIWebSocketRoute):
        return {"type": "websocket", "path": path, "root_path": "", "headers": []}
    method = sorted(getattr(route, "methods", None) or {"GET"})[0]
    return {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}


def test_no_route_is_hidden_by_an_earlier_one() -> None:
    routes = list(_flat(app.router.routes))
    assert sum(isinstance(r, APIRoute) for r in routes) > 40  # the routers were walked
    for i, route in enumerate(routes):
        scope = _sample(route)
        assert route.matches(scope)[0] is Match.FULL, scope  # the sample is its own path
        earlier = [r for r in routes[:i] if r.matches(scope)[0] is Match.FULL]
        assert not earlier, f"{scope['path']} reaches {getattr(earlier[0], 'path', earlier[0])} first"


def test_the_busiest_routes_come_first() -> None:
    paths = [getattr(r, "path", "") for r in _flat(app.router.routes)]
    first = [p for p in paths if p.startswith("/v1/")][:3]
    assert {"/v1/chat/completions", "/v1/completions"} <= set(first)

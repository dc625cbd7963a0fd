"""`localmoe api`: one API process on api_host:api_port (uvicorn, with uvloop and httptools).

Several processes can share the port: with `reuse_port` each binds a socket of its own with
SO_REUSEPORT, and the kernel hashes every new connection onto one of them. The API keeps no state
of its own (jobs, streams and keys live in Redis), so any process can serve any request, and the
streams a box relays spread over its cores: one asyncio loop relays a few thousand token events a
second, a GPU makes tens of thousands. `localmoe up` runs `Settings.resolved_api_processes()`.
"""

from __future__ import annotations

import gc
import socket

import uvicorn

from host.settings import Settings


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


# The collector's youngest generation is examined every GC_GEN0 allocations (700 by default): a
# request makes a few thousand objects, nearly all freed by reference counting, so the default
# walks the young objects several times per request for cycles that are rarely there.
GC_GEN0 = 50_000


def serve(settings: Settings, reuse_port: bool = False) -> None:
    # What the imports made lives as long as the process: out of every collection from now on.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])
    config = uvicorn.Config(
        "api.main:app",
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level,
        access_log=settings.api_access_log,
    )
    uvicorn.Server(config).run(sockets=[bind(settings.api_host, settings.api_port, reuse_port)])

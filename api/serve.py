"""`localmoe api`: one API process on api_host:api_port (uvicorn, with uvloop and httptools).

Several processes can share the port: with `reuse_port` each binds a socket of its own with
SO_REUSEPORT, and the kernel hashes every new connection onto one of them. The API keeps no state
of its own (jobs, streams and keys live in Redis), so any process can serve any request, and the
streams a box relays spread over its cores: one asyncio loop relays a few thousand token events a
second, a GPU makes tens of thousands. `localmoe up` runs `Settings.resolved_api_processes()`.
"""

from __future__ import annotations

import socket

import uvicorn

from host.heap import freeze_heap
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


def serve(settings: Settings, reuse_port: bool = False) -> None:
    freeze_heap()  # what the imports made lives as long as the process
    config = uvicorn.Config(
        "api.main:app",
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level,
        access_log=settings.api_access_log,
    )
    uvicorn.Server(config).run(sockets=[bind(settings.api_host, settings.api_port, reuse_port)])

"""Fault injection for outage tests: a TCP proxy a test puts between the gateway and Redis or Postgres,
and cuts and restores at will.

``TcpProxy(host, port)`` listens on ``127.0.0.1:<port of its own>`` (port 0: no race with anyone) and
forwards every connection to ``host:port``. Two kinds of outage:

* ``cut()`` (``mode="reset"``) — the server is gone: every open connection is reset at once and every
  new one is accepted and reset, until :meth:`TcpProxy.restore`. Clients see errors immediately.
* ``cut(mode="hang")`` — the network is partitioned: open connections stop moving (their bytes wait in
  the kernel's buffers), new ones are accepted but not forwarded. Clients see nothing but their own
  timeouts; after ``restore()`` everything that waited flows on, as after a healed partition.

Invariants: once ``cut()`` returns, no new connection reaches the target and (reset) no open one
carries another byte; a hang may still let through the one chunk a pump was copying at that instant.
The proxy keeps its listening port throughout, so nobody else can take it during an outage.

``drip(interval)`` is a third fault, for the other direction of a call: what the target sends reaches
the client one byte every ``interval`` seconds (an upstream drip-feeding its answer, headers included).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

Mode = Literal["reset", "hang"]
_POLL_S = 0.1  # how often idle threads look at the proxy's state


def _shutdown(sock: socket.socket) -> None:
    """Stop a socket at once, also from another thread than its pump's (which then notices and closes
    it); with SO_LINGER 0 its close sends an RST, as a crashed server's kernel would."""
    # OSError: already shut down, closed or never connected — stopped either way
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    _shutdown(sock)
    sock.close()


class TcpProxy:
    """A TCP proxy that can be cut and restored. Use as a context manager, or call :meth:`close`."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._mode: Mode | None = None
        self._closed = False
        self._sockets: set[socket.socket] = set()  # every open client and upstream socket
        self.accepted = 0                            # connections accepted since start
        self._drip: float | None = None              # seconds between the target's bytes, if dripping
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name=f"tcpproxy:{self.port}")
        self._acceptor.start()

    # -- control -------------------------------------------------------------------------------------
    def cut(self, mode: Mode = "reset") -> None:
        """Start an outage (see the module docstring). Cutting again changes the mode."""
        with self._lock:
            self._mode = mode
            self._flowing.clear()
            doomed = list(self._sockets) if mode == "reset" else []
        for sock in doomed:
            _shutdown(sock)

    def restore(self) -> None:
        """End the outage: new connections are forwarded again (and held ones flow on)."""
        with self._lock:
            self._mode = None
            self._flowing.set()

    def drip(self, interval: float | None) -> None:
        """From now on pass what the target sends one byte every ``interval`` s (None: full speed)."""
        self._drip = interval

    @property
    def is_cut(self) -> bool:
        return not self._flowing.is_set()

    def url(self, url: str) -> str:
        """``url`` (``redis://…``, ``postgresql://…``) with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._mode = "reset"
            self._flowing.clear()
            doomed = list(self._sockets)
        for sock in doomed:
            _shutdown(sock)
        self._acceptor.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ----------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            if self._mode == "reset":
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True,
                             name=f"tcpproxy:{self.port}:conn").start()

    def _register(self, *socks: socket.socket) -> bool:
        """Track sockets for ``cut``; False (and nothing tracked) if a reset-cut happened meanwhile."""
        with self._lock:
            if self._mode == "reset":
                return False
            self._sockets.update(socks)
            return True

    def _wait_flowing(self) -> bool:
        """Wait out a hang; False if the proxy was reset-cut or closed instead."""
        while not self._flowing.wait(_POLL_S):
            if self._mode == "reset":
                return False
        return True

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if not self._register(client) or not self._wait_flowing():
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return  # the target itself is down: the client sees its connection reset
            upstream.settimeout(None)
            if self._register(upstream):
                self._pump(client, upstream)
        finally:
            with self._lock:
                self._sockets.discard(client)
                if upstream is not None:
                    self._sockets.discard(upstream)
            _reset(client)
            if upstream is not None:
                _reset(upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes or the proxy is reset-cut; pause while hung."""
        other = {client: upstream, upstream: client}
        while self._wait_flowing():
            try:
                readable, _, _ = select.select([client, upstream], [], [], _POLL_S)
                for sock in readable:
                    if not self._flowing.is_set():
                        break  # cut between select and read: these bytes wait (hang) or die (reset)
                    drip = self._drip if sock is upstream else None
                    data = sock.recv(1 if drip else 65536)
                    if not data:
                        return
                    other[sock].sendall(data)
                    if drip:
                        time.sleep(drip)
            except (OSError, ValueError):
                return  # the connection was cut (shut down under us) or closed by a peer: this pump ends

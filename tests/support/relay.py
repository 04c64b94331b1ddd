"""A TCP relay on loopback that a test can cut and restore: a PostgreSQL outage without stopping the server.

`Relay(host, port)` listens on 127.0.0.1:<free port> and pumps bytes both ways to the target, a thread
per direction. `cut()` breaks every open connection and refuses new ones (accepted, then closed at once,
as a server that went away); `restore()` lets connections through again. `black_hole()` keeps every
connection open but lets no byte through either way (a network that drops packets silently: the sender's
writes are taken, no answer ever comes); `cut()` ends it. `delay` (seconds, settable at any time) holds
each chunk that long before passing it on: a slow network or database. `url(pg_url)` is `pg_url` pointed at
the relay.
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._holed = False
        self.delay = 0.0
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True, name="pg-relay")
        self._thread.start()

    @classmethod
    def to(cls, url: str) -> Relay:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path, parts.query, ""))

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            self._holed = False
            for sock in list(self._open):
                _kill(sock)
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def black_hole(self) -> None:
        self._holed = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress (close alone may not)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    _kill(client)
                    continue
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                except OSError:
                    _kill(client)
                    continue
                upstream.settimeout(None)
                self._open.update((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                if not self._holed:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _kill(src)
            _kill(dst)


def _kill(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass

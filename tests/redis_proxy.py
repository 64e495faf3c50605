"""A TCP proxy between a worker and Redis that tests bend: delay requests, lose replies.

It forwards every connection both ways, one thread per direction. Subclasses see each chunk
on its way: `request` (client to Redis) may sleep; `reply` (Redis to client) returns False to
cut the connection instead of delivering it, what a failover or a network cut does.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class RedisProxy:
    def __init__(self, redis_url: str) -> None:
        host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
        self.upstream = (host, int(port))
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept)]
        self.threads[0].start()

    def url(self, database: str = "0") -> str:
        return f"redis://127.0.0.1:{self.listener.getsockname()[1]}/{database}"

    def request(self, chunk: bytes, connection: dict[str, object]) -> None:
        """A chunk from the client, before it goes on; `connection` is per-connection state."""

    def reply(self, chunk: bytes, connection: dict[str, object]) -> bool:
        """A chunk from Redis: False loses it and cuts the connection."""
        return True

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            connection: dict[str, object] = {}
            for args in ((client, server, connection, True), (server, client, connection, False)):
                thread = threading.Thread(target=self._pump, args=args)
                self.threads.append(thread)
                thread.start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        connection: dict[str, object],
        upstream: bool,
    ) -> None:
        source.settimeout(0.2)
        try:
            while not self.stop.is_set():
                try:
                    chunk = source.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                if upstream:
                    self.request(chunk, connection)
                elif not self.reply(chunk, connection):
                    break  # the reply is lost with the connection
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        for sock in (*self.sockets, self.listener):
            sock.close()

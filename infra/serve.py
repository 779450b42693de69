"""What the stack's HTTP servers (the dev model server, the invoke proxy, the DynamoDB
fault proxy) share: reading a request body, stopping without leaving handler threads
behind, and living as a child of the stack.

Bodies come with a Content-Length or chunked (the Rust AWS SDK streams some requests),
so both servers read both. As a stack child a server binds port 0, writes the port it
got to a port file (atomically: the stack polls that file and must never read half a
number), prints one "listening" line, and serves until SIGTERM (what `make down` sends)
or Ctrl-C, closing its socket on the way out.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from http.server import ThreadingHTTPServer


def read_body(handler) -> bytes:
    """The body of the request a BaseHTTPRequestHandler is handling."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, up to the blank line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()  # CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class StoppableServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose shutdown() also ends its connections: it closes the
    listening socket, drops idle keep-alive connections and sets `stopping`, which
    handlers wait on instead of sleeping, so a test that stops a server leaves no handler
    thread blocked on a read or a scripted delay."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler):
        self.stopping = threading.Event()
        self._open_connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._open_connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # Clients (urllib3, hyper) reset pooled keep-alive connections whenever they like;
        # that is normal, not worth a traceback on stderr.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)

    def shutdown(self):
        self.stopping.set()
        super().shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._open_connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


def write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def serve_until_stopped(server, port_file: str | None, listening_line: str, poll_interval: float = 0.2) -> int:
    """Announce a bound server (port file, then one line on stdout) and serve it until
    SIGTERM or Ctrl-C. Returns the exit status for main()."""
    if port_file:
        write_port_file(port_file, server.server_address[1])
    print(listening_line, flush=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=poll_interval)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

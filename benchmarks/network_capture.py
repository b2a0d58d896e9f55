"""Run a command behind a logging proxy on 127.0.0.1 and list every request it tried to send out.

How onnxruntime's telemetry was found: a process whose ``https_proxy`` points at a local proxy
sends its HTTPS requests there as ``CONNECT host:443`` first, whether a Python library or a C++
one (onnxruntime's 1DS uploader) opens the socket, where an audit hook in Python sees only the
former. This proxy answers every request ``403`` and closes: it forwards nothing, anywhere. It
records the request line and the second it came at, after the proxy started.

    python -m benchmarks.network_capture -- python predict.py model=out/model.onnx images=cat.jpg
    python -m benchmarks.network_capture --hold 70 -- python -c "import onnxruntime as ort; ..."

``--hold``: keep listening that many seconds after the command ends (a library's uploader may send
late, from a thread of a process that is still alive; hold the process itself open for that).
Only clients that honour the proxy variables are seen; a client that ignores them connects
directly (and, on a machine without a route out, fails unseen): ``strace -f -e trace=connect``
shows those.
"""

from __future__ import annotations

import argparse
import os
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["CaptureProxy", "Request", "proxy_environment"]

PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
HEADER_LIMIT = 64 * 1024  # bytes of request head read before giving up on a client


@dataclass(frozen=True)
class Request:
    """One request the proxy received: when (seconds after it started) and its first line."""

    seconds: float
    line: str  # "CONNECT mobile.events.data.microsoft.com:443 HTTP/1.1"


class CaptureProxy:
    """A proxy on 127.0.0.1 that records each request line, answers ``403`` and forwards nothing.

    A context manager: listening inside the ``with``, on a free port (:attr:`url`).
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._started = 0.0

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running: use it in a with block")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> CaptureProxy:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(HEADER_LIMIT).decode("latin-1").strip()
                proxy._record(line or "(connected, sent nothing)")
                read = 0
                while read < HEADER_LIMIT:  # the headers, up to the blank line: read and dropped
                    header = self.rfile.readline(HEADER_LIMIT)
                    read += len(header)
                    if header in (b"", b"\r\n", b"\n"):
                        break
                self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        socketserver.ThreadingTCPServer.daemon_threads = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._started = time.monotonic()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _record(self, line: str) -> None:
        with self._lock:
            self.requests.append(Request(round(time.monotonic() - self._started, 1), line))

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with every proxy variable pointing here."""
        return proxy_environment(self.url, base)


def proxy_environment(url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` with every proxy variable set to ``url`` and no host exempted (``no_proxy`` emptied)."""
    env = dict(os.environ if base is None else base)
    env.update(dict.fromkeys(PROXY_VARIABLES, url))
    env.update(no_proxy="", NO_PROXY="")
    return env


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep listening after the command ends")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with CaptureProxy() as proxy:
        status = subprocess.run(command, env=proxy.environment(), check=False).returncode
        time.sleep(args.hold)
    print(f"{len(proxy.requests)} request(s) through the proxy:", file=sys.stderr)
    for request in proxy.requests:
        print(f"  {request.seconds:6.1f} s  {request.line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

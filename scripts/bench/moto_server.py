"""An S3 endpoint for the benchmark: moto's server app, in a process of its own, counting the requests it serves.

Run by scripts/bench/services.py as `python scripts/bench/moto_server.py --port 0`; it prints `PORT <n>` once
listening.
`GET /_bench/counts` answers {"total": n, "PUT": n, "GET": n, ...} (requests by method, that one excluded).
The same app as `moto_server`, less its per-request access log (which only costs CPU on both sides of the
comparison).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections import Counter
from typing import Any

COUNTS_PATH = "/_bench/counts"


class CountingApp:
    """WSGI middleware: counts requests by method and serves the counts at COUNTS_PATH."""

    def __init__(self, app: Any):
        self.app = app
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == COUNTS_PATH:
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        with self.lock:
            self.counts["total"] += 1
            self.counts[environ.get("REQUEST_METHOD", "?")] += 1
        return self.app(environ, start_response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed as `PORT <n>`)")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Handler(MotoRequestHandler):
        disable_nagle_algorithm = True  # no delayed-ACK stalls between a response's writes

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=Handler)
    server.socket.listen(512)  # the ETL and the ceiling open a few dozen connections at once

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

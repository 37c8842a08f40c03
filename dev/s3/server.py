"""The local cluster's S3: moto's S3 application behind waitress, in a process of its own.

    python -m kubetune.dev.s3.server HOST PORT

moto's own server (werkzeug's development server) answers every request with `Connection: close`,
so each S3 call of every client paid a new TCP connection and a new server thread; S3, MinIO and
every production server keep connections alive. waitress (a production WSGI server, pure Python)
serves moto's application with keep-alive. In its own process it does not share the API
server's interpreter lock: under a burst of requests (hundreds of operator passes each reading
a manifest) the API server stays responsive. It exits when its parent goes (checked every
second), so a crashed cluster leaves no S3 behind.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable


def serve(host: str, port: int, threads: int = 8) -> Callable[[], None]:
    """Serve moto's S3 on host:port from a background thread; returns the function that stops it."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from waitress.server import create_server

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" warnings under a burst
    server = create_server(
        DomainDispatcherApplication(create_backend_app),
        host=host,
        port=port,
        threads=threads,
        channel_timeout=300,
        connection_limit=1000,
        ident="kubetune-s3",
    )
    thread = threading.Thread(target=server.run, name="s3-server", daemon=True)
    thread.start()

    def stop() -> None:
        server.close()
        thread.join(timeout=5)

    return stop


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    parent = os.getppid()
    stop_server = serve(host, port)
    stop = threading.Event()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            break
    stop_server()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

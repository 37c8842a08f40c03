"""The local cluster's S3: moto's server in a process of its own.

    python -m kubetune.dev.s3server HOST PORT

In its own process moto does not share the API server's interpreter lock: under a burst of
requests (hundreds of operator passes each reading a manifest) the API server stays responsive.
It exits when its parent goes (it checks every second), so a crashed cluster leaves no S3 behind.
"""

from __future__ import annotations

import logging
import os
import sys
import threading


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    parent = os.getppid()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    stop = threading.Event()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            break
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

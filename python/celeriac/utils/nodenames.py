"""This host's name, and the node name a client process sends under."""

from __future__ import annotations

import os
import socket

#: Read once at import: a client's node name does not follow a later rename of the host.
HOSTNAME = socket.gethostname()


def client_origin() -> str:
    """``gen<pid>@<host>``: the ``origin`` of the messages and events a client (not a
    worker) sends, as Celery names it."""
    return f"gen{os.getpid()}@{HOSTNAME}"

"""Canvas: Celery's workflow primitives, importable from one place as from
``celery.canvas``.

The code lives in modules of one concern each, layered without circles:
``canvas_signatures`` (signatures, chain, group), ``canvas_chord``, ``canvas_map``
(xmap, xstarmap, chunks), ``canvas_links`` (callbacks and errbacks) and
``canvas_replace`` (``Task.replace``).
"""

from __future__ import annotations

from celeriac.canvas_chord import chord
from celeriac.canvas_map import chunks, xmap, xstarmap
from celeriac.canvas_signatures import Signature, chain, group, maybe_signature, signature, subtask
from celeriac.canvas_signatures import _chain as _chain  # Celery's module has it too
from celeriac.canvas_signatures import maybe_unroll_group as maybe_unroll_group
from celeriac.canvas_signatures import seconds_of as seconds_of

__all__ = [
    "Signature",
    "chain",
    "chord",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "subtask",
    "xmap",
    "xstarmap",
]

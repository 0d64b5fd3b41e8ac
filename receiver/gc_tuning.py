"""The cyclic garbage collector, tuned for a long-running server process.

By the time a process serves, its heap holds ~60,000 objects that live as long as it does
(modules, the config, compiled templates, pydantic schemas). Every full collection walked all
of them: ~26 ms each, every few hundred milliseconds under a webhook storm (6 % of the web
process). Frozen, they are left out of collections; what is allocated afterwards is collected
as usual. A higher first-generation threshold collects young objects less often: a request's
objects are freed by reference counting, so a collection finds few survivors however rarely
it runs (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young collections (Python's default: 700)


def settle() -> None:
    """Call once the process is set up: freeze what exists, collect the young less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def after_reload() -> None:
    """A reload replaced the config: let the collector see the old one, then freeze again."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()

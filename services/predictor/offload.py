"""Where a request's own work (parsing, features, inference, the answer) runs: on the event loop when the body is
small, in a thread when it is large, so that one org's large batch does not hold up every other request of its
worker process.

The body's size is the measure because it is known before any of the work, parsing included, and the work grows
with it: 15 to 50 ns a byte here with a 100-tree model, whatever the protocol (V2 JSON the least, binary tensors the
most, inference being nearly all of theirs). Below LARGE_BODY_BYTES a request holds the loop for at most 1 to 3 ms
and keeps the fast path that the single-row benchmark measures (bench/serve.py): no thread, no lock, one size
check. That includes bench/serve.py's 1000-row batches (V2 JSON 34 KB, binary 24 KB); V1 rows, named, reach the
threshold at about 500 rows. Above it, handing the work to a thread and back (35 to 70 us here) adds 3 to 6% at
most to the work it moves.

In a thread the work still needs the GIL, except inside onnxruntime's run; the event loop gets it back at least
every switch interval (5 ms), but not during one C call that holds it: orjson parsing the body (0.12 s for 31 MB
of V1 rows) or the parsed rows being freed (0.02 s) is what other requests can still wait for. Large requests of
one process run one at a time: with k of them in threads the loop gets the GIL about 1 / (k + 1) of the time.
Three 31 MB batches sent at once to a one-worker predictor (on a busy machine) took 8 s in all so, against 6 s with
all three in threads, while another org's single rows were answered 3 to 4 times as often meanwhile, waiting at
worst 0.3 to 0.4 s rather than up to 0.9 s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from anyio import CapacityLimiter, to_thread
from anyio.lowlevel import RunVar

LARGE_BODY_BYTES = 64 * 1024
LARGE_AT_ONCE = 1

T = TypeVar("T")

# One limiter per event loop, as anyio keeps its own default one: a process may run several loops (tests do).
_large_requests: RunVar[CapacityLimiter] = RunVar("kiln_large_requests")


async def run_sized(size: int, work: Callable[[], T]) -> T:
    """work() for a request body of `size` bytes: on the event loop if small, else in a thread, one at a time."""
    if size < LARGE_BODY_BYTES:
        return work()
    return await to_thread.run_sync(work, limiter=_limiter())


def _limiter() -> CapacityLimiter:
    try:
        return _large_requests.get()
    except LookupError:
        limiter = CapacityLimiter(LARGE_AT_ONCE)
        _large_requests.set(limiter)
        return limiter

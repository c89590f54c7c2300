"""Waiting on Ray calls that fan out to several actors without hanging when one of them dies.

`ray.get` of a list waits for every result; when one rank of a collective dies, the others block in the
collective forever and so would the caller. `get_all` raises as soon as a call fails or time runs out.
"""

from __future__ import annotations

import time

import ray

# what ray.get raises when an actor has died or cannot be reached
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class ActorFailure(RuntimeError):
    """An actor of the run died or stopped answering; the run can go on from its latest checkpoint."""


def get_all(futures: list, what: str, timeout_s: float | None = None, grace_s: float = 10.0) -> list:
    """The results of `futures` (calls to actors that work together, e.g. the ranks of a collective).

    Raises ActorFailure naming `what` when an actor dies, or when the calls are not all done within
    `timeout_s` seconds. A call that raised is re-raised as it is, unless another actor of the set died
    within `grace_s` seconds (the error then being a symptom of that death, e.g. a broken collective).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(futures)
    while pending:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not done:
            raise ActorFailure(f"{what}: {len(pending)} of {len(futures)} calls unfinished after {timeout_s:.0f} s")
        try:
            ray.get(done[0])
        except ACTOR_GONE as error:
            raise ActorFailure(f"{what}: an actor died ({type(error).__name__}: {error})") from error
        except ray.exceptions.RayError as error:
            dead = _first_death(pending, grace_s)
            if dead is not None:
                raise ActorFailure(f"{what}: an actor died ({type(dead).__name__}: {dead})") from error
            raise
    return ray.get(list(futures))


def _first_death(futures: list, grace_s: float) -> BaseException | None:
    """The death error of the first of `futures` whose actor dies within `grace_s` seconds, or None."""
    if not futures:
        return None
    done, _ = ray.wait(futures, num_returns=len(futures), timeout=grace_s)
    for future in done:
        try:
            ray.get(future)
        except ACTOR_GONE as error:
            return error
        except ray.exceptions.RayError:
            continue
    return None

"""This process's identity across ``os.fork()``: one generation counter, and the objects a
forked child must reset before it touches them.

A child inherits its parent's memory: sockets it must not share, and locks that may have been
held by a thread that does not exist in the child (so they would never be released). Every
fork policy in idem-core is written against this module: :func:`generation` for a cheap
"was I forked since?" check, :func:`reset_in_child` for objects that drop or rebuild state.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None:
        """Drop (never close) what belongs to the parent; rebuild locks. Runs in the child
        right after ``fork()``, on its only thread: no I/O, no waiting on a lock."""
        ...


#: bumped in every forked child; a list, so that a hot path reads ``_GENERATION[0]`` cheaply
_GENERATION = [0]
_registered: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def generation() -> int:
    """How many forks lie between the first process and this one."""
    return _GENERATION[0]


def reset_in_child(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked from now on (weakly held)."""
    _registered.add(obj)


def _in_child() -> None:
    _GENERATION[0] += 1
    for obj in list(_registered):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_in_child)

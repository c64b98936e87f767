"""What every task of a run needs, on every Dask worker: a worker plugin (imported only with dask).

Held as a task's result instead, the value lived on one worker and the
scheduler sent every task that needed it to that worker whenever a level had
at most twice as many tasks as the cluster has threads (Dask places such a
task where its dependencies are): measured, both level-0 tasks of the
256-slice bench input ran one after the other on one of two workers, the
other idle (7.5 s instead of 3.8 s).  A plugin is installed on every worker,
a worker that joins later or is restarted after a loss included, and the
tasks, which then depend on nothing, go wherever a thread is free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


class Shared(WorkerPlugin):
    """A worker plugin that holds ``value``, under the plugin's name on each worker."""

    def __init__(self, value: Any) -> None:
        self.value = value


def call(name: str, function: Callable[[S, T], R], task: T) -> R:
    """On a worker: ``function(shared, task)``, ``shared`` being the value of the :class:`Shared` plugin
    ``name``."""
    plugin = distributed.get_worker().plugins[name]
    assert isinstance(plugin, Shared)
    return function(plugin.value, task)

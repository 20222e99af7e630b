"""Content analysis in worker processes, so a plugin over its timeout is really stopped.

See :mod:`mailflow.isolation.pool` (the server side), :mod:`mailflow.isolation.worker`
(the process) and :mod:`mailflow.isolation.wire` (what they exchange).
"""

from mailflow.isolation.pool import IsolationError, PluginFailure, WorkerPool

__all__ = ["IsolationError", "PluginFailure", "WorkerPool"]

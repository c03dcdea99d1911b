"""Where the sharding driver runs its slide tasks: in-process (``workers=0``) or as Ray tasks.

Both executors offer ``submit(fn, *args) -> handle``, ``wait(handles) -> (done, rest)`` (at least
one done), ``result(handle)`` (the value, or the task's own exception raised again) and
``shutdown()``. A :class:`SlideError` raised in a task is raised as itself, without Ray's traceback:
it is the one line a user reads about a bad slide. :func:`cluster_cpus` sizes the driver's window of tasks in flight.
"""

from __future__ import annotations

from .slide_files import SlideError


class InlineExecutor:
    """Runs tasks in the driver process (``workers=0``): for debugging and tiny jobs."""

    class _Done:
        """A finished call: hashable by identity, like a Ray ObjectRef."""

        def __init__(self, value=None, error: Exception | None = None) -> None:
            self.value, self.error = value, error

    def submit(self, fn, *args):
        try:
            return self._Done(fn(*args))
        except Exception as exc:  # delivered by result(), as Ray would
            return self._Done(error=exc)

    def wait(self, handles: list):
        return handles[:1], handles[1:]

    def result(self, handle):
        if handle.error is not None:
            raise handle.error
        return handle.value

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Runs tasks as Ray tasks (1 CPU each, plus ``resources`` such as a sharding node label)."""

    def __init__(self, address: str | None, workers: int | None, resources: dict | None) -> None:
        import ray

        from sharding.ray_cluster import ray_init

        self.ray = ray
        self.started = ray_init(address, num_cpus=workers, dashboard=False, log_to_driver=False)
        opts = {"num_cpus": 1, "max_retries": 2, "retry_exceptions": False}
        if resources:
            opts["resources"] = resources
        self._remote: dict = {}
        self._opts = opts

    def submit(self, fn, *args):
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(**self._opts)(fn)
        return remote.remote(*args)

    def wait(self, handles: list):
        return self.ray.wait(handles, num_returns=1)

    def result(self, handle):
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, SlideError):
                raise exc.cause from None  # its message is the one line the user is shown
            raise exc.as_instanceof_cause() from None

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(
    address: str | None, workers: int | None, resources: dict | None
) -> InlineExecutor | RayExecutor:
    """``workers=0``: in-process; otherwise Ray (the cluster at ``address``, or a local one)."""
    return InlineExecutor() if workers == 0 else RayExecutor(address, workers, resources)


def cluster_cpus(executor: InlineExecutor | RayExecutor) -> int:
    if isinstance(executor, InlineExecutor):
        return 1
    return max(1, int(executor.ray.cluster_resources().get("CPU", 1)))

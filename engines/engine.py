"""A Ray session for the Ray engine (engines.ray): connect or start one, and size the work to it."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator

from clipsql import lazy
from clipsql.errors import ClipsqlError, env_number


class EngineError(ClipsqlError, RuntimeError):
    """The engine cannot be used (unknown engine, Ray missing, unreachable cluster)."""


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """A connected Ray: `address` None starts a local Ray for this command (quiet: no dashboard, no
    usage stats) unless RAY_ADDRESS names a cluster; `auto` or `ray://…`/`host:port` joins a
    running cluster. A session that was
    already connected (tests, notebooks) is reused and left running."""
    try:
        ray = lazy.load("ray")
    except ImportError:
        raise EngineError("the ray `engine` needs Ray: pip install -e '.[ray]' (ray[data] 2.60)", param="engine") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray forks helper processes after `lance` is imported; they never call into Lance
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    address = address or os.environ.get("RAY_ADDRESS") or None     # Ray's own variable joins a cluster too
    if address is None:     # a new Ray of this machine, for this command only
        kwargs.update(address="local", num_cpus=num_cpus,
                      object_store_memory=int(env_number("CLIPSQL_RAY_OBJECT_STORE", 256 << 20, above=True)))
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - Ray reports a start-up timeout as a bare Exception
        with contextlib.suppress(Exception):
            ray.shutdown()      # the processes a half-started local Ray left behind
        raise start_error(e, address) from None
    try:
        _quiet_data()
        yield ray
    finally:
        ray.shutdown()


def start_error(e: BaseException, address: str | None) -> EngineError:
    """One line for a Ray that would not start or cannot be reached (`ray.init` raises ConnectionError,
    RuntimeError, ValueError, TimeoutError or, for a node that timed out during start-up, a bare
    Exception), saying what to do about it."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if address is None:
        return EngineError(f"a local Ray for this command did not start ({first}): check free memory, /tmp space "
                           "and leftover Ray processes (`ray stop`), then re-run; or join a running cluster with "
                           "--ray-address auto / host:port (or RAY_ADDRESS)")
    return EngineError(f"cannot reach the Ray cluster at {address}: {first} (start one with `ray start --head`, "
                       "or pass --ray-address auto / host:port)")


def _quiet_data() -> None:
    """Ray Data's progress bars and per-operator logs are noise in a CLI that prints a summary."""
    ctx = lazy.ray_data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def worker_count(ray: Any) -> int:
    """CPUs in the cluster (one task per CPU at a time)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gpu_count(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))

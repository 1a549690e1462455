"""A Ray session for the Ray engine (engines.ray): connect or start one, and size the work to it."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from clipsql import lazy, leftovers
from clipsql.errors import ClipsqlError, env_number


class EngineError(ClipsqlError, RuntimeError):
    """The engine cannot be used (unknown engine, Ray missing, unreachable cluster)."""


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """A connected Ray: `address` None starts a local Ray for this command (quiet: no dashboard, no
    usage stats) unless RAY_ADDRESS names a cluster; `auto` or `ray://…`/`host:port` joins a
    running cluster. A session that was
    already connected (tests, notebooks) is reused and left running.

    A local Ray lives in this command's own folder (`ray_folder`): before it starts, the processes and
    folders that the local Rays of killed commands left are swept; after it stops, its folder goes."""
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
    folder = None
    if address is None:     # a new Ray of this machine, for this command only
        kwargs.update(address="local", num_cpus=num_cpus,
                      object_store_memory=int(env_number("CLIPSQL_RAY_OBJECT_STORE", 256 << 20, above=True)))
        sweep_ray_folders()
        folder = ray_folder()
        if folder is not None:
            kwargs["_temp_dir"] = folder
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - Ray reports a start-up timeout as a bare Exception
        with contextlib.suppress(Exception):
            ray.shutdown()      # the processes a half-started local Ray left behind
        _remove_ray_folder(folder)
        raise start_error(e, address) from None
    try:
        _quiet_data()
        yield ray
    finally:
        ray.shutdown()
        _remove_ray_folder(folder)


# ------------------------------------------------------------------ the local Ray's own folder
_RAY_FOLDER = re.compile(r"clipsql-ray-" + leftovers.TAG)
_SOCKET_PATH_MAX = (104 if sys.platform == "darwin" else 108) - 1      # AF_UNIX, as Ray checks it


def _ray_temp_base() -> str:
    """Where Ray puts its temp folder: RAY_TMPDIR, else the system temp folder (/tmp on macOS, whose
    per-user temp folder is too long for socket paths)."""
    base = os.environ.get("RAY_TMPDIR") or ("/tmp" if sys.platform == "darwin" else tempfile.gettempdir())
    return os.path.abspath(base)


def ray_folder() -> str | None:
    """This command's folder for the local Ray it starts (Ray's `_temp_dir`): `clipsql-ray-<host>-<pid>`
    under RAY_TMPDIR or the system temp folder, so that the next command finds what a killed one left.
    None (Ray's own default folder, unswept) where Ray's longest socket path in it
    (`<folder>/session_<date>_<time>_<µs>_<pid>/sockets/plasma_store`) would pass the AF_UNIX limit."""
    folder = os.path.join(_ray_temp_base(), f"clipsql-ray-{leftovers.owner_tag()}")
    longest = os.path.join(folder, f"session_{'0' * 26}_{os.getpid()}", "sockets", "plasma_store")
    return folder if len(os.fsencode(longest)) <= _SOCKET_PATH_MAX else None


def sweep_ray_folders() -> list[str]:
    """Stop the processes of the local Rays of commands that have ended (killed) and remove their
    folders; returns the folders' names."""
    return leftovers.sweep(_ray_temp_base(), _RAY_FOLDER, before=lambda path: leftovers.stop(ray_processes(path)))


def _remove_ray_folder(folder: str | None) -> None:
    """After `ray.shutdown()`: end what of this Ray still runs (a helper that outlives the shutdown), and
    remove its folder."""
    if folder is not None:
        leftovers.stop(ray_processes(folder))
        shutil.rmtree(folder, ignore_errors=True)


def ray_processes(folder: str | os.PathLike) -> list[int]:
    """PIDs of the processes of the local Ray started in `folder`, also after the command that started
    them is gone: those whose command line names the folder (GCS, raylet, monitors) and the Ray
    processes with a file open in it (workers and agents rename themselves `ray::…` and keep their logs
    there open). Linux (/proc) only; elsewhere none are found."""
    if not os.path.isdir("/proc"):
        return []
    roots = {os.fsencode(os.path.abspath(folder)), os.fsencode(os.path.realpath(folder))}
    named = re.compile(rb"(?:" + b"|".join(re.escape(r) for r in roots) + rb")(?![\w.-])")
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
            if named.search(cmd) or (cmd.startswith(b"ray::") and _has_open_file(entry.name, roots)):
                found.append(int(entry.name))
        except OSError:         # ended meanwhile, or another user's
            continue
    return found


def _has_open_file(pid: str, roots: set[bytes]) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            target = os.readlink(os.fsencode(fds / fd))
            if any(target == r or target.startswith(r + b"/") for r in roots):
                return True
    return False


def start_error(e: BaseException, address: str | None) -> EngineError:
    """One line for a Ray that would not start or cannot be reached (`ray.init` raises ConnectionError,
    RuntimeError, ValueError, TimeoutError or, for a node that timed out during start-up, a bare
    Exception), saying what to do about it."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if address is None:
        return EngineError(f"a local Ray for this command did not start ({first}): check free memory, /tmp space "
                           "and leftover Ray processes (`ray stop`), then re-run; or join a running cluster with "
                           "`ray_address` auto / host:port (or RAY_ADDRESS)")
    return EngineError(f"cannot reach the Ray cluster at {address}: {first} (start one with `ray start --head`, "
                       "or pass `ray_address` auto / host:port)")


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

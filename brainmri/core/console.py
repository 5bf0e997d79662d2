"""What the console shows: brainmri's own lines, and Ray's log only with `--verbose`.

Where Ray 2.60's chatter comes from, and what turns it off here:

- Every Ray worker process (Train controller and workers, Ray Data's SplitCoordinator and
  DatasetManager actors, read and map tasks) writes its stdout/stderr to Ray's session logs,
  and the driver re-prints them with a "(Actor pid=...)" prefix when `ray.init(log_to_driver=
  True)`: the per-rank "Reporting training result N: TrainingReport(...)" dumps of the
  whole metrics dict (a logger under root in each train worker, INFO), the `ray.train.*`
  start-up lines, Ray Data's "Execution plan" / "execution finished" lines, deprecation
  warnings, C++ errors of Ray's own actors. Each has a knob of its own (`ray.train.
  LoggingConfig`, `RAY_DATA_LOG_LEVEL`, `DataContext.print_on_execution_start`,
  `PYTHONWARNINGS` in the runtime_env, ...), but Ray adds new ones with every release: the
  one switch that covers them all is `log_to_driver=False`. Nothing is lost: Ray still
  writes them to its session logs (`/tmp/ray/session_latest/logs` on each node, the
  dashboard), and an error that ends the run reaches the driver as an exception.
- Ray's error channel (raylet and GCS messages: out-of-memory kills, dead actors) is printed
  by the driver whatever `log_to_driver` says, and stays on; only its "N PYTHON worker
  processes have been started" warning is dropped: fractional-CPU actors (Train, Ray Data)
  start more processes than CPUs by design.
- In the driver itself: Ray Data's own lines when it executes there (evaluation), Ray's
  RayDeprecationWarnings, and ray.init's token-authentication notice. (One line is left: a
  C++ error the driver's Ray core writes straight to stderr when it starts Ray Data's
  inference actors, "has constructor arguments in the object store and max_restarts > 0";
  only RAY_BACKEND_LOG_LEVEL would hide it, and locally that would also empty the error
  lines of every Ray process's log file.)

`--verbose` (or BRAINMRI_VERBOSE=1) leaves all of it as Ray has it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

VERBOSE_ENV = "BRAINMRI_VERBOSE"
POOL_WARNING = "worker processes have been started on node"  # the raylet's, see above
# The logger of ray.init's token-authentication notice (a name, not an API: if Ray renames it,
# the notice shows and nothing breaks; tests/core/test_console.py checks it against the pin).
AUTH_LOGGER = "ray._private.authentication"
_missing_said: set[str] = set()


def verbose() -> bool:
    """Whether Ray's own output is wanted (`--verbose`, or BRAINMRI_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def set_verbose(on: bool) -> None:
    """The command line's choice (read by `init_ray`, through `ray_init_kwargs`)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def ray_init_kwargs() -> dict:
    """The console's part of ray.init, with the driver's own filters put in place first."""
    if verbose():
        return {"log_to_driver": True}
    import ray.data  # noqa: F401  (it sets its logger's level when imported: first)
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    logging.getLogger(AUTH_LOGGER).setLevel(logging.ERROR)
    # Ray Data executing in the driver (evaluation): its INFO lines, and its warning that the
    # progress bars are off (evaluation draws its own)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    _drop_pool_warning()
    return {"log_to_driver": False}


def private_ray_api_missing(what: str, without: str, error: BaseException) -> None:
    """One line on stderr, once per process and API, when a private Ray API this package uses
    (each isolated in one function of console.py or cluster.py) is gone or changed: the caller
    goes on without it. The tests that pin them (tests/core) fail first on a Ray upgrade."""
    if what in _missing_said:
        return
    _missing_said.add(what)
    import ray

    why = " ".join(str(error).split())[:200]
    print(f"brainmri: Ray {ray.__version__} has no usable {what} ({type(error).__name__}: {why}); "
          f"{without}", file=sys.stderr)


def _drop_pool_warning() -> None:
    """Wraps ray._private.worker.print_to_stdstream, through which the driver prints Ray's error
    channel (listen_error_messages looks it up by name on each message), to drop the pool
    warning. Ray has no public hook for that channel; tests/core/test_console.py pins the
    function's signature and that lookup, so an upgrade that changes either fails a test."""
    try:
        import ray._private.worker as w

        shown = w.print_to_stdstream
    except (ImportError, AttributeError) as e:
        private_ray_api_missing("ray._private.worker.print_to_stdstream", "Ray's warning that worker "
                                "processes have been started will show", e)
        return
    if getattr(shown, "brainmri", False):
        return

    @functools.wraps(shown)  # inspect.signature and inspect.unwrap still see Ray's own
    def print_to_stdstream(data, *args, **kwargs):
        if "lines" not in data:  # a message of another shape: shown as it is
            return shown(data, *args, **kwargs)
        lines = [ln for ln in data["lines"] if POOL_WARNING not in ln]
        if lines:
            shown({**data, "lines": lines}, *args, **kwargs)

    print_to_stdstream.brainmri = True
    w.print_to_stdstream = print_to_stdstream

"""What a person running a job reads: each stage once, with a progress bar; Ray's logs on disk.

Every job's driver goes through here (:func:`configure`, :func:`init_ray`), so the console looks
the same whether a job runs alone, inside ``ray_jobs.pipeline`` or under ``ray job submit``:

- **Quiet by default.** Ray's workers and actors are not echoed to the driver
  (``ray.init(log_to_driver=False)``: no ``(RayTrainWorker pid=...)`` lines, no epoch line twice,
  no actor tracebacks of Ray's own housekeeping), Ray's and Ray Data's driver-side loggers print
  only errors, Ray Data draws no progress bars, Ray Tune prints no status tables, MLflow prints
  only warnings and no download bars, and Python warnings raised inside Ray's own modules are
  not shown. igconda's loggers print warnings and errors; their INFO lines go to the log file.
- **Nothing is lost.** Every worker's and actor's output stays in Ray's session logs
  (``<session_dir>/logs``; :func:`init_ray` prints where, ``/tmp/ray/session_latest/logs`` on a
  local run), Ray Data's in ``<session_dir>/logs/ray-data``, and with ``log_file`` (the pipeline's
  ``<study>/pipeline.log``) every driver-side log record at INFO and above, Ray's included.
- **``--verbose``** (the pipeline and its jobs: :func:`add_verbose_flag`) brings all of Ray's
  output back to the console as Ray prints it by default.
- **Progress bars** (:func:`igconda.progress.progress`): tqdm with
  an ETA on a terminal; where the output is not a terminal (CI, ``ray job submit`` logs) one plain
  line every 30 s and one at the end instead of carriage returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import IO, Any

#: Format of the console's and the log file's lines from Python loggers.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers that do not propagate to the root logger and print to the console themselves.
THIRD_PARTY_LOGGERS = ("ray", "ray.data", "mlflow")
VERBOSE_HELP = ("show Ray's own logs on the console (worker and actor output, Ray's INFO lines, "
                "Ray Data's progress); they are always on disk in Ray's session logs")

#: Environment of a quiet console: no MLflow download bars, no Ray Data bars (one block every
#: few seconds off a terminal would bury the stages'), and Ray Tune's legacy output engine, which
#: at the tune job's verbosity 0 prints nothing (the newer one still prints a header per run).
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
             "RAY_AIR_NEW_OUTPUT": "0"}

_state: dict[str, Any] = {"verbose": False}
_OWN = "_igconda_console"  # attribute marking the handlers this module added


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose``, the same for every job (None when not given: see :func:`configure`)."""
    parser.add_argument("--verbose", action="store_true", default=None, help=VERBOSE_HELP)


def is_verbose() -> bool:
    """Whether :func:`configure` last asked for Ray's logs on the console."""
    return bool(_state["verbose"])


def configure(verbose: bool | None = None, log_file: str | Path | None = None) -> None:
    """Set the driver's console up (call before Ray starts; calling again is cheap).

    Args:
        verbose: Ray's own output on the console as well (else only errors and warnings of
            ours); None keeps the current choice, so a job the pipeline runs in-process without
            ``--verbose`` keeps the pipeline's.
        log_file: also write every log record at INFO and above here (appended; kept across
            later calls without one, so the jobs a pipeline runs in-process add to its file).
    """
    if verbose is not None:
        _state["verbose"] = bool(verbose)
    verbose = is_verbose()
    # Read by MLflow, Ray Data and Ray Tune when they start a download, a dataset or a run.
    for name, value in QUIET_ENV.items():
        if not verbose and name not in os.environ:
            os.environ[name] = value
            _state.setdefault("env_set", set()).add(name)
        elif verbose and name in _state.get("env_set", ()):
            os.environ.pop(name, None)  # only what this module set: a user's own choice stays
            _state["env_set"].discard(name)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    ours_level = logging.INFO if verbose else logging.WARNING
    # Ours, or a job's own logging.basicConfig one (others', e.g. pytest's, are left alone).
    consoles = [h for h in root.handlers
                if getattr(h, _OWN, None) == "console" or type(h) is logging.StreamHandler]
    if not consoles:
        consoles = [_add(root, _Stderr(), "console", LOG_FORMAT)]
    for handler in consoles:
        handler.setLevel(ours_level)
    if log_file is not None:
        _state["log_file"] = Path(log_file).resolve()
        _state["log_file"].parent.mkdir(parents=True, exist_ok=True)
    quiet_third_party()
    warnings.filterwarnings("default" if verbose else "ignore", module=r"ray(\.|$)")


def quiet_third_party() -> None:
    """Console handlers of Ray's, Ray Data's and MLflow's loggers: errors only (warnings for
    MLflow) unless verbose; :func:`configure`'s ``log_file`` on them and on the root logger.
    Their own file handlers (Ray Data's session log) keep everything. Called again after
    ``ray.init`` and ``import ray.data``, which (re)build those loggers' handlers."""
    verbose = is_verbose()
    path = _state.get("log_file")
    if path is not None:
        handler = _state.get("file_handler")
        if handler is None or handler.baseFilename != str(path):
            handler = _state["file_handler"] = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter(FILE_FORMAT))
            handler.setLevel(logging.INFO)
        for logger in (logging.getLogger(), *map(logging.getLogger, THIRD_PARTY_LOGGERS)):
            if handler not in logger.handlers:
                logger.addHandler(handler)
    for name in THIRD_PARTY_LOGGERS:
        quiet = logging.WARNING if name == "mlflow" else logging.ERROR
        for handler in logging.getLogger(name).handlers:
            if _is_console(handler):
                handler.setLevel(logging.NOTSET if verbose else quiet)


def init_ray(address: str | None = None, verbose: bool | None = None, **kwargs: Any) -> Any:
    """``ray.init`` as every job calls it, after :func:`configure` (``verbose``: a job's
    ``--verbose``, None when not given): quiet unless verbose.

    Does nothing more when Ray is already running (the pipeline's jobs share its runtime).
    ``kwargs`` go to ``ray.init`` (a caller's own ``log_to_driver`` wins).

    Returns:
        ``ray.init``'s context, or None when Ray was running already.
    """
    import ray

    configure(verbose)
    if ray.is_initialized():
        return None
    kwargs.setdefault("log_to_driver", is_verbose())
    context = ray.init(address=address, **kwargs)
    import ray.data  # noqa: F401  (configures its logger: quieted below)

    ray.data.DataContext.get_current().enable_progress_bars = is_verbose()
    quiet_third_party()
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    if session and not is_verbose():
        print(f"Ray: workers' logs in {Path(session) / 'logs'} (--verbose shows them here)",
              flush=True)
    return context


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when it writes (as :data:`logging.lastResort`),
    so a replaced stderr (pytest's capture, a redirect) gets the lines."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ sets it
        pass


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _add(logger: logging.Logger, handler: logging.Handler, kind: str, fmt: str) -> logging.Handler:
    handler.setFormatter(logging.Formatter(fmt))
    setattr(handler, _OWN, kind)
    logger.addHandler(handler)
    return handler

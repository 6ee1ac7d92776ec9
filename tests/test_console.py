"""ray_jobs.console and ray_jobs.train_progress: what a person running a job reads.

Unit tests pin the pieces (the epoch bar's moves, which logger
prints what where); the Ray tests run a real job and read its console as a user would.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from igconda.progress import progress
from ray_jobs import console, train_progress
from tests.helpers import make_checkpoint, make_dataset
from tests.ray_head import local_head

#: A line of Ray's driver-side loggers (``ray``, ``ray.data``): level, file:line, " -- ".
RAY_LOG_LINE = re.compile(r"\b(INFO|WARNING) \w+\.py:\d+ -- ")


@pytest.fixture
def restore_logging(monkeypatch):
    """The console changes process-wide logging state: put it back after each test."""
    for name in console.QUIET_ENV:  # monkeypatch puts each back (or removes it) afterwards
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    names = ("", *console.THIRD_PARTY_LOGGERS)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers),
                 [h.level for h in logging.getLogger(n).handlers]) for n in names}
    state = dict(console._state)
    filters = list(warnings.filters)
    yield
    for name, (level, handlers, levels) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                logger.removeHandler(handler)
        for handler, handler_level in zip(handlers, levels, strict=True):
            handler.setLevel(handler_level)
        logger.setLevel(level)
    console._state.clear()
    console._state.update(state)
    warnings.filters[:] = filters


# ---- progress bars (the bar itself: tests/test_progress.py) --------------------------------------

def test_epoch_bar_follows_reports_forward_and_back_after_a_restart():
    out = io.StringIO()
    bar = progress(None, "train", "epoch", file=out)
    train_progress.show(bar, {"epoch": 1, "epochs": 4, "train_loss": 0.5})
    assert (bar.n, bar.total) == (1, 4)
    train_progress.show(bar, {"epoch": 3, "epochs": 4, "train_loss": 0.25, "valid_loss": 0.125})
    assert bar.n == 3 and "valid_loss=0.125" in str(bar)
    # A worker died and Ray Train restarted the run from epoch 1's checkpoint.
    train_progress.show(bar, {"epoch": 2, "epochs": 4, "train_loss": 0.3})
    assert bar.n == 2
    train_progress.show(bar, {"epoch": 4, "epochs": 4, "train_loss": 0.2})
    bar.close()
    assert "4/4" in out.getvalue().splitlines()[-1]


def test_tuning_trial_bar_counts_done_and_failed_trials(capsys):
    from ray_jobs.tune_progress import trial_bar

    callback = trial_bar()
    callback.setup(total_num_samples=3)
    callback.on_trial_complete(iteration=1, trials=[], trial=None)
    callback.on_trial_error(iteration=2, trials=[], trial=None)
    callback.on_trial_complete(iteration=3, trials=[], trial=None)
    callback.on_experiment_end(trials=[])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("tune:") and "0/3" in lines[0]
    assert "3/3" in lines[-1] and "1 failed" in lines[-1]


# ---- loggers ----------------------------------------------------------------------------------

def test_quiet_by_default_everything_in_the_log_file_and_verbose_brings_ray_back(
        tmp_path, capsys, monkeypatch, restore_logging):
    import ray  # noqa: F401  (sets up the "ray" logger's console handler, as ray.init's callers see)

    # Ray's console handler keeps the stderr of the first ``import ray`` (in a job: the process's;
    # here maybe an earlier test's capture): point it at this test's, as a fresh process has it.
    for handler in logging.getLogger("ray").handlers:
        if type(handler).__module__.startswith("ray.") and isinstance(handler, logging.StreamHandler):
            # Ray's PlainRayHandler, not pytest's capture handlers; its old stream may be closed.
            monkeypatch.setattr(handler, "stream", sys.stderr)

    log_file = tmp_path / "study" / "pipeline.log"
    console.configure(verbose=False, log_file=log_file)
    ray_logger, ours = logging.getLogger("ray.some_module"), logging.getLogger("igconda.x")
    ray_logger.info("ray info line")
    ray_logger.warning("ray warning line")
    ours.info("our info line")
    ours.warning("our warning line")
    err = capsys.readouterr().err
    assert "our warning line" in err
    assert "ray info line" not in err and "ray warning line" not in err and "our info line" not in err
    text = log_file.read_text()
    for line in ("ray info line", "ray warning line", "our info line", "our warning line"):
        assert line in text  # nothing is lost: the study log has every record at INFO and up

    console.configure(verbose=True)  # the file stays; Ray's and our INFO lines come back
    assert console.is_verbose()
    ray_logger.info("ray info again")
    ours.info("our info again")
    err = capsys.readouterr().err
    assert "ray info again" in err and "our info again" in err
    assert "ray info again" in log_file.read_text()

    console.configure(None)  # a job run in-process without --verbose keeps the pipeline's choice
    assert console.is_verbose()


def test_a_quiet_console_sets_only_the_environment_it_owns(restore_logging, monkeypatch):
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # the user's own choice
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    console.configure(verbose=False)
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    console.configure(verbose=True)
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


def test_warnings_from_rays_own_modules_are_hidden_unless_verbose(restore_logging):
    console.configure(verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("deprecated inside Ray", DeprecationWarning, "x.py", 1,
                               module="ray.data._internal.something")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="igconda.something")
    # catch_warnings(record=True) keeps the filters configure() installed
    assert [str(w.message) for w in caught] == ["ours"]


def test_every_job_has_the_verbose_flag(capsys):
    from ray_jobs import infer, pipeline, preprocess, train, tune

    assert pipeline.parse_args(["--output", "x", "--verbose"]).verbose is True
    assert infer.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o"]).verbose is None
    assert train.parse_args(["--data", "d", "--output", "o", "--verbose"]).verbose is True
    assert tune.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o",
                            "--verbose"]).verbose is True
    from ray_jobs import comparison_study, score_method, train_baseline

    assert train_baseline.parse_args(["--method", "hirescam", "--data", "d", "--output", "o",
                                      "--verbose"]).verbose is True
    assert score_method.parse_args(["--method", "intensity", "--data", "d", "--output", "o",
                                    "--verbose"]).verbose is True
    assert comparison_study.parse_args(["--output", "o", "--verbose"]).verbose is True
    with pytest.raises(SystemExit):  # preprocess parses in main: --help lists the flag
        preprocess.main(["--help"])
    assert "--verbose" in capsys.readouterr().out


# ---- on Ray -----------------------------------------------------------------------------------

@pytest.mark.ray
def test_training_shows_each_epoch_once_on_the_drivers_bar(ray_session, tmp_path, capsys):
    """A real Ray Train run: the reports of every epoch reach the driver's bar through the
    controller's callback, once each, whatever the workers print."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import ray.train

        for epoch in range(1, 4):
            print(f"worker epoch {epoch}")  # the worker's own line: --verbose only
            ray.train.report({"epoch": epoch, train_progress.TOTAL_KEY: 3,
                              "train_loss": 1.0 / epoch})

    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="bar", storage_path=str(tmp_path)))
    capsys.readouterr()
    with train_progress.epoch_bar(trainer):
        trainer.fit()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train:")]
    assert "\r" not in err and lines, err
    assert "3/3" in lines[-1] and "train_loss=0.3333" in lines[-1]
    assert sum("3/3" in line for line in lines) == 1, lines
    assert "worker epoch" not in err


@pytest.mark.ray
@pytest.mark.e2e
def test_an_inference_job_prints_its_stage_once_and_verbose_brings_rays_logs_back(
        tmp_path, test_config, repo_root):
    checkpoint = make_checkpoint(tmp_path / "ckpt", test_config)
    data = make_dataset(tmp_path / "data", test_config, {"P1": ("lymphoma", "internal"),
                                                         "P2": ("lung", "internal")})

    def job(output: str, *extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "ray_jobs.infer", "--checkpoint", str(checkpoint), "--data",
             str(data), "--output", str(tmp_path / output), "--tracking-uri",
             str(tmp_path / "mlruns.db"), "--batch-size", "8", "--concurrency", "1",
             "--no-volumes", *extra],
            cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    with local_head() as (_, env):
        quiet = job("quiet")
        verbose = job("verbose", "--verbose")
    # Default: the job's own lines, one bar over the slices, a pointer to Ray's logs on disk.
    assert "\r" not in quiet
    assert sum(line.startswith("infer:") and "100%" in line for line in quiet.splitlines()) == 1
    assert "workers' logs in" in quiet and "--verbose shows them here" in quiet
    for noise in ("pid=", "Starting execution of Dataset"):
        assert noise not in quiet, noise
    assert not RAY_LOG_LINE.search(quiet)  # Ray's own "<time> INFO worker.py:123 -- ..." lines
    # --verbose: Ray Data's INFO lines (and any worker output) are back.
    assert "Starting execution of Dataset" in verbose
    assert "workers' logs in" not in verbose

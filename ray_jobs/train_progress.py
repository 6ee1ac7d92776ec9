"""The training jobs' epoch bar, drawn by the driver from what the workers report.

The workers' own prints reach the console only with ``--verbose`` (:mod:`ray_jobs.console`), so
the driver shows the epochs itself: a Ray Train callback (it runs in Ray Train's controller
actor) puts rank 0's metrics of each ``ray.train.report`` into a Ray queue, and a thread of the
driver moves a :func:`igconda.progress.progress` bar (epochs done, ETA, train and validation
loss) as they come. Each epoch therefore appears once, whatever the number of workers; an epoch
repeated after a worker restart moves the bar back to it.
"""

from __future__ import annotations

import contextlib
import queue as std_queue
import threading
from collections.abc import Iterator
from typing import Any

from igconda.progress import progress

#: Metrics shown beside the bar when a worker reports them.
SHOWN = ("train_loss", "valid_loss")
#: Report key of the epochs a run will have in all (the bar's total; absent: no ETA).
TOTAL_KEY = "epochs"


def _callback_class() -> type:
    from ray.train import UserCallback

    class EpochReporter(UserCallback):
        """Forwards rank 0's reported metrics to the driver's queue (runs in the controller)."""

        def __init__(self, sink: Any):
            self.sink = sink

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            if metrics:
                try:
                    self.sink.put_nowait({k: v for k, v in metrics[0].items()
                                          if k in (*SHOWN, TOTAL_KEY, "epoch")})
                except Exception:  # the bar is a convenience: never fail a training for it
                    pass

    return EpochReporter


def show(bar: Any, report: dict[str, Any]) -> None:
    """Move ``bar`` to the reported epoch (forward, or back after a restart) with its losses."""
    total = report.get(TOTAL_KEY)
    if total is not None and bar.total != int(total):
        bar.total = int(total)
    bar.set_postfix({k: f"{report[k]:.4g}" for k in SHOWN if k in report}, refresh=False)
    epoch = int(report.get("epoch", bar.n + 1))
    if epoch >= bar.n:
        bar.update(epoch - bar.n)  # redraws (off a terminal: at most every LINE_INTERVAL_S)
    else:
        bar.n = epoch
        bar.refresh()


@contextlib.contextmanager
def epoch_bar(trainer: Any, desc: str = "train") -> Iterator[None]:
    """Show an epoch bar while ``trainer.fit()`` runs inside this block.

    Adds the reporting callback to ``trainer.run_config.callbacks`` (Ray Train reads them when
    ``fit`` starts); the queue actor asks for no CPU, so it never competes with the workers.
    """
    from ray.util.queue import Empty, Queue

    sink = Queue(actor_options={"num_cpus": 0})
    run_config = trainer.run_config
    run_config.callbacks = [*(run_config.callbacks or []), _callback_class()(sink)]
    bar = progress(None, desc, "epoch")
    stop = threading.Event()

    def follow() -> None:
        while True:
            try:
                show(bar, sink.get(timeout=0.5))
            except (Empty, std_queue.Empty):
                if stop.is_set():
                    return
            except Exception:  # the queue's actor went away with Ray: nothing more to show
                return

    reader = threading.Thread(target=follow, name="epoch-bar", daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join(timeout=10)
        bar.close()
        with contextlib.suppress(Exception):
            sink.shutdown()

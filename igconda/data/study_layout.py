"""Where a study's stages write: the study folder (:class:`StudyLayout`, with each stage's done
mark) and the tuning output (:class:`TuneOutput`); the dataset's and the inference output's
layouts are :mod:`igconda.data.io`'s. Nothing else spells them (``tests/test_layout_owner.py``).
No Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from igconda.data.io import DATASET_INFO, FolderLayout, InferOutput


@dataclass(frozen=True)
class TuneOutput(FolderLayout):
    """The tuning output folder (``ray_jobs.tune --output``, ``<study>/tune``), a local path::

        grid.csv          one row per (D, w, map kind) scored on the tune split
        best.json         the chosen D, w, map kind and τ (written before any MLflow call)
        heatmap.png       mean ⌈DSC⌉ over the grid
        ray_results/      Ray Tune's experiment (``tune-<key>``), what a killed tuning resumes
    """

    @property
    def grid(self) -> Path:
        return self.root / "grid.csv"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def heatmap(self) -> Path:
        return self.root / "heatmap.png"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    @property
    def files(self) -> tuple[Path, Path, Path]:
        """The result files (grid, best, heatmap), for logging and clean-up."""
        return self.grid, self.best, self.heatmap



@dataclass(frozen=True)
class StudyLayout(FolderLayout):
    """A study folder (``ray_jobs.pipeline --output``): one folder per stage::

        cohorts/        the synthetic cohorts' NIfTI files and manifest (demo studies)
        data/           the slice dataset (``dataset.json`` marks it complete)
        train/          Ray Train's checkpoints; ``train/best`` the best one (``model.safetensors``)
        tune/           :class:`TuneOutput` (``best.json`` marks it complete)
        model/          the best checkpoint with its tuned settings (``tuning.json``)
        infer/          :class:`InferOutput` (``summary.json``, written last, marks it complete)
        report.html     the study report
    """

    @property
    def cohorts(self) -> Path:
        return self.root / "cohorts"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def infer(self) -> Path:
        return self.root / "infer"

    @property
    def model(self) -> Path:
        """The study's model folder: the best checkpoint with its tuned settings."""
        return self.root / "model"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def best_checkpoint(self) -> Path:
        # Imported here: igconda.checkpoint imports torch, which reading a dataset must not.
        from igconda.checkpoint import BEST_DIR

        return self.train / BEST_DIR

    @property
    def tuned(self) -> Path:
        return TuneOutput(self.tune).best

    def done_mark(self, stage: str) -> Path:
        """The file whose presence marks ``stage``'s output in this study finished
        (:func:`done_mark`)."""
        return done_mark(stage, getattr(self, "data" if stage == "preprocess" else stage))


def done_mark(stage: str, folder: Path) -> Path:
    """The file whose presence marks the output of ``stage`` (``data``/``preprocess``,
    ``train``, ``tune``, ``model``, ``infer``) in its ``folder`` finished: the pipeline's skip
    rule and what ``ray_jobs.relog`` re-logs."""
    from igconda.checkpoint import BEST_DIR, MODEL_FILE
    from igconda.tuned_model import TUNING_FILE

    folder = Path(folder)
    marks = {"data": lambda: folder / DATASET_INFO, "train": lambda: folder / BEST_DIR / MODEL_FILE,
             "tune": lambda: TuneOutput(folder).best, "model": lambda: folder / TUNING_FILE,
             "infer": lambda: InferOutput(folder).summary}
    stage = "data" if stage == "preprocess" else stage
    if stage not in marks:
        raise ValueError(f"no done mark for stage {stage!r} (one of {', '.join(marks)})")
    return marks[stage]()

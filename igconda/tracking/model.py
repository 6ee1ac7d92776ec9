"""A checkpoint or model folder as an MLflow model, and a preprocessed dataset as an MLflow input.

:func:`log_model_folder` logs a folder (``igconda.checkpoint`` layout, with or without the
study's ``tuning.json``) as an ``mlflow.pyfunc`` model: the folder is the model's ``model``
artifact and :class:`IgcondaPyfuncModel` wraps :class:`igconda.inference.CounterfactualPredictor`
with the folder's settings (:func:`igconda.tuned_model.model_settings`, as ``igconda detect``),
so that::

    model = mlflow.pyfunc.load_model("models:/igconda/1")   # or runs:/<run>/model
    out = model.predict(slices)                              # a DataFrame of slice rows

runs the counterfactual on a batch of slices. Input: one row per slice with ``image`` (the
flattened H·W slice in [0, 1], as in ``data/slices/*.parquet``) and, for non-square or non-default
slices, ``height`` and ``width``; identifier columns (``patient_id``, ``slice_index``, ...) are
copied. Output: those identifiers plus ``anomaly_map``, ``counterfactual``,
``counterfactual_w0`` (flattened float32 lists) and ``lesion_mask`` (``anomaly_map >= τ``, uint8).

The igconda package itself travels with the model (``code_paths``), its dependencies are the
package's own install requirements.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

#: The model's name under its run's artifacts (``runs:/<run>/model``).
MODEL_NAME = "model"
# The model's code, stored with it (see log_model_folder).
_MODEL_CODE = """import mlflow
from igconda.tracking.model import IgcondaPyfuncModel

mlflow.models.set_model(IgcondaPyfuncModel())
"""
# Used when igconda is not installed as a distribution (a bare checkout on sys.path).
_FALLBACK_REQUIREMENTS = ["torch", "monai", "numpy", "pandas", "pyarrow", "safetensors", "pyyaml",
                          "scipy", "scikit-learn", "connected-components-3d", "einops", "nibabel"]


class IgcondaPyfuncModel(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc face of a model folder (see the module docstring).

    Args (of ``load_context``'s model config, all optional): ``device`` (torch device; default
    CUDA when available) and ``batch_size`` (slices per network call; default the checkpoint's
    ``infer.batch_size``).
    """

    def load_context(self, context: Any) -> None:
        from igconda.checkpoint import load_checkpoint_config
        from igconda.inference import CounterfactualPredictor
        from igconda.tuned_model import model_settings

        folder = Path(context.artifacts[MODEL_NAME])
        config = load_checkpoint_config(folder)
        settings, self.origin = model_settings(folder, config)
        options = dict(getattr(context, "model_config", None) or {})
        self.batch_size = int(options.get("batch_size") or config.infer.batch_size)
        self.threshold = float(settings["threshold"])
        self.predictor = CounterfactualPredictor(
            folder, noise_level=int(settings["noise_level"]),
            guidance_scale=float(settings["guidance_scale"]), stride=int(settings["stride"]),
            map_kind=str(settings["map_kind"]), threshold=self.threshold,
            device=options.get("device"), score=False)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        """Counterfactuals and maps of a DataFrame of slice rows (see the module docstring)."""
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if "image" not in model_input.columns:
            raise ValueError("the input has no 'image' column: one flattened H·W slice per row")
        parts = []
        for start in range(0, len(model_input), self.batch_size):
            rows = model_input.iloc[start:start + self.batch_size]
            batch = {name: (np.stack([np.asarray(x, np.float32).ravel() for x in rows[name]])
                            if name in ("image", "mask") else rows[name].to_numpy())
                     for name in rows.columns}
            out = self.predictor(batch)
            out["lesion_mask"] = (out["anomaly_map"] >= self.threshold).astype(np.uint8)
            parts.append(pd.DataFrame({k: list(v) if np.ndim(v) > 1 else v for k, v in out.items()}))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _requirements() -> list[str]:
    try:
        required = importlib.metadata.requires("igconda") or []
    except importlib.metadata.PackageNotFoundError:
        return list(_FALLBACK_REQUIREMENTS)
    # Install requirements only (no extras); Ray is not needed to load or run the model.
    return [r for r in required if "extra ==" not in r and not r.startswith("ray")]


def log_model_folder(folder: str | Path, *, registered_model_name: str | None = None) -> str:
    """Log ``folder`` as the active run's pyfunc model ``model``; returns the model's URI.

    With ``registered_model_name`` it also becomes a new version of that registered model
    (needs a store with a registry: SQLite or a server), loadable as ``models:/<name>/<version>``.
    """
    import igconda
    from igconda.checkpoint import CONFIG_FILE
    from igconda.tuned_model import TUNING_FILE

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint or model folder (no {CONFIG_FILE})")
    with tempfile.TemporaryDirectory() as tmp:
        # "Models from code": MLflow stores this script, not a pickled object, so loading the
        # model runs no unpickled code and survives changes to the class's module.
        code = Path(tmp) / "igconda_model.py"
        code.write_text(_MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(code),
            artifacts={MODEL_NAME: str(folder)},
            code_paths=[str(Path(igconda.__file__).parent)],
            pip_requirements=_requirements(),
            registered_model_name=registered_model_name,
            metadata={"igconda.tuning": json.loads((folder / TUNING_FILE).read_text())
                      if (folder / TUNING_FILE).is_file() else None},
        )
    return info.model_uri


def log_dataset(data_dir: str | Path, context: str) -> None:
    """Record a preprocessed dataset as an input of the active run (``mlflow.log_input``).

    The dataset is its patient-level ``splits.csv`` (who is in which split, cohort, tracer),
    with the data folder as its source and :func:`igconda.train_loop.dataset_version` as its
    digest; the slices themselves stay where they are. ``context``: ``train``, ``tune``, ``test``.
    """
    from igconda.data.io import slices_root
    from igconda.train_loop import dataset_version

    data_dir = Path(data_dir).resolve()
    splits = data_dir / "splits.csv"
    frame = pd.read_csv(splits) if splits.is_file() else pd.DataFrame(
        {"patient_id": sorted(p.stem for p in Path(slices_root(data_dir)).glob("*/*.parquet"))})
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path is ambiguous.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(frame, source=str(data_dir), name=data_dir.name,
                                          digest=dataset_version(str(data_dir)).split(":")[-1])
    mlflow.log_input(dataset, context=context)

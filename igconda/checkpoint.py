"""Checkpoints: a folder with safe, code-free files, so loading never executes code.

Layout of a checkpoint directory::

    config.yaml         the full StudyConfig that made the weights
    model.safetensors   ConditionalUNet state dict (UNet + class embedding)
    ema.safetensors     EMA weights (only when train.ema_decay > 0); inference prefers these
    train_state.pt      optimizer state, epoch, RNG states, losses; torch.load(weights_only=True)
    metadata.json       epoch, validation loss, is_best (best so far when written), run ids

Ray Train wraps this folder as a ``ray.train.Checkpoint``; the same folder is what
``igconda detect --checkpoint`` and the inference job load.

The trained baselines (:mod:`igconda.baselines.supervised`, :mod:`igconda.baselines.resnet_classifier`)
use the same files without ``ema.safetensors``; their ``config.yaml`` is ``{baseline: <method>,
settings: {...}}`` (:func:`save_baseline_checkpoint`), which :func:`load_checkpoint_config` refuses.

The training job (``ray_jobs.train``) also leaves, under its ``--output`` folder::

    best/                 a local copy of the checkpoint with the lowest validation loss
    best_checkpoint.json  where that checkpoint lives in Ray's storage (local, NFS or S3 URI),
                          its epoch and validation loss; see :func:`read_best_pointer`

Later stages (tune, infer, detect) take ``<output>/best`` as their ``--checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from igconda.config import StudyConfig, load_config, save_config, to_plain
from igconda.io_utils import atomic_write, replace_dir
from igconda.models import ConditionalUNet, build_unet

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
METADATA_FILE = "metadata.json"
BEST_DIR = "best"
BEST_POINTER = "best_checkpoint.json"
#: The key of a baseline network's ``config.yaml`` naming its method (never a StudyConfig section).
BASELINE_KEY = "baseline"

SettingsT = TypeVar("SettingsT")


class CheckpointError(ValueError):
    """A checkpoint folder is missing files, has a damaged file or does not match its config."""


def _damaged(path: Path, err: BaseException) -> CheckpointError:
    """The error for a file that exists but cannot be decoded (truncated copy, disk error)."""
    reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return CheckpointError(
        f"{path}: the checkpoint is damaged (the file is truncated or corrupt: {reason}); copy the "
        f"checkpoint folder again or use another checkpoint (e.g. an earlier one of the same run)")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` state dict; CheckpointError naming the file if it is truncated or corrupt."""
    path = Path(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise _damaged(path, err) from None


def check_checkpoint(directory: str | Path, *, resume: bool = False,
                     config: StudyConfig | None = None) -> None:
    """Refuse a checkpoint folder with a damaged file before anything loads it.

    Reads only the headers of the ``.safetensors`` files (cheap: no tensor is read), so a job's
    driver can call it before its Ray actors or workers each load the weights and fail there
    with a remote traceback. safetensors checks that the header's tensors cover the file
    exactly, so a truncated copy is caught; flipped bits inside tensor data are not (the format
    has no checksum). With ``resume``, ``train_state.pt`` must also be present and load.
    ``config``: the folder's config as the caller loaded it (:func:`load_checkpoint_config`),
    so that ``config.yaml`` is not parsed again; read here when None.

    Raises:
        CheckpointError: naming the missing or damaged file.
    """
    directory = Path(directory)
    if config is None:
        load_checkpoint_config(directory)
    if not (directory / MODEL_FILE).is_file():
        raise CheckpointError(f"{directory}: no {MODEL_FILE} in checkpoint")
    for name in (MODEL_FILE, EMA_FILE):
        path = directory / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except SafetensorError as err:
            raise _damaged(path, err) from None
    if resume and load_train_state(directory) is None:
        raise CheckpointError(f"{directory}: no {STATE_FILE}; cannot resume training")


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # unwrap DDP
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _write_folder(
    directory: str | Path,
    write_config: Callable[[Path], object],
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    train_state: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
) -> Path:
    """Write a checkpoint folder atomically (written beside it, then renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_config(tmp / CONFIG_FILE)
        save_file(_state_dict(model), str(tmp / MODEL_FILE))
        if ema_model is not None:
            save_file(_state_dict(ema_model), str(tmp / EMA_FILE))
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2))
        # Old checkpoint aside, new one in, old one deleted: a crash never leaves none.
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    config: StudyConfig,
    ema_model: torch.nn.Module | None = None,
    train_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (written beside it, then renamed into place)."""
    return _write_folder(directory, lambda path: save_config(config, path), model, ema_model,
                         train_state, metadata)


def load_checkpoint_config(directory: str | Path) -> StudyConfig:
    """The StudyConfig stored in a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint folder (no {CONFIG_FILE})")
    method = _baseline_method(path)
    if method is not None:
        raise CheckpointError(f"{directory}: a checkpoint of the {method!r} baseline, not of an "
                              "IgCONDA model")
    return load_config(path)


# --------------------------------------------------------------------------------------------
# Baseline networks (igconda.baselines): the same layout, their own settings in config.yaml
# --------------------------------------------------------------------------------------------


def _baseline_method(config_file: Path) -> str | None:
    """The method named by a baseline checkpoint's config file; None for any other file."""
    try:
        data = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError:
        return None  # load_config reports it
    value = data.get(BASELINE_KEY) if isinstance(data, dict) else None
    return str(value) if value is not None else None


def save_baseline_checkpoint(
    directory: str | Path,
    *,
    method: str,
    settings: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a baseline network's checkpoint folder (same files; no EMA).

    ``config.yaml`` holds ``{baseline: <method>, settings: {...}}``, where ``settings`` is the
    frozen dataclass the network is built from (tuples stored as lists); ``train_state.pt``
    holds ``{epoch, optimizer}`` to resume; ``metadata.json`` the epoch, torch version and
    ``metadata``.
    """
    train_state: dict[str, Any] = {"epoch": int(epoch)}
    if optimizer is not None:
        train_state["optimizer"] = optimizer.state_dict()
    metadata = {"epoch": int(epoch), "torch_version": torch.__version__, **(metadata or {})}
    text = yaml.safe_dump({BASELINE_KEY: method, "settings": to_plain(dataclasses.asdict(settings))},
                          sort_keys=False)
    return _write_folder(directory, lambda path: path.write_text(text), model, None, train_state,
                         metadata)


def load_baseline_checkpoint(
    directory: str | Path, *, method: str, settings_type: type[SettingsT],
    device: str | torch.device = "cpu",
) -> tuple[SettingsT, dict[str, torch.Tensor]]:
    """The settings and weights of a :func:`save_baseline_checkpoint` folder.

    Args:
        directory: the checkpoint folder.
        method: the baseline it must hold (a folder of another method is refused).
        settings_type: the frozen dataclass of that method's settings.
        device: where the weights are loaded.

    Raises:
        CheckpointError: no such folder, another method's folder, or settings that do not fit.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint folder (no {CONFIG_FILE})")
    found = _baseline_method(path)
    if found != method:
        raise CheckpointError(f"{directory}: expected a checkpoint of the {method!r} baseline, "
                              f"found {'an IgCONDA model' if found is None else repr(found)}")
    values = yaml.safe_load(path.read_text()).get("settings") or {}
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: 'settings' must be a mapping, got {values!r}")
    try:
        settings = settings_type(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in values.items()})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: settings do not fit {settings_type.__name__}: {err}") from None
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {MODEL_FILE} in checkpoint")
    return settings, load_weights(weights, device)


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True
) -> tuple[ConditionalUNet, StudyConfig]:
    """Build the model from the stored config and load its weights (EMA if present).

    Returns the model in eval mode on ``device`` and the checkpoint's StudyConfig.
    """
    directory = Path(directory)
    config = load_checkpoint_config(directory)
    weights = directory / EMA_FILE if prefer_ema and (directory / EMA_FILE).is_file() else directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {MODEL_FILE} in checkpoint")
    model = build_unet(config.model)
    state = load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: weights do not match the stored model config: {err}") from None
    return model.to(device).eval(), config


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    """Optimizer/epoch/RNG state for resuming, or None if the checkpoint has none."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        # RuntimeError: not a zip archive / truncated zip; EOFError: empty file;
        # UnpicklingError: garbage or a pickle that weights_only refuses.
        raise _damaged(path, err) from None
    if not isinstance(state, dict):
        raise _damaged(path, TypeError(f"expected a mapping, found {type(state).__name__}"))
    return state


def load_metadata(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``metadata.json`` (empty dict if absent)."""
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_best_pointer(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``<output_dir>/best_checkpoint.json`` (atomically) describing the best checkpoint.

    Args:
        output_dir: the training job's output folder.
        record: JSON-serialisable facts; the training job writes ``uri`` (the checkpoint in
            Ray's storage), ``local_copy`` (``<output_dir>/best``), ``epoch``, ``valid_loss``
            and ``mlflow_run_id``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True)
    return atomic_write(output_dir / BEST_POINTER, lambda tmp: tmp.write_text(text), suffix=".tmp")


def read_best_pointer(output_dir: str | Path) -> dict[str, Any]:
    """The record written by :func:`write_best_pointer`; CheckpointError if there is none."""
    path = Path(output_dir) / BEST_POINTER
    if not path.is_file():
        raise CheckpointError(f"{output_dir}: no {BEST_POINTER}; has the training job finished?")
    return json.loads(path.read_text())

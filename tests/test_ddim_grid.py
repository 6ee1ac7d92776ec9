"""The (D, s, w) rule has one owner, igconda.ddim_grid: its checks, and every caller (DDIM,
the inference predictor, the study config's infer / tune / baselines keys, the tuning space)
refusing the same invalid (D, s, w) with the owner's own message."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from igconda.config import ConfigError, load_config
from igconda.ddim_grid import (
    ARGUMENTS,
    Names,
    check_counterfactual_params,
    check_grid,
    check_guidance_scale,
    network_evaluations,
)
from igconda.diffusion.counterfactual import counterfactual
from igconda.diffusion.ddim import ddim_encode, timestep_grid
from igconda.diffusion.schedule import NoiseSchedule
from igconda.inference import CounterfactualPredictor
from tuning.space import SPACE_NAMES, validate_space

T = 10  # configs/test.yaml's train.num_train_timesteps, the checkpoint fixture's too

#: (D, s, w) that break one part of the rule each, at T = 10.
INVALID = {
    "D off the grid": (6, 4, 1.0),
    "D at T": (10, 2, 1.0),
    "D beyond T": (12, 2, 1.0),
    "D zero": (0, 2, 1.0),
    "s zero": (4, 0, 1.0),
    "w negative": (4, 2, -1.0),
    "w NaN": (4, 2, float("nan")),
    "w infinite": (4, 2, float("inf")),
}
#: The ones whose fault is in (D, s), which the grid-only callers check.
GRID_ONLY = [k for k in INVALID if not k.startswith("w ")]


def _owner_message(triple, names: Names = ARGUMENTS) -> str:
    with pytest.raises(ValueError) as err:
        check_counterfactual_params(*triple, T, names=names)
    return str(err.value)


# ---- the owner ---------------------------------------------------------------------------


def test_valid_params_give_the_step_count():
    assert check_grid(400, 10, 1000) == 40
    assert check_grid(np.int64(8), np.int32(2)) == 4  # Tune and DataFrames hand NumPy integers
    assert check_counterfactual_params(4, 2, 0, T) == 2  # w = 0 is the unconditional decode
    assert check_guidance_scale(np.float32(3.0)) == 3.0
    assert network_evaluations(400, 1) == 1200


@pytest.mark.parametrize("triple, message", [
    ((6, 4, 1.0), r"noise_level D=6 must be a multiple of stride s=4 .*\(try D=4"),
    ((10, 2, 1.0), r"noise_level D=10 must be < the model's training timesteps T=10"),
    ((0, 2, 1.0), "noise_level D=0 must be > 0"),
    ((4, 0, 1.0), "stride s=0 must be >= 1"),
    ((4.0, 2, 1.0), "noise_level D must be an integer, got 4.0"),
    ((4, True, 1.0), "stride s must be an integer, got True"),
    ((4, 2, -1.0), "guidance_scale w=-1.0 must be a finite number >= 0"),
    ((4, 2, "3"), "guidance_scale w='3' must be a finite number"),
])
def test_each_part_of_the_rule_has_a_clear_message(triple, message):
    with pytest.raises(ValueError, match=message):
        check_counterfactual_params(*triple, T)


def test_messages_name_the_callers_keys():
    names = Names("infer.noise_level", "infer.stride", "infer.guidance_scale",
                  "train.num_train_timesteps")
    assert _owner_message((6, 4, 1.0), names).startswith(
        "infer.noise_level D=6 must be a multiple of infer.stride s=4")
    assert "< train.num_train_timesteps T=10" in _owner_message((12, 2, 1.0), names)


def test_the_rule_and_the_config_need_no_torch(repo_root):
    """The config checks the rule, and loading a config must not import torch."""
    code = "import sys, igconda.config, igconda.ddim_grid; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# ---- every caller refuses with the owner's message ---------------------------------------


@pytest.mark.parametrize("case", INVALID)
def test_ddim_refuses_with_the_owners_message(case):
    from tests.diffusion import tiny_model

    schedule = NoiseSchedule.linear(T, 1e-4, 2e-2)
    D, s, w = INVALID[case]
    with pytest.raises(ValueError) as err:
        counterfactual(tiny_model(), torch.zeros(1, 1, 16, 16), schedule, noise_level=D, stride=s,
                       guidance_scale=w)
    assert str(err.value) == _owner_message(INVALID[case])
    if case in GRID_ONLY:
        for call in (lambda: ddim_encode(tiny_model(), torch.zeros(1, 1, 16, 16), schedule,
                                         noise_level=D, stride=s),
                     lambda: timestep_grid(D, s, num_train_timesteps=T)):
            with pytest.raises(ValueError) as err:
                call()
            assert str(err.value) == _owner_message(INVALID[case])


@pytest.mark.parametrize("case", INVALID)
def test_the_predictor_refuses_with_the_owners_message(checkpoint, case):
    D, s, w = INVALID[case]
    with pytest.raises(ValueError) as err:
        CounterfactualPredictor(checkpoint, noise_level=D, stride=s, guidance_scale=w,
                                device="cpu")
    assert str(err.value) == _owner_message(INVALID[case])


@pytest.mark.parametrize("case", INVALID)
def test_the_config_refuses_infer_and_tune_with_the_owners_message(repo_root, case):
    D, s, w = INVALID[case]
    config = repo_root / "configs" / "test.yaml"
    infer = Names("infer.noise_level", "infer.stride", "infer.guidance_scale",
                  "train.num_train_timesteps")
    with pytest.raises(ConfigError) as err:
        load_config(config, {"infer": {"noise_level": D, "stride": s, "guidance_scale": w}})
    assert _owner_message(INVALID[case], infer) in str(err.value)
    tune = Names("tune.noise_levels", "tune.stride", "tune.guidance_scales",
                 "train.num_train_timesteps")
    with pytest.raises(ConfigError) as err:
        load_config(config, {"tune": {"noise_levels": [D], "stride": s, "guidance_scales": [w]}})
    assert _owner_message(INVALID[case], tune) in str(err.value)


@pytest.mark.parametrize("case", [k for k in GRID_ONLY if k != "D zero"])  # 0 = "T / 5" there
def test_the_config_refuses_the_dpm_cg_grid_with_the_owners_message(repo_root, case):
    D, s, _ = INVALID[case]
    names = Names("baselines.dpm_cg_noise_level(s)", "baselines.dpm_cg_stride",
                  timesteps="train.num_train_timesteps")
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / "test.yaml",
                    {"baselines": {"dpm_cg_noise_level": D, "dpm_cg_stride": s}})
    assert _owner_message(INVALID[case], names) in str(err.value)


@pytest.mark.parametrize("case", INVALID)
def test_the_tuning_space_refuses_with_the_owners_message(case):
    D, s, w = INVALID[case]
    with pytest.raises(ConfigError) as err:
        validate_space([D], [w], s, T)
    assert str(err.value) == _owner_message(INVALID[case], SPACE_NAMES)

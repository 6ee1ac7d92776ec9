"""What the baseline training job builds per method from a study config (no Ray): the classes'
loss weights of the HiResCAM classifier and the supervised UNet's own epoch budget."""

from __future__ import annotations

import pytest

from igconda.baselines.trainers import create_trainer, method_settings, unhealthy_weight
from igconda.data.schema import HEALTHY, UNHEALTHY


@pytest.mark.parametrize("balance,counts,expected", [
    (True, {HEALTHY: 90, UNHEALTHY: 10}, 9.0),
    (True, {HEALTHY: 30, UNHEALTHY: 40}, 0.75),  # more unhealthy slices: they weigh less
    (False, {HEALTHY: 90, UNHEALTHY: 10}, 1.0),  # balancing switched off
    (True, {HEALTHY: 90}, 1.0),                  # nothing to balance
    (True, None, 1.0),
])
def test_the_classifier_weighs_unhealthy_slices_by_the_train_split(test_config, balance, counts,
                                                                   expected):
    study = test_config.replace("train", balance_classes=balance)
    assert unhealthy_weight(study, counts) == pytest.approx(expected)
    settings = method_settings(study, "hirescam", (16, 16), counts)
    assert settings.unhealthy_weight == pytest.approx(expected)
    # The other methods take no class weights.
    assert not hasattr(method_settings(study, "supervised", (16, 16), counts), "unhealthy_weight")


def test_the_trainer_trains_with_the_weight_it_was_built_with(test_config):
    study = test_config.replace("train", balance_classes=True)
    trainer = create_trainer("hirescam", study, (16, 16), class_counts={HEALTHY: 12, UNHEALTHY: 4})
    assert trainer.settings.unhealthy_weight == 3.0
    assert trainer.loss_options() == {"unhealthy_weight": 3.0}


@pytest.mark.parametrize("supervised_epochs,expected", [(0, 2), (5, 5)])
def test_the_supervised_unet_has_its_own_epoch_budget(test_config, supervised_epochs, expected):
    study = test_config.replace("baselines", epochs=2, supervised_epochs=supervised_epochs)
    assert create_trainer("supervised", study, (16, 16)).total_epochs == expected
    assert create_trainer("hirescam", study, (16, 16)).total_epochs == 2


def test_each_labelled_network_is_balanced_once():
    """Oversampling and a class weight would balance twice: the classifier is weighted, the
    supervised UNet (no class weight in its loss) oversampled, f-AnoGAN sees healthy slices only."""
    from igconda.baselines.trainers import TRAINED_METHODS, trainer_class

    oversampled = {m for m in TRAINED_METHODS if trainer_class(m).oversample}
    assert oversampled == {"supervised"}
    assert trainer_class("fanogan").train_filter == f"label == {HEALTHY}"


@pytest.mark.parametrize("method", ["hirescam", "dpm_classifier"])
def test_a_saved_trainer_is_resumable_and_restores_its_progress(test_config, tmp_path, method):
    """save → check_resumable → restore without Ray (the job's --resume path, on one worker)."""
    from igconda.baselines.trainers import check_resumable
    from igconda.checkpoint import CheckpointError

    trainer = create_trainer(method, test_config, (16, 16))
    trainer.epoch, trainer.best_valid_loss, trainer.history = 3, 0.5, [{"epoch": 3.0}]
    trainer.save(tmp_path / "ckpt", {})
    check_resumable(tmp_path / "ckpt")
    fresh = create_trainer(method, test_config, (16, 16))
    fresh.restore(tmp_path / "ckpt")
    assert (fresh.epoch, fresh.best_valid_loss, fresh.history) == (3, 0.5, [{"epoch": 3.0}])
    (tmp_path / "ckpt" / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state.pt"):
        check_resumable(tmp_path / "ckpt")

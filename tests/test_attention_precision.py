"""Attention runs in float32 exactly when a CPU trains under autocast (igconda.models.attention_precision)."""

import copy

import pytest
import torch
from monai.networks.blocks import crossattention, selfattention
from monai.networks.nets import DiffusionModelUNet

from igconda.config import ModelConfig
from igconda.models import build_unet
from igconda.models.attention_precision import (
    Float32TrainingCrossAttentionBlock,
    Float32TrainingSABlock,
    restore_monai_attention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(conditioning="class_embedding"):
    torch.manual_seed(0)
    config = ModelConfig(channels=[8, 8, 8], attention="011", num_head_channels=8, embedding_dim=16,
                         norm_num_groups=4, use_flash_attention=True, conditioning=conditioning)
    return build_unet(config)


def _inputs(batch=4, size=16):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, size, size, generator=generator)
    return x, torch.randint(0, 1000, (batch,), generator=generator), torch.tensor([0, 1, 2, 1][:batch])


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The query dtype of every scaled_dot_product_attention call MONAI's blocks make."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        query = kwargs["query"] if "query" in kwargs else args[0]
        seen.append(query.dtype)
        return original(*args, **kwargs)

    # Both MONAI blocks look it up on torch.nn.functional at call time.
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("conditioning", ["class_embedding", "cross_attention"])
def test_every_attention_block_is_swapped_and_the_state_dict_is_monais(conditioning):
    model = _model(conditioning)
    kinds = [type(m) for m in model.modules()]
    # Seven attention places (levels 2 and 3: one down and two up blocks each, and the mid
    # block); with a cross-attention token each also has a cross-attention block.
    assert kinds.count(Float32TrainingSABlock) == 7
    assert kinds.count(Float32TrainingCrossAttentionBlock) == (7 if conditioning == "cross_attention" else 0)
    assert not any(k in (selfattention.SABlock, crossattention.CrossAttentionBlock) for k in kinds)
    plain = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8, 8),
                               attention_levels=(False, True, True), num_res_blocks=1, num_head_channels=8,
                               norm_num_groups=4, with_conditioning=conditioning == "cross_attention",
                               cross_attention_dim=16 if conditioning == "cross_attention" else None,
                               num_class_embeds=3 if conditioning == "class_embedding" else None,
                               use_flash_attention=True)
    # Loading MONAI's own state dict strictly proves the names and shapes are unchanged.
    model.unet.load_state_dict(plain.state_dict(), strict=True)
    # The EMA copy (copy.deepcopy) keeps the swapped classes.
    assert [type(m) for m in copy.deepcopy(model).modules()] == kinds


@pytest.mark.parametrize("conditioning", ["class_embedding", "cross_attention"])
def test_float32_attention_only_while_training_on_cpu_under_autocast(sdpa_dtypes, conditioning):
    model = _model(conditioning)
    x, t, labels = _inputs()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, labels).float().sum().backward()
    training = set(sdpa_dtypes)
    sdpa_dtypes.clear()
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, labels)
    inference = set(sdpa_dtypes)
    sdpa_dtypes.clear()
    model.train()
    model(x, t, labels)
    assert training == {torch.float32}
    assert inference == {torch.bfloat16}  # the forward kernel is faster in bf16: kept there
    assert set(sdpa_dtypes) == {torch.float32}


def test_training_under_autocast_is_closer_to_fp32_with_float32_attention():
    """The swap changes only precision: the bf16 output moves toward fp32's, never away."""
    model = _model("cross_attention")
    model.train()
    x, t, labels = _inputs()
    reference = model(x, t, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        swapped = model(x, t, labels).float()
    assert restore_monai_attention(model) == 14  # back to MONAI's classes: all-bf16 attention
    assert not any(isinstance(m, (Float32TrainingSABlock, Float32TrainingCrossAttentionBlock))
                   for m in model.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        all_bf16 = model(x, t, labels).float()
    scale = reference.abs().mean()
    assert (swapped - reference).abs().mean() <= 0.02 * scale
    assert (swapped - reference).abs().mean() <= (all_bf16 - reference).abs().mean() * 1.05

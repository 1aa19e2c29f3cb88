"""D-Abstractor: queries on a grid of reference points read the patch grid by deformable attention; the sampling is
checked against hand-computed bilinear values, its locality against a perturbation, and its predictors train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_vlm.adapters import DAbstractor
from lightning_vlm.adapters.d_abstractor import DeformableAttention
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.llava import LLaVA

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def plain_reader(width: int, num_heads: int, num_points: int) -> DeformableAttention:
    """Deformable attention whose value and output maps are the identity, so its output is what it sampled."""
    attention = DeformableAttention(width, num_heads, num_points)
    for linear in (attention.value, attention.out):
        nn.init.eye_(linear.weight)
        nn.init.zeros_(linear.bias)
    return attention


def test_d_abstractor_gives_its_square_of_queries_for_any_square_grid():
    for num_queries in (1, 4):
        adapter = DAbstractor(num_queries, num_layers=2, num_heads=2, num_points=3).build(8, 6)
        assert adapter.num_output_tokens(36) == num_queries
        for num_tokens in (4, 16, 64):
            assert adapter(torch.randn(2, num_tokens, 8)).shape == (2, num_queries, 6)
    with pytest.raises(ValueError, match="not a square"):
        DAbstractor(3)
    with pytest.raises(ValueError, match="square grid"):
        adapter(torch.randn(1, 17, 8))  # a [CLS] token left in


def test_reference_points_start_on_the_centres_of_a_regular_grid():
    assert DAbstractor(1).reference_points.tolist() == [[0.5, 0.5]]
    assert DAbstractor(4).reference_points.tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    third = DAbstractor(9).reference_points
    assert torch.allclose(third[:3], torch.tensor([[1 / 6, 1 / 6], [1 / 2, 1 / 6], [5 / 6, 1 / 6]]))  # (x, y)
    assert torch.allclose(third[3::3, 1], torch.tensor([1 / 2, 5 / 6]))  # rows go down in y


def test_queries_start_from_the_average_pooled_grid():
    adapter = DAbstractor(4, num_layers=0).build(1, 1)
    adapter.proj = nn.Identity()  # look at the queries themselves
    out = adapter(torch.arange(16.0).view(1, 16, 1))
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of {0, 1, 4, 5}, {2, 3, 6, 7}, ...


def test_with_zero_offsets_a_query_samples_the_grid_bilinearly_at_its_reference_point():
    attention = plain_reader(width=4, num_heads=2, num_points=3)
    nn.init.zeros_(attention.offsets.bias)  # its weight starts at zero: every point at the reference
    reference = DAbstractor(9).reference_points[None]  # x, y in {1/6, 1/2, 5/6}: patch coordinates 1/6, 3/2, 17/6
    ramp = (4 * torch.arange(4.0)[:, None] + torch.arange(4.0)).view(1, 16, 1).expand(1, 16, 4)  # 4 x 4, 4 row + col
    out = attention(torch.randn(1, 9, 4), reference, ramp)
    expected = torch.tensor([5, 13, 21, 37, 45, 53, 69, 77, 85]) / 6  # 4 row + col at each query's point
    assert torch.allclose(out[0], expected[:, None].expand(9, 4), atol=1e-5)

    grid = torch.randn(1, 16, 4)
    cells = grid.view(4, 4, 4)  # the first query, at patch coordinates (1/6, 1/6): weights 5/6 and 1/6 per axis
    by_hand = (25 * cells[0, 0] + 5 * cells[0, 1] + 5 * cells[1, 0] + cells[1, 1]) / 36
    assert torch.allclose(attention(torch.randn(1, 9, 4), reference, grid)[0, 0], by_hand, atol=1e-5)


def test_a_query_with_small_offsets_reads_only_the_patches_around_its_reference_point():
    torch.manual_seed(0)
    attention = DeformableAttention(8, num_heads=4, num_points=1)  # each head's point one patch from the reference
    nn.init.normal_(attention.weights.weight)  # query-dependent attention, as after training
    reference = DAbstractor(4).reference_points[None]  # patch coordinates 1.5 and 5.5 on the 8 x 8 grid
    queries, tokens = torch.randn(1, 4, 8), torch.randn(1, 64, 8)
    perturbed = tokens.view(1, 8, 8, 8).clone()
    perturbed[:, :4, 4:] += 10 * torch.randn(1, 4, 4, 8)  # the top-right quarter: rows 0-3, columns 4-7
    change = (attention(queries, reference, perturbed.view(1, 64, 8)) - attention(queries, reference, tokens))
    change = change.norm(dim=-1)[0]
    assert change[1] > 1 and torch.all(change[[0, 2, 3]] < 1e-5)  # only the top-right query (x 0.75, y 0.25) moves


def test_offset_and_weight_predictors_are_learned_and_get_gradients():
    torch.manual_seed(0)
    adapter = DAbstractor(4, num_layers=2, num_heads=2, num_points=2).build(8, 6)
    params = dict(adapter.named_parameters())
    for i in range(2):
        assert params[f"layers.{i}.cross_attention.offsets.weight"].requires_grad
        assert params[f"layers.{i}.cross_attention.weights.weight"].requires_grad
    adapter(torch.randn(2, 16, 8)).square().mean().backward()
    for i, layer in enumerate(adapter.layers):
        assert layer.cross_attention.offsets.weight.grad.abs().sum() > 0, f"layer {i}: no gradient into the offsets"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_llava_reads_the_d_abstractors_queries(tiny_benchmark):
    vision = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT)
    model = LLaVA(vision, LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM), DAbstractor(4, num_heads=2))
    assert model.visual_prompt(torch.randn(2, 3, 64, 64)).shape == (2, 4, 32)  # 4 x 4 patches -> 4 queries

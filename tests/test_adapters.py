"""Adapters: every one maps (B, N, D_in) to (B, M, D_out) with the M it declares, groups or pools the right
neighbours, and is interchangeable inside LLaVA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_vlm.adapters import MLP, AveragePool, Identity, Linear, PerceiverResampler, PixelShuffle
from lightning_vlm.adapters.c_abstractor import CAbstractor
from lightning_vlm.adapters.qformer import QFormerAdapter
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.llava import LLaVA

from conftest import text_loss

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1}
ADAPTERS = [Linear, MLP, lambda: PerceiverResampler(num_latents=5, num_heads=4), lambda: PixelShuffle(2),
            lambda: AveragePool(3)]


@pytest.mark.parametrize("make", ADAPTERS)
def test_shapes_follow_the_declared_token_count(make):
    adapter = make().build(32, 24)
    out = adapter(torch.randn(2, 36, 32))
    assert out.shape == (2, adapter.num_output_tokens(36), 24)


def test_identity_needs_equal_widths_and_adapters_build_once():
    tokens = torch.randn(2, 4, 8)
    assert torch.equal(Identity().build(8, 8)(tokens), tokens)
    with pytest.raises(ValueError, match="equal widths"):
        Identity().build(8, 16)
    with pytest.raises(RuntimeError, match="already built"):
        Linear().build(8, 8).build(8, 8)
    with pytest.raises(RuntimeError, match="before build"):
        Linear()(tokens)


def test_pixel_shuffle_concatenates_each_block_of_neighbours():
    adapter = PixelShuffle(2).build(1, 4)
    adapter.proj = nn.Identity()  # look at what the MLP would read
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid, token value = its index
    out = adapter(grid)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 1].tolist() == [2, 3, 6, 7]
    assert out[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match="square grid"):
        adapter(torch.randn(1, 17, 1))  # a [CLS] token left in


def test_average_pool_averages_each_region():
    adapter = AveragePool(2).build(1, 1)
    adapter.proj = nn.Identity()
    out = adapter(torch.arange(16.0).view(1, 16, 1))
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of {0, 1, 4, 5}, {2, 3, 6, 7}, ...


def test_resampler_reads_any_number_of_tokens_and_ignores_their_order():
    torch.manual_seed(0)
    adapter = PerceiverResampler(num_latents=3, depth=2, num_heads=2).build(8, 6).eval()
    tokens = torch.randn(2, 10, 8)
    out = adapter(tokens)
    assert out.shape == (2, 3, 6) and adapter(torch.randn(2, 50, 8)).shape == (2, 3, 6)
    assert torch.allclose(adapter(tokens[:, torch.randperm(10)]), out, atol=1e-5)  # no positions: a set reader


@pytest.mark.parametrize("make", ADAPTERS)
def test_llava_takes_any_adapter_by_its_widths(make, tiny_benchmark):
    vision = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT)
    model = LLaVA(vision, LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM), make())
    prompt = model.visual_prompt(torch.randn(2, 3, 64, 64))
    assert prompt.shape == (2, model.projector.num_output_tokens(16), 32)  # 4 x 4 patches, [CLS] left out


def test_raw_patches_and_a_linear_adapter_make_fuyu(tiny_benchmark):
    from lightning_vlm.encoders import RawPatches
    from lightning_vlm.encoders.patches import patchify

    model = LLaVA(RawPatches(patch_size=8), LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM), Linear())
    images = torch.randn(2, 3, 64, 64)
    assert model.projector.width_in == 8 * 8 * 3 and not list(model.vision.parameters())  # no image encoder
    assert torch.equal(model.visual_prompt(images), model.projector.proj(patchify(images, 8)))


def test_a_language_model_with_location_tokens_serves_the_grounding_task(tiny_benchmark):
    from lightning_vlm.data.datamodule import ShardDataModule
    from lightning_vlm.paradigms.generative import ImageToText

    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM, location_bins=32)
    assert "<loc_31>" in lm.tokenizer.get_vocab()
    assert lm.model.get_input_embeddings().num_embeddings >= len(lm.tokenizer)
    paradigm = ImageToText(LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT), lm))
    dm = ShardDataModule(root=tiny_benchmark, tasks={"grounding": 1}, batch_size=4)
    dm.trainer = type("T", (), {"lightning_module": paradigm, "global_rank": 0, "world_size": 1, "current_epoch": 0})()
    batch = next(iter(dm.train_dataloader()))
    answer = batch["input_ids"][batch["labels"] != -100]
    assert any(t.startswith("<loc_") for t in lm.tokenizer.convert_ids_to_tokens(answer.tolist()))
    assert torch.isfinite(text_loss(paradigm.model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                                 batch["labels"]))


def test_c_abstractor_pools_any_square_grid_to_its_square_of_queries():
    for num_queries in (1, 4):
        adapter = CAbstractor(num_queries).build(8, 6)
        assert adapter.num_output_tokens(36) == num_queries
        for num_tokens in (4, 16, 64):
            assert adapter(torch.randn(2, num_tokens, 8)).shape == (2, num_queries, 6)
    with pytest.raises(ValueError, match="not a square"):
        CAbstractor(3)
    with pytest.raises(ValueError, match="square grid"):
        adapter(torch.randn(1, 17, 8))  # a [CLS] token left in


def test_c_abstractor_keeps_locality():
    torch.manual_seed(0)
    adapter = CAbstractor(4).build(8, 6).eval()
    tokens = torch.randn(1, 64, 8)
    perturbed = tokens.view(1, 8, 8, 8).clone()
    perturbed[:, :4, :4] += torch.randn(1, 4, 4, 8)  # the top-left quarter of the 8 x 8 grid
    change = (adapter(perturbed.view(1, 64, 8)) - adapter(tokens)).norm(dim=-1)[0]
    assert change[0] > 5 * change[3]  # its own (top-left) token far more than the bottom-right one


def test_q_former_adapter_gives_its_queries_which_read_the_image():
    adapter = QFormerAdapter(num_queries=3, config={"hidden_size": 16, "num_attention_heads": 2,
                                                    "intermediate_size": 32}).build(8, 6)
    out = adapter(torch.randn(2, 10, 8))
    assert out.shape == (2, 3, 6) and adapter.num_output_tokens(10) == 3
    out.square().mean().backward()
    assert adapter.qformer.query_tokens.grad.abs().sum() > 0
    assert adapter.qformer.layers[0].crossattention.key.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: CAbstractor(4), lambda: QFormerAdapter(2, config={"hidden_size": 16})])
def test_new_adapters_train_every_parameter_inside_llava(make, tiny_benchmark):
    test_llava_takes_any_adapter_by_its_widths(make, tiny_benchmark)
    adapter = make().build(8, 6)
    adapter(torch.randn(2, 16, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())

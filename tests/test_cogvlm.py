"""CogVLM's visual expert: equal to the LM at initialisation, reached by image tokens only, trained alone under the
frozen plan, restarted from loaded LM weights, and decoded alike with and without the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_vlm.adapters import Linear
from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.encoders import RawPatches
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.cogvlm import EXPERT_TARGETS, CogVLM
from lightning_vlm.paradigms.generative import ImageToText
from lightning_vlm.tokens import IGNORE_INDEX

TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}
IMAGE_TOKENS = 4  # 32 x 32 pixels in 16 x 16 raw patches


def build(tokenizer: str, seed: int = 0) -> CogVLM:
    torch.manual_seed(seed)
    return CogVLM(RawPatches(patch_size=16), LanguageModel(tokenizer=tokenizer, config=TINY_LM), Linear()).eval()


def inputs(model: CogVLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images and two texts: row 0 has text before and after its placeholder, row 1 starts with it."""
    image = model.language_model.image_token_id
    ids = torch.tensor([[5, image, 7, 8, 9, 10], [image, 11, 12, 13, 14, 15]])
    return torch.randn(2, 3, 32, 32), ids, torch.ones_like(ids)


def perturb_experts(model: CogVLM, scale: float = 0.3) -> None:
    with torch.no_grad():
        for param in model.visual_experts.parameters():
            param.add_(scale * torch.randn_like(param))


def expert_grads(model: CogVLM) -> dict[str, bool]:
    """Whether each expert's weight received a nonzero gradient, by 'layer.name'."""
    return {f"{i}.{name}": expert.linear.weight.grad is not None and bool(expert.linear.weight.grad.any())
            for i, layer in enumerate(model.visual_experts.layers) for name, expert in layer.items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_benchmark) -> str:
    return tiny_benchmark


def test_experts_equal_to_the_lm_leave_its_predictions_unchanged(tokenizer):
    torch.manual_seed(0)
    language_model = LanguageModel(tokenizer=tokenizer, config=TINY_LM)
    plain = copy.deepcopy(language_model.model)  # the LM alone, before the experts hook into it
    model = CogVLM(RawPatches(patch_size=16), language_model, Linear()).eval()
    pixels, ids, mask = inputs(model)
    sequence = model.interleave(pixels, ids, mask, labels=ids)
    image = sequence.image_slot >= 0
    assert image.sum(1).tolist() == [IMAGE_TOKENS, IMAGE_TOKENS] and image[0, 1:1 + IMAGE_TOKENS].all()

    with torch.no_grad():
        out = model(pixels, ids, mask, ids)
        reference = plain(inputs_embeds=sequence.embeds, attention_mask=sequence.mask, output_hidden_states=True)
    torch.testing.assert_close(out.hidden, reference.hidden_states[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.head(out.hidden), reference.logits, rtol=0, atol=1e-5)

    perturb_experts(model)  # trained experts: the image tokens read differently, and the text after them with them
    with torch.no_grad():
        changed = (model(pixels, ids, mask, ids).hidden - out.hidden).abs().amax(-1) > 1e-4
    assert changed.tolist() == [[False] + [True] * 8, [True] * 9]  # causal: the text before the image is untouched


def test_text_positions_never_send_gradient_into_the_experts(tokenizer):
    model = build(tokenizer)
    model.language_model.requires_grad_(False)
    perturb_experts(model)
    pixels, ids, mask = inputs(model)
    lm = model.language_model

    text = lm.embed(ids).detach().requires_grad_()  # a graph to backpropagate through, the LM being frozen
    with model.visual_experts.routing(torch.zeros_like(ids, dtype=torch.bool)):  # text only: no image tokens
        lm(text, mask, ids).hidden.square().sum().backward()  # a loss on every position
    assert text.grad.any() and not any(expert_grads(model).values())

    rows = []  # what the expert's copy of layer 0's q_proj computes on: the image tokens' rows only
    model.visual_experts.layers[0]["q_proj"].linear.register_forward_hook(lambda m, a, o: rows.append(len(a[0])))
    out = model(pixels, ids, mask, ids)  # labels on the text only: images get IGNORE_INDEX
    assert rows == [2 * IMAGE_TOKENS] and (out.labels[out.labels != IGNORE_INDEX] != lm.image_token_id).all()
    out.head(out.hidden[out.labels != IGNORE_INDEX]).logsumexp(-1).sum().backward()
    grads = expert_grads(model)
    # the text's loss reaches the experts only through the image tokens' keys and values: every expert of the first
    # layer, but in the last layer only k and v (its image queries, outputs and MLP feed no text position)
    last = len(model.visual_experts.layers) - 1
    assert grads == {f"{i}.{name}": i < last or name in ("k_proj", "v_proj")
                     for i in range(last + 1) for name in EXPERT_TARGETS}
    assert all(param.grad is None for param in lm.parameters())


def test_the_frozen_plan_trains_the_experts_and_projector_only(tokenizer):
    model = build(tokenizer)
    paradigm = ImageToText(model)
    StagedFreezing([{"start_step": 0, "freeze": ["vision", "language_model"]}]).apply(paradigm)
    pixels, ids, mask = inputs(model)
    labels = ids.masked_fill(ids == model.language_model.image_token_id, IGNORE_INDEX)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "labels": labels}
    lm_before = copy.deepcopy(model.language_model.state_dict())
    experts_before = copy.deepcopy(model.visual_experts.state_dict())
    optimizer = torch.optim.AdamW([p for p in paradigm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        paradigm.loss(paradigm.model_output(batch)).total.backward()
        optimizer.step()

    assert all(not p.requires_grad and p.grad is None for p in model.language_model.parameters())
    assert all(p.requires_grad for p in [*model.visual_experts.parameters(), *model.projector.parameters()])
    assert all(p.grad.any() for p in model.projector.parameters()) and all(expert_grads(model)[f"0.{name}"]
                                                                           for name in EXPERT_TARGETS)
    assert all(torch.equal(value, model.language_model.state_dict()[key]) for key, value in lm_before.items())
    assert all(not torch.equal(value, model.visual_experts.state_dict()[key]) for key, value in experts_before.items())


def test_loaded_lm_weights_restart_the_experts_and_a_full_state_dict_keeps_its_own(tokenizer):
    model = build(tokenizer, seed=0)
    other = LanguageModel(tokenizer=tokenizer, config=TINY_LM)  # another LM: what init_from loads
    model.language_model.load_state_dict(other.state_dict(), strict=False)
    first = model.visual_experts.layers[0]
    assert torch.equal(first["q_proj"].linear.weight, other.model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(first["down_proj"].linear.weight, other.model.model.layers[0].mlp.down_proj.weight)

    perturb_experts(model)
    restored = build(tokenizer, seed=1)
    restored.load_state_dict(model.state_dict())  # a CogVLM checkpoint: its experts, not copies of its LM
    assert all(torch.equal(value, restored.state_dict()[key]) for key, value in model.state_dict().items())


def decoding_model(tokenizer: str) -> CogVLM:
    """Weights large enough that greedy decoding does not repeat one token, the experts moved away from them."""
    model = build(tokenizer)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.4)
    model.language_model.load_state_dict(model.language_model.state_dict())  # experts from these weights
    perturb_experts(model)
    return model


def test_generation_with_the_cache_equals_greedy_decoding_without(tokenizer):
    model = decoding_model(tokenizer)
    pixels, ids, mask = inputs(model)
    lm, steps = model.language_model, 6

    sequence = model.interleave(pixels, ids, mask)
    embeds, image, expected = sequence.embeds, sequence.image_slot >= 0, []
    with torch.no_grad():
        for _ in range(steps):  # the whole sequence again at every step; generated tokens are text
            with model.visual_experts.routing(image):
                out = lm(embeds, torch.ones(embeds.shape[:2], dtype=torch.long), None)
            logits = out.head(out.hidden[:, -1])
            logits[:, lm.tokenizer.eos_token_id] = float("-inf")  # as min_new_tokens does
            expected.append(logits.argmax(-1))
            embeds = torch.cat([embeds, lm.embed(expected[-1])[:, None]], 1)
            image = torch.cat([image, torch.zeros_like(image[:, :1])], 1)
    expected = torch.stack(expected, 1)

    options = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    cached = model.generate(pixels, ids, mask, **options)
    assert torch.equal(cached, expected), (cached, expected)
    assert torch.equal(model.generate(pixels, ids, mask, use_cache=False, **options), expected)
    assert len(set(expected.flatten().tolist())) > 2
    plain = lm.generate(sequence.embeds, sequence.mask, **options)  # every token through the LM's own layers
    assert not torch.equal(plain, expected)


def test_prompts_of_different_lengths_decode_as_each_alone(tokenizer):
    model = decoding_model(tokenizer)
    image, pad = model.language_model.image_token_id, model.language_model.tokenizer.pad_token_id
    # row 0 shows two images, row 1 one after left padding: row 1's sequence ends padded until moved left
    ids = torch.tensor([[image, 5, image, 7, 8, 9], [pad, image, 11, 12, 13, 14]])
    mask, index = (ids != pad).long(), torch.tensor([[0, 1], [2, -1]])
    pixels = torch.randn(3, 3, 32, 32)
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    batched = model.generate(pixels, ids, mask, index, **options)
    alone = [model.generate(pixels[:2], ids[:1], mask[:1], index[:1], **options),
             model.generate(pixels[2:], ids[1:, 1:], mask[1:, 1:], torch.tensor([[0]]), **options)]
    assert torch.equal(batched, torch.cat(alone))


def test_lora_on_the_lm_keeps_the_experts_on_its_base_layers(tokenizer):
    model = build(tokenizer)
    perturb_experts(model)
    pixels, ids, mask = inputs(model)
    with torch.no_grad():
        before = model(pixels, ids, mask, ids).hidden
    lora = {"language_model": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    StagedFreezing([{"start_step": 0, "freeze": ["vision"], "lora": lora}]).apply(ImageToText(model))
    with torch.no_grad():  # the adapters start inert: the same predictions, the image tokens still routed
        assert torch.equal(model(pixels, ids, mask, ids).hidden, before)
    model.language_model.load_state_dict(model.language_model.state_dict())
    base = model.language_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(model.visual_experts.layers[0]["q_proj"].linear.weight, base.weight)

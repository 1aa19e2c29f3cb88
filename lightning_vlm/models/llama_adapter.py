"""LLaMA-Adapter (Zhang et al., 2023): learnable adaptation prompts in the top layers of a frozen language model, read
through zero-init attention.

Each of the LM's top `num_layers` decoder layers gets K learnable prompts. The layer's own (frozen) key and value
projections read them; every word token attends to them with a softmax over the prompts alone, scaled per head by a
gating factor initialised at 0 and added to the layer's ordinary attention output, so training starts from the LM's
exact behaviour. For an image, the image encoder's global feature, projected to the LM's width, is added to every
prompt of every adapted layer; the image never enters the LM's input as tokens.

Written by hand rather than with peft's `AdaptionPromptConfig`: peft adds it only by wrapping the LM in a PeftModel
(`inject_adapter_in_model` refuses it), which renames every weight of the LM; its prompt is one (1, K, D) parameter
whose keys are reshaped for a batch of one, so no per-image feature can be added to it; and its gate is one scalar
per layer rather than one per head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import rotate_half

from lightning_vlm.adapters import MLP, Adapter
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.models.visual_prompt import VisualPromptLM


class LLaMAAdapter(VisualPromptLM):
    """Image encoder -> global feature -> projection (`adapter`, default a two-layer GELU MLP) -> added to the
    `num_prompts` adaptation prompts of the LM's top `num_layers` layers (default: every layer). The text alone is
    the LM's input, with no image placeholder, so each row reads its own image (``image_index`` is not used)."""

    places_images = False

    def __init__(self, vision: VisionEncoder, language_model: LanguageModel, adapter: Adapter | None = None,
                 num_prompts: int = 10, num_layers: int | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.projector = (adapter or MLP()).build(vision.width, language_model.width)
        total = len(language_model.model.get_decoder().layers)
        num_layers = total if num_layers is None else num_layers
        if not 0 < num_layers <= total:
            raise ValueError(f"num_layers must be between 1 and the LM's {total} layers, got {num_layers}")
        self.adaption = AdaptionPrompts(language_model, range(total - num_layers, total), num_prompts)

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1, D_lm): the image encoder's pooled feature projected to the LM's width."""
        return self.projector(self.vision(pixel_values).pooled[:, None])

    def predict_text(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     image_index: Tensor | None = None) -> NextTokenOutput:
        """The LM's predictions of the text, its adapted layers reading the prompts that carry the image."""
        lm = self.language_model
        with self.adaption.prompting(self.visual_prompt(pixel_values)[:, 0]):
            return lm(lm.embed(input_ids), attention_mask, labels)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                 image_index: Tensor | None = None, **generation) -> Tensor:
        """New token ids continuing the left-padded prompts, every decoding step reading the image's prompts."""
        lm = self.language_model
        with self.adaption.prompting(self.visual_prompt(pixel_values)[:, 0]):
            return lm.generate(lm.embed(prompt_ids), prompt_mask, **generation)


class AdaptionPrompts(nn.Module):
    """K learnable prompts (standard normal, as the paper's code initialises them) and per-head gates (zeros) for
    each of the LM's decoder layers `layer_indices`. They act as forward hooks of those layers' self-attention, so
    the LM keeps its module tree and weight names (checkpoints, LoRA targets) and freezing it leaves them free; every
    LM forward inside `prompting(image)` reads them, and outside it the LM runs as it is."""

    def __init__(self, language_model: LanguageModel, layer_indices: Sequence[int], num_prompts: int) -> None:
        super().__init__()
        layers = language_model.model.get_decoder().layers
        heads = language_model.model.config.num_attention_heads
        self.prompts = nn.Parameter(torch.randn(len(layer_indices), num_prompts, language_model.width))
        self.gates = nn.Parameter(torch.zeros(len(layer_indices), heads))
        self._image: Tensor | None = None
        for slot, index in enumerate(layer_indices):
            if getattr(layers[index], "gradient_checkpointing", False):
                raise ValueError("LLaMA-Adapter needs the LM without grad_checkpointing: a checkpointed layer is "
                                 "recomputed in the backward pass, after `prompting` has released the image")
            attention = layers[index].self_attn
            check_attention(attention)
            attention.register_forward_hook(self._hook(slot), with_kwargs=True)

    @contextmanager
    def prompting(self, image: Tensor) -> Iterator[None]:
        """The LM's forwards inside read the prompts with `image` (B, D_lm) added to each (beam search's repeated
        rows read their sample's)."""
        self._image = image
        try:
            yield
        finally:
            self._image = None

    def _hook(self, slot: int):
        def after_attention(attention: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
            if self._image is None:
                return output
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            prompts = self.prompts[slot] + self._image[:, None]
            if hidden.shape[0] != prompts.shape[0]:  # beam search repeats each sample num_beams times
                prompts = prompts.repeat_interleave(hidden.shape[0] // prompts.shape[0], dim=0)
            read = prompt_attention(attention, hidden, kwargs["position_embeddings"], prompts, self.gates[slot])
            return (output[0] + read, *output[1:])

        return after_attention


def prompt_attention(attention: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor],
                     prompts: Tensor, gate: Tensor) -> Tensor:
    """(B, T, D) what the word tokens `hidden` read from `prompts` (B, K, D) through the layer's own projections: the
    tokens' rotated queries against the prompts' keys (which carry no position), a softmax over the K prompts alone,
    scaled per head by `gate` (H,), the prompts' values, then the output projection (zero-init attention)."""
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)  # (B, H, T, hd)
    cos, sin = (table.unsqueeze(1) for table in position_embeddings)
    query = query * cos + rotate_half(query) * sin
    prompts = prompts.to(hidden.dtype)
    key, value = (proj(prompts).view(batch, prompts.shape[1], -1, head_dim).transpose(1, 2)  # (B, H_kv, K, hd)
                  for proj in (attention.k_proj, attention.v_proj))
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.softmax((query @ key.transpose(-1, -2)).float() * attention.scaling, dim=-1)
    weights = (weights * gate.float()[:, None, None]).to(hidden.dtype)
    return attention.o_proj((weights @ value).transpose(1, 2).reshape(batch, length, -1))


def check_attention(attention: nn.Module) -> None:
    """A clear error for a layer `prompt_attention` cannot read: it needs Llama-style attention (q/k/v/o projections,
    rotary positions, no query norm) whose output projection has no bias (it would be added twice)."""
    projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if None in projections or hasattr(attention, "q_norm") or attention.o_proj.bias is not None:
        raise ValueError(f"LLaMA-Adapter reads Llama-style self-attention; {type(attention).__name__} is not")

"""CogVLM (Wang et al., 2023): a trainable visual expert in every layer of a frozen language model.

The image tokens stand in the text as LLaVA's do (image encoder -> MLP projector -> where the placeholder stands),
and the LM reads text and image tokens as one sequence with one causal attention. In every decoder layer, the image
tokens go through the visual expert: trainable copies of the attention's QKV projections, of its output projection
and of the MLP, initialised from the LM's; the text tokens go through the LM's own layers, which stay frozen, so the
LM's behaviour on text alone is unchanged (deep fusion without losing the LM's language skills). Left out: the
paper's single position id shared by all tokens of an image (positions run on as in LLaVA) and its boi/eoi tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_vlm.adapters import MLP, Adapter
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.models.visual_prompt import VisualPromptLM, move_padding_left

# Llama's names (Mistral, Qwen2, Gemma, SmolLM2 share them): attention's q, k, v and output projections, the MLP
EXPERT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CogVLM(VisualPromptLM):
    """Image encoder -> adapter ("projector", built for the two widths) -> language model with a visual expert
    (`VisualExperts` over `targets`) in every layer; the adapted tokens placed where the text's placeholder stands."""

    def __init__(self, vision: VisionEncoder | RawPatches, language_model: LanguageModel,
                 adapter: Adapter | None = None, targets: Sequence[str] = EXPERT_TARGETS) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.projector = (adapter or MLP()).build(vision.width, language_model.width)
        self.visual_experts = VisualExperts(language_model, targets)  # after the LM: its own weights load after it

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the adapter's tokens from the image encoder's patch tokens."""
        return self.projector(self.vision(pixel_values).patch_tokens)

    def predict_text(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     image_index: Tensor | None = None) -> NextTokenOutput:
        """The LM's predictions of the text with the images placed, the image tokens read by the visual experts."""
        sequence = self.interleave(pixel_values, input_ids, attention_mask, image_index, labels)
        with self.visual_experts.routing(sequence.image_slot >= 0):
            return self.language_model(sequence.embeds, sequence.mask, sequence.labels)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                 image_index: Tensor | None = None, **generation: Any) -> Tensor:
        """New LM token ids continuing the left-padded prompts (B, L): the prompt's image tokens go through the
        experts, every generated token is text."""
        sequence = self.interleave(pixel_values, prompt_ids, prompt_mask, image_index)
        embeds, mask, image = move_padding_left(sequence.embeds, sequence.mask, sequence.image_slot >= 0)
        with self.visual_experts.routing(image):
            return self.language_model.generate(embeds, mask, **generation)


class Route:
    """Which tokens are image tokens: ``image`` (B, L) over the sequence being decoded, and ``current`` (B', T) over
    the decoder's present input (the whole sequence, or the tokens after a KV cache's; B' = B x beams)."""

    image: Tensor | None = None
    current: Tensor | None = None


class VisualExperts(nn.Module):
    """The visual expert of every decoder layer of `language_model`: per layer, a trainable copy (`Expert`) of each
    linear layer named in `targets`, which takes over that layer's output on image tokens inside `routing`.

    The LM's own weights and their names are untouched (an LM checkpoint loads into it as into LLaVA's); loading
    weights into the LM copies them into the experts again, unless the state dict holds the experts' own, which
    load after the LM's."""

    def __init__(self, language_model: LanguageModel, targets: Sequence[str] = EXPERT_TARGETS) -> None:
        super().__init__()
        if any(getattr(module, "gradient_checkpointing", False) for module in language_model.model.modules()):
            raise ValueError("visual experts route by a mask set during the forward; the LM's activation "
                             "checkpointing recomputes layers outside it: build the LM without grad_checkpointing")
        self.targets = tuple(targets)
        self.route = Route()
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: Expert(original, self.route) for name, original in linears.items()})
            for linears in decoder_linears(language_model, self.targets))
        language_model.model.get_decoder().register_forward_pre_hook(self._locate, with_kwargs=True)
        language_model.register_load_state_dict_post_hook(self._copy_language_model)

    @contextmanager
    def routing(self, image: Tensor) -> Iterator[None]:
        """Within the block, the positions where ``image`` (B, L) is True go through the experts."""
        self.route.image = image
        try:
            yield
        finally:
            self.route.image = self.route.current = None

    def _locate(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before each decoder call: its input continues the sequence after the tokens its cache holds; positions past
        the routed sequence (generated tokens) are text."""
        image = self.route.image
        if image is None:
            self.route.current = None
            return
        inputs = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        cache = kwargs.get("cache")
        start, length = (cache.get_seq_length() if cache is not None else 0), inputs.shape[1]
        image = image.repeat_interleave(len(inputs) // len(image), dim=0)  # beams follow their prompt
        generated = image.new_zeros(len(image), max(0, start + length - image.shape[1]))
        self.route.current = torch.cat([image, generated], dim=1)[:, start:start + length]

    def _copy_language_model(self, language_model: LanguageModel, incompatible_keys: Any) -> None:
        """The LM's weights were loaded: the experts start from them again."""
        with torch.no_grad():
            for experts, linears in zip(self.layers, decoder_linears(language_model, self.targets), strict=True):
                for name, original in linears.items():
                    experts[name].linear.load_state_dict(original.state_dict())


class Expert(nn.Module):
    """A trainable float32 copy of one of the LM's linear layers, whose output replaces that layer's on the image
    tokens (a forward hook on the original, which still computes them all): text tokens never reach the copy, and the
    original's outputs on image tokens are dropped, so neither receives gradient from the other's tokens."""

    def __init__(self, original: nn.Linear, route: Route) -> None:
        super().__init__()
        self.linear = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None,
                                device=original.weight.device)
        self.linear.load_state_dict(original.state_dict())
        self.route = route
        original.register_forward_hook(self._replace_on_images)

    def _replace_on_images(self, original: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        image = self.route.current
        if image is None or not image.any():
            return output
        if image.shape != output.shape[:-1]:
            raise RuntimeError(f"visual expert: image mask {tuple(image.shape)} for an input of "
                               f"{tuple(output.shape[:-1])} tokens")
        on_images = self.linear(args[0][image].to(self.linear.weight.dtype)).to(output.dtype)
        return output.index_put((image,), on_images)


def decoder_linears(language_model: LanguageModel, targets: Sequence[str]) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its linear layers named in `targets` (the base layer where peft's LoRA wraps one)."""
    found = []
    for layer in language_model.model.get_decoder().layers:
        linears = {}
        for path, module in layer.named_modules():
            name = path.rsplit(".", 1)[-1]
            module = getattr(module, "base_layer", module)
            if name in targets and isinstance(module, nn.Linear):
                linears[name] = module
        if sorted(linears) != sorted(targets):
            raise ValueError(f"visual experts: a decoder layer has linear layers {sorted(linears)} of the targets "
                             f"{sorted(targets)}")
        found.append(linears)
    return found

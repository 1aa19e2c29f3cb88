"""Cross-attention from a transformers language model's text to image tokens, inserted before chosen decoder layers.

The blocks run as forward pre-hooks of the LM's decoder layers rather than wrappers around them: the LM keeps its
module tree (checkpoint keys, LoRA targets), and the blocks stay outside it, so freezing the LM leaves them free.
Flamingo gates them (tanh gates at 0: the LM starts exactly as it was); CoCa's multimodal layers do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.models.visual_prompt import VisualPromptLM, image_numbers, images_per_row


def media_attention_mask(text_image_index: Tensor, media_image_index: Tensor) -> Tensor:
    """(B, T, M) bool, True where text token t may attend visual token m: m belongs to the most recent image before
    t. ``text_image_index`` (B, T): that image's index for each text token (-1 before any image);
    ``media_image_index`` (B, M): the image each visual token comes from."""
    return text_image_index[:, :, None] == media_image_index[:, None, :]


class CrossAttentionBlock(nn.Module):
    """Text attends to the visual tokens, then a feed-forward; with `gated`, each is added through tanh(gate), the
    gates starting at 0 (Flamingo's GATED XATTN-DENSE)."""

    def __init__(self, width: int, num_heads: int, gated: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                          nn.Linear(4 * width, width))
        self.attention_gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.feed_forward_gate = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, text: Tensor, media: Tensor, mask: Tensor) -> Tensor:
        """text (B, T, D), media (B, M, D), mask (B, T, M) True = may attend; a token with no image before it
        takes nothing from the attention."""
        blocked = (~mask).repeat_interleave(self.attention.num_heads, dim=0)
        attended = self.attention(self.norm(text), media, media, attn_mask=blocked, need_weights=False)[0]
        attended = attended.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        text = text + self._gate(self.attention_gate) * attended
        return text + self._gate(self.feed_forward_gate) * self.feed_forward(text)

    @staticmethod
    def _gate(gate: nn.Parameter | None) -> Tensor | float:
        return 1.0 if gate is None else gate.tanh()


class MediaCrossAttention(nn.Module):
    """`CrossAttentionBlock`s before the LM's decoder layers `layer_indices`; every LM forward inside
    `conditioned_on(media, ...)` reads the (B, M, D_lm) media through them, and outside it the LM runs as it is."""

    def __init__(self, language_model: LanguageModel, layer_indices: list[int], num_heads: int,
                 gated: bool = True) -> None:
        super().__init__()
        layers = language_model.model.get_decoder().layers
        self.layer_indices = list(layer_indices)
        self.blocks = nn.ModuleList(CrossAttentionBlock(language_model.width, num_heads, gated)
                                    for _ in self.layer_indices)
        self._condition: tuple[Tensor, Tensor, Tensor] | None = None
        for index, block in zip(self.layer_indices, self.blocks):
            layers[index].register_forward_pre_hook(self._hook(block), with_kwargs=True)

    @contextmanager
    def conditioned_on(self, media: Tensor, text_image: Tensor, media_image: Tensor) -> Iterator[None]:
        """The LM's forwards inside read `media` (B, M, D) through the blocks, each text token only the media of
        its most recent image (`media_attention_mask` of ``text_image`` (B, T) and ``media_image`` (B, M)).
        Tokens decoded past the given text read the last one's image."""
        self._condition = (media, text_image, media_image)
        try:
            yield
        finally:
            self._condition = None

    def _hook(self, block: CrossAttentionBlock):
        def before_layer(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._condition is None:
                return args, kwargs
            hidden = args[0] if args else kwargs["hidden_states"]
            media, text_image, media_image = self._condition
            if text_image.shape[1] != hidden.shape[1]:  # a decoding step (KV cache): the prompt's last image
                text_image = text_image[:, -1:].expand(-1, hidden.shape[1])
            if hidden.shape[0] != media.shape[0]:  # beam search repeats each sample num_beams times
                beams = hidden.shape[0] // media.shape[0]
                media, text_image, media_image = (t.repeat_interleave(beams, dim=0)
                                                  for t in (media, text_image, media_image))
            # the block computes in the media's dtype (float32, or autocast's), the LM goes on in its own (a frozen
            # LM may be bfloat16)
            mask = media_attention_mask(text_image, media_image)
            hidden = block(hidden.to(media.dtype), media, mask).to(hidden.dtype)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return before_layer


class CrossAttentionLM(VisualPromptLM):
    """A language model that reads the visual prompt through `cross_attention` (a `MediaCrossAttention`) rather
    than as input tokens: the text alone is its input, a placeholder token marking where each image appears, and
    each text token reads the most recent image before it (Flamingo; CoCa's multimodal layers, whose text has no
    placeholder, read their one image from every token)."""

    cross_attention: MediaCrossAttention

    def predict_text(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     image_index: Tensor | None = None) -> NextTokenOutput:
        """The LM's predictions of the text, which reads its images by cross-attention."""
        return self.read_text(self.visual_prompt(pixel_values), input_ids, attention_mask, labels, image_index)

    def read_text(self, visual: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                  image_index: Tensor | None = None) -> NextTokenOutput:
        """`predict_text` from the batch's visual tokens already made (N, M, D_lm)."""
        with self.cross_attention.conditioned_on(*self.media(visual, input_ids, image_index)):
            return self.language_model(self.language_model.embed(input_ids), attention_mask, labels)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                 image_index: Tensor | None = None, **generation) -> Tensor:
        """New token ids continuing the left-padded prompts, every decoding step reading the last image."""
        with self.cross_attention.conditioned_on(*self.media(self.visual_prompt(pixel_values), prompt_ids,
                                                             image_index)):
            return self.language_model.generate(self.language_model.embed(prompt_ids), prompt_mask, **generation)

    def media(self, visual: Tensor, input_ids: Tensor, image_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """What each row's text reads: its images' visual tokens (B, K * M, D), the image number of each text token
        (B, T; -1 before the first placeholder, 0 everywhere when the batch has none) and of each visual token."""
        per_row = images_per_row(visual, image_index)
        batch, images, tokens = per_row.shape[:3]
        media_image = torch.arange(images, device=visual.device).repeat_interleave(tokens).expand(batch, -1)
        if image_index is not None:
            media_image = media_image.masked_fill((image_index < 0).repeat_interleave(tokens, dim=1), -2)
        text_image = image_numbers(input_ids, self.language_model.image_token_id)
        if (text_image < 0).all():
            text_image = torch.zeros_like(text_image)
        return per_row.flatten(1, 2), text_image, media_image

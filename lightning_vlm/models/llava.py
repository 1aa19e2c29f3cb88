"""LLaVA (Liu et al., 2023): the image encoder's patch tokens, projected, are the LM's visual prompt.

By default no resampler: every patch token of the vision encoder becomes one LM token through a two-layer GELU
MLP (LLaVA-1.5; `Linear` for LLaVA-1); any `Adapter` (Perceiver resampler, pixel shuffle, pooling) takes its
place from the recipe. Training runs in two stages: the projector alone aligns the image tokens
with the frozen LM's embeddings, then the LM (fully or through LoRA) learns to follow image prompts; the
staged-freezing plan sets both in one fit.

Images at their own size (the DataModule's ``keep_aspect``): raw patches read them as they are (Fuyu), AnyRes reads
any encoder's tiles (LLaVA-NeXT); ``image_newline`` ends each row of an image's tokens with a learned embedding,
so the LM sees the 2-D layout. Each image then gives its own number of tokens, and batch padding gives none.
An adapter that ``reads_instruction`` (InstructBLIP's Q-Former) also reads each image's prompt, never its answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.adapters import MLP, Adapter
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.anyres import AnyRes
from lightning_vlm.models.visual_prompt import Interleaved, VisualPromptLM, grid_layout, place_images
from lightning_vlm.tokens import IGNORE_INDEX


class LLaVA(VisualPromptLM):
    """Image encoder -> adapter ("projector", built here for the two widths) -> language model, the adapted
    tokens placed where the text's image placeholder stands. ``image_newline``: a learned LM embedding after each row
    of an image's tokens (Fuyu, LLaVA-NeXT); ``anyres``: the image read as tiles and an overview (LLaVA-NeXT)."""

    def __init__(self, vision: VisionEncoder | RawPatches, language_model: LanguageModel,
                 adapter: Adapter | None = None, image_newline: bool = False, anyres: AnyRes | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        adapter = adapter or MLP()
        self.reads_instruction: bool = getattr(adapter, "reads_instruction", False)
        if self.reads_instruction:
            if anyres is not None:
                raise ValueError("AnyRes reads tiles, which have no instruction of their own: choose an adapter that "
                                 "does not read the instruction")
            adapter.for_vocabulary(language_model.model.get_input_embeddings().num_embeddings)
            # kept out of an instruction: BOS, EOS, padding, the image placeholder, and a chat template's markers
            # where the tokenizer declares them special
            special = {*language_model.tokenizer.all_special_ids, language_model.image_token_id}
            self.register_buffer("special_ids", torch.tensor(sorted(special)), persistent=False)
        self.projector = adapter.build(vision.width, language_model.width)
        self.image_newline = nn.Parameter(torch.randn(language_model.width) * 0.02) if image_newline else None
        self.anyres = anyres

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the adapter's tokens from the image encoder's patch tokens (each image's own
        first, zeros after them, where images give different numbers: `image_tokens`)."""
        return self.image_tokens(pixel_values)[0]

    def image_tokens(self, pixel_values: Tensor, instruction: tuple[Tensor, Tensor] | None = None
                     ) -> tuple[Tensor, Tensor | None]:
        """The visual prompts and how many tokens of each are the image's own (None: all); ``instruction``: each
        image's instruction ids and mask, for an adapter that reads it."""
        if self.anyres is not None:
            return self.anyres(pixel_values, self.projected, self.image_newline)
        features = self.vision(pixel_values)
        tokens = self.projector(features.patch_tokens, *(instruction or ()))
        if self.image_newline is None and features.valid is None:
            return tokens, None
        return grid_layout(tokens, features.grid, features.valid, self.image_newline)

    def projected(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm) the adapter's tokens of every patch token (what AnyRes makes of each tile)."""
        return self.projector(self.vision(pixel_values).patch_tokens)

    def interleave(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                   image_index: Tensor | None = None, labels: Tensor | None = None) -> Interleaved:
        """The LM's input (`VisualPromptLM.interleave`); an adapter that reads the instruction gets each image's."""
        if not self.reads_instruction:
            return super().interleave(pixel_values, input_ids, attention_mask, image_index, labels)
        lm = self.language_model
        keep = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        if labels is not None:
            keep &= labels == IGNORE_INDEX  # the answers are never read
        visual, lengths = self.image_tokens(pixel_values, instruction_tokens(input_ids, keep, len(pixel_values)))
        return place_images(visual, lm.embed(input_ids), input_ids, attention_mask, lm.image_token_id, image_index,
                            labels, lengths)


def instruction_tokens(input_ids: Tensor, keep: Tensor, num_images: int) -> tuple[Tensor, Tensor]:
    """Each image's instruction: the ``keep`` tokens of its row of (B, L) ``input_ids``, in order -> (N, T) ids and
    their mask. Image n reads row n (the collator puts each example's own image there); images past the rows read
    none (a few-shot demonstration's image that `first_rows` appends)."""
    order = torch.argsort((~keep).long(), dim=1, stable=True)[:, : max(int(keep.sum(1).max()), 1)]
    mask = F.pad(keep.gather(1, order).long(), (0, 0, 0, max(num_images - len(keep), 0)))[:num_images]
    ids = F.pad(input_ids.gather(1, order), (0, 0, 0, max(num_images - len(keep), 0)))[:num_images]
    return ids * mask, mask

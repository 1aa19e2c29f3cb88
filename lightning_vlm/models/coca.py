"""CoCa (Yu et al., 2022): contrastive captioners. One text decoder is split in two: its first layers are a
unimodal text model whose output at an appended [CLS] token is the caption's embedding; its last layers also
cross-attend to the image (multimodal layers) and caption it. Two adapters read the image encoder's tokens, by
default attentional poolers: one query for the contrastive image embedding, 256 in the paper (16 here) for the
multimodal layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.adapters import Adapter, AttentionPooler
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.models.contrastive import ContrastiveHeads, ContrastiveOutput
from lightning_vlm.models.cross_attention import CrossAttentionLM, MediaCrossAttention
from lightning_vlm.models.similarity import caption_keys, scale_logits


@dataclass
class CoCaOutput:
    """contrastive: image and caption embeddings for the contrastive loss; caption: the multimodal layers'
    predictions of the batch's labelled text, for the captioning loss."""

    contrastive: ContrastiveOutput
    caption: NextTokenOutput


class CoCa(CrossAttentionLM):
    """Image encoder + a language model whose first `unimodal_layers` layers (default: half) encode text alone and
    whose remaining layers cross-attend to the pooled image. The language model may be pretrained (by name) or
    built from a config; the dual-encoder API (`encode_images`, `encode_texts`, `similarity`) serves retrieval.
    Its text carries no image placeholder: every token of the multimodal layers reads the one image."""

    places_images = False

    def __init__(self, vision: VisionEncoder, language_model: LanguageModel, unimodal_layers: int | None = None,
                 embed_dim: int = 128, contrastive_pooler: Adapter | None = None,
                 caption_pooler: Adapter | None = None, num_heads: int = 4,
                 logit_scale_init: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.vision, self.language_model = vision, language_model
        num_layers = len(language_model.model.get_decoder().layers)
        self.unimodal_layers = num_layers // 2 if unimodal_layers is None else unimodal_layers
        if not 0 < self.unimodal_layers < num_layers:
            raise ValueError(f"unimodal_layers must leave both parts a layer: 0 < {unimodal_layers} < {num_layers}")
        width = language_model.width
        self.contrastive_pooler = (contrastive_pooler or AttentionPooler(1, num_heads)).build(vision.width, width)
        self.caption_pooler = (caption_pooler or AttentionPooler(16, num_heads)).build(vision.width, width)
        self.cross_attention = MediaCrossAttention(language_model, range(self.unimodal_layers, num_layers),
                                                   num_heads, gated=False)
        self.cls_token = nn.Parameter(torch.randn(width) * 0.02)
        self.heads = ContrastiveHeads(width, width, embed_dim, logit_scale_init)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                caption_ids: Tensor, caption_mask: Tensor) -> CoCaOutput:
        """Both objectives from one pass of the image encoder: the captions (``caption_ids``) for the contrastive
        pair, the labelled text (captions and answers) for the captioning loss."""
        image = self.vision(pixel_values).patch_tokens
        contrastive = ContrastiveOutput(self._image_embedding(image), self.encode_texts(caption_ids, caption_mask),
                                        self.heads.logit_scale, None, text_keys=caption_keys(caption_ids, caption_mask))
        return CoCaOutput(contrastive, self.read_text(self.caption_pooler(image), input_ids, attention_mask, labels))

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the caption pooler's tokens, which the multimodal layers attend to."""
        return self.caption_pooler(self.vision(pixel_values).patch_tokens)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, E) normalised, from the one-query pooler."""
        return self._image_embedding(self.vision(pixel_values).patch_tokens)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) -> (N, E) normalised: the unimodal layers' output at a [CLS] appended after the text (it sees
        every real token under the causal mask); the multimodal layers run without image and are not read."""
        embeds = torch.cat([self.language_model.embed(input_ids),
                            self.cls_token.to(input_ids.device).expand(len(input_ids), 1, -1)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(len(attention_mask), 1)], dim=1)
        hidden = self.language_model.model.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                                         output_hidden_states=True).hidden_states
        return self.heads.embed_text(hidden[self.unimodal_layers][:, -1])

    def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
        """(N_img, N_txt) logits as the contrastive loss sees them."""
        return scale_logits(image_repr @ text_repr.T, self.heads.logit_scale)

    def _image_embedding(self, image_tokens: Tensor) -> Tensor:
        return F.normalize(self.heads.image_proj(self.contrastive_pooler(image_tokens)[:, 0]), dim=-1)

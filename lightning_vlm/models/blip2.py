"""BLIP-2 (Li et al., 2023): a Q-Former bridges a frozen image encoder and a frozen (or LoRA-tuned) LM.

Stage 1 (representation learning) trains the Q-Former on the image encoder's features with three objectives
sharing one model and differing by attention mask: image-text contrastive (ITC), image-text matching (ITM)
and image-grounded text generation (ITG). Stage 2 (generative learning) projects the query outputs into the
LM's embedding space as a soft visual prompt and trains on the LM's next-token loss over the target text.
With ``instruction_aware`` (InstructBLIP, Dai et al., 2023) the queries also read the prompt (the question) in the
Q-Former's shared self-attention, so they extract what the instruction asks about.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.adapters.projection import make_projection
from lightning_vlm.adapters.qformer import QFormer
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.losses.contrastive import scale_logits
from lightning_vlm.distributed import rank_offset
from lightning_vlm.losses.qformer import (
    itc_loss,
    itg_loss,
    itm_loss,
    mine_pair_negatives,
    query_text_similarity,
)
from lightning_vlm.models.visual_prompt import VisualPromptLM


@dataclass
class TextBatch:
    """Q-Former text: (B, T) ids starting with the tokenizer's CLS/BOS, and their padding mask."""

    input_ids: Tensor
    attention_mask: Tensor


class ITGHead(nn.Module):
    """BERT's masked-LM head shape (dense, GELU, LayerNorm, then a decoder tied to the word embeddings)."""

    def __init__(self, word_embeddings: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        width = word_embeddings.embedding_dim
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=eps))
        self.word_embeddings = word_embeddings  # shared, not copied: the decoder is tied
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.transform(hidden) @ self.word_embeddings.weight.T + self.bias


class BLIP2(VisualPromptLM):
    """Image encoder -> Q-Former (stage 1 heads) -> projection -> language model (stage 2).

    ``qformer`` is called with the image encoder's width (so YAML never repeats it); ``language_model`` is
    optional: without it the model is stage 1 only. ``instruction_aware``: the paradigm gives the visual prompt
    each image's instruction (`instructed`), which the queries read (InstructBLIP). ``vision_norm``: a trainable
    LayerNorm over the frozen encoder's tokens before the queries read them (the paper's ``ln_vision``), so the
    Q-Former starts from unit-scale features whatever encoder it is given: its cross-attention turns their scale
    into attention sharpness and into how much each read outweighs the queries in the post-norm residual.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        qformer: Callable[[int], QFormer],
        language_model: LanguageModel | None = None,
        embed_dim: int = 256,
        projection: Literal["linear", "mlp"] = "linear",
        logit_scale_init: float = math.log(1 / 0.07),
        itg_label_smoothing: float = 0.1,
        instruction_aware: bool = False,
        vision_norm: bool = True,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.vision_norm = nn.LayerNorm(vision.width) if vision_norm else nn.Identity()
        self.qformer = qformer(vision.width)
        width = self.qformer.width
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.itg_head = ITGHead(self.qformer.word_embeddings)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.itg_label_smoothing = itg_label_smoothing
        self.language_model = language_model
        self.lm_projection = make_projection(projection, width, language_model.width) if language_model else None
        self.instruction_aware = instruction_aware
        self._instruction: TextBatch | None = None

    # ---- shared pieces --------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, D_v) every token of the image encoder, normalised: what the queries cross-attend
        to."""
        return self.vision_norm(self.vision(pixel_values).tokens)

    def queries(self, image: Tensor, instruction: TextBatch | None = None) -> Tensor:
        """(B, N, D_v) image features -> (B, Q, D) query outputs: alone (what BLIP-2's stage 2 and ITC's image side
        see), or reading each image's ``instruction`` too, every token seeing every other (InstructBLIP)."""
        if instruction is None:
            return self.qformer(image=image).queries
        return self.qformer(image, instruction.input_ids, instruction.attention_mask, mask="bidirectional").queries

    # ---- stage 1 ----------------------------------------------------------------------------------------------
    def itc(self, image: Tensor, text: TextBatch) -> tuple[Tensor, Tensor]:
        """ITC loss and the local image->text similarities. One joint pass under the unimodal mask: queries
        and text share the layers but never see each other."""
        out = self.qformer(image, text.input_ids, text.attention_mask, mask="unimodal")
        query_emb = F.normalize(self.vision_proj(out.queries), dim=-1)
        text_emb = F.normalize(self.text_proj(out.text[:, 0]), dim=-1)
        return itc_loss(query_emb, text_emb, self.logit_scale)

    def itm(self, image: Tensor, text: TextBatch, similarity: Tensor) -> Tensor:
        """ITM loss over B positives, B images with a mined hard-negative text and B texts with a mined image.

        Negatives are mined within the local batch (columns of `similarity` for this rank's texts); a text
        identical to the positive never serves as its negative.
        """
        n, ids = image.shape[0], text.input_ids
        local = similarity[:, rank_offset(n):rank_offset(n) + n]
        negative_text, negative_image = mine_pair_negatives(local, ids)
        images = torch.cat([image, image, image[negative_image]])
        texts = torch.cat([ids, ids[negative_text], ids])
        masks = torch.cat([text.attention_mask, text.attention_mask[negative_text], text.attention_mask])
        return itm_loss(self.match_logits(images, texts, masks), n)

    def match_logits(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 2) not-match / match logits: bidirectional mask, head over the mean of the query outputs."""
        out = self.qformer(image, input_ids, attention_mask, mask="bidirectional")
        return self.itm_head(out.queries.mean(dim=1))

    def itg(self, image: Tensor, text: TextBatch) -> Tensor:
        """ITG loss: the caption generated from the queries under the multimodal causal mask, the decoding
        token in place of the first token."""
        out = self.qformer(image, text.input_ids, text.attention_mask, mask="multimodal_causal", decoder=True)
        return itg_loss(self.itg_head(out.text), text.input_ids, text.attention_mask, self.itg_label_smoothing)

    # ---- stage 2 ----------------------------------------------------------------------------------------------
    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, Q, D_lm) soft visual prompt for the language model (its queries reading the
        instruction given by `instructed`, if any)."""
        if self.language_model is None:
            raise ValueError("this BLIP2 has no language_model: stage 2 and generation need one")
        instruction = self._instruction
        if instruction is not None and len(instruction.input_ids) != len(pixel_values):
            raise ValueError(f"{len(instruction.input_ids)} instructions for {len(pixel_values)} images")
        return self.lm_projection(self.queries(self.image_features(pixel_values), instruction))

    @contextmanager
    def instructed(self, instruction: TextBatch) -> Iterator[None]:
        """Inside, the visual prompt of image i reads row i of ``instruction`` (Q-Former tokens of its prompt);
        a context rather than an argument because the LM-side code (`VisualPromptLM`) calls `visual_prompt`."""
        self._instruction = instruction
        try:
            yield
        finally:
            self._instruction = None

    # ---- contrastive-style eval API (CONTRACTS.md) -------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, Q, E) normalised query embeddings."""
        return F.normalize(self.vision_proj(self.queries(self.image_features(pixel_values))), dim=-1)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, T) -> (N, E) normalised embeddings of the text's first (CLS) token."""
        out = self.qformer(input_ids=input_ids, text_mask=attention_mask)
        return F.normalize(self.text_proj(out.text[:, 0]), dim=-1)

    def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
        """(N_img, N_txt) ITC logits: each text against its best-matching query."""
        return scale_logits(query_text_similarity(image_repr, text_repr), self.logit_scale)

    def layer_groups(self) -> dict[str, nn.Module]:
        """Named parts for staged freezing."""
        heads = nn.ModuleList([self.vision_proj, self.text_proj, self.itm_head, self.itg_head.transform])
        groups = {"vision": self.vision, "vision_norm": self.vision_norm, "qformer": self.qformer, "heads": heads}
        if self.language_model is not None:
            groups.update(language_model=self.language_model, lm_projection=self.lm_projection)
        return groups


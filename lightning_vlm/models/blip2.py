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
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.adapters import Adapter, Linear, QFormer
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.models.similarity import mine_pair_negatives, query_text_similarity, scale_logits
from lightning_vlm.models.visual_prompt import VisualPromptLM
from lightning_vlm.tokens import IGNORE_INDEX

OBJECTIVES = ("itc", "itm", "itg", "lm")


@dataclass
class TextBatch:
    """Q-Former text: (B, T) ids starting with the tokenizer's CLS/BOS, and their padding mask."""

    input_ids: Tensor
    attention_mask: Tensor


@dataclass
class BLIP2Output:
    """What BLIP-2 computed for the objectives it was asked for (None for the others). ITC: the queries' and the
    captions' normalised embeddings (B, Q, E), (B, E) and ``logit_scale``; ITM: (3B, 2) not-match / match logits of
    B pairs, B images with a mined negative caption and B captions with a mined negative image, and their 0/1
    labels; ITG: the Q-Former's predictions of the captions; LM: the language model's of the target text."""

    logit_scale: Tensor
    query_emb: Tensor | None = None
    text_emb: Tensor | None = None
    itm_logits: Tensor | None = None
    itm_labels: Tensor | None = None
    itg: NextTokenOutput | None = None
    lm: NextTokenOutput | None = None


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
    optional: without it the model is stage 1 only. ``projection``: the adapter from the queries to the LM's width
    (default `Linear`, the paper's). ``instruction_aware``: the paradigm gives the visual prompt
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
        projection: Adapter | None = None,
        logit_scale_init: float = math.log(1 / 0.07),
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
        self.language_model = language_model
        self.lm_projection = (projection or Linear()).build(width, language_model.width) if language_model else None
        self.instruction_aware = instruction_aware
        self._instruction: TextBatch | None = None

    def forward(self, pixel_values: Tensor, captions: TextBatch | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None,
                image_index: Tensor | None = None, instruction: TextBatch | None = None,
                objectives: Collection[str] = OBJECTIVES) -> BLIP2Output:
        """The `objectives` asked for (the loss's active terms; stage 1 skips the LM, stage 2 the Q-Former's own):
        the stage-1 ones on the ``captions``, ``lm`` on the target text (``input_ids``, ``labels``: the LM's tokens)
        with each image's queries reading its ``instruction`` when the model is instruction-aware."""
        out = BLIP2Output(self.logit_scale)
        if {"itc", "itm", "itg"} & set(objectives):
            image = self.image_features(pixel_values)
            if {"itc", "itm"} & set(objectives):
                out.query_emb, out.text_emb = self.contrastive_embeddings(image, captions)
                if "itm" in objectives:
                    similarity = query_text_similarity(out.query_emb, out.text_emb).detach()
                    out.itm_logits, out.itm_labels = self.matching(image, captions, similarity)
            if "itg" in objectives:
                out.itg = self.caption_predictions(image, captions)
        if "lm" in objectives:
            with self.instructed(instruction) if instruction is not None else nullcontext():
                out.lm = self.predict_text(pixel_values, input_ids, attention_mask, labels, image_index)
        return out

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
    def contrastive_embeddings(self, image: Tensor, text: TextBatch) -> tuple[Tensor, Tensor]:
        """ITC's normalised query (B, Q, E) and caption (B, E) embeddings. One joint pass under the unimodal mask:
        queries and text share the layers but never see each other."""
        out = self.qformer(image, text.input_ids, text.attention_mask, mask="unimodal")
        return F.normalize(self.vision_proj(out.queries), dim=-1), F.normalize(self.text_proj(out.text[:, 0]), dim=-1)

    def matching(self, image: Tensor, text: TextBatch, similarity: Tensor) -> tuple[Tensor, Tensor]:
        """ITM logits and labels over B positives, B images with a mined hard-negative text and B texts with a
        mined image, mined from the local (B, B) image->text ``similarity``; a text identical to the positive never
        serves as its negative."""
        n, ids = image.shape[0], text.input_ids
        negative_text, negative_image = mine_pair_negatives(similarity, ids)
        images = torch.cat([image, image, image[negative_image]])
        texts = torch.cat([ids, ids[negative_text], ids])
        masks = torch.cat([text.attention_mask, text.attention_mask[negative_text], text.attention_mask])
        labels = torch.zeros(3 * n, dtype=torch.long, device=image.device)
        labels[:n] = 1
        return self.match_logits(images, texts, masks), labels

    def match_logits(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 2) not-match / match logits: bidirectional mask, head over the mean of the query outputs."""
        out = self.qformer(image, input_ids, attention_mask, mask="bidirectional")
        return self.itm_head(out.queries.mean(dim=1))

    def caption_predictions(self, image: Tensor, text: TextBatch) -> NextTokenOutput:
        """ITG: the caption read from the queries under the multimodal causal mask, the decoding token in place of
        the first token, scored at every position; padding carries no label."""
        out = self.qformer(image, text.input_ids, text.attention_mask, mask="multimodal_causal", decoder=True)
        return NextTokenOutput(self.itg_head(out.text),
                               text.input_ids.masked_fill(text.attention_mask == 0, IGNORE_INDEX))

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

    # ---- a Retriever for the eval suite (eval/suite.py) -------------------------------------------------------------
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

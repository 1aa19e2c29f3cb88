"""Q-Former (Li et al., 2023, BLIP-2): learned queries and text tokens share BERT layers.

Queries and text go through one self-attention whose mask decides who sees whom (`attention_mask`); every
``cross_attention_freq`` layers the queries, and only they, cross-attend to the frozen image features; queries
and text then take separate feed-forward networks, both initialised from the BERT one. Initialisable from any
transformers BERT checkpoint (cross-attention newly initialised), or built from a config for tiny models.

Written by hand: transformers' Blip2QFormerModel takes queries only (no text, so no stage-1 masks), and its
BERT layers have no separate query feed-forward. `QFormerAdapter` is the Q-Former as an `Adapter`: queries only
(BLIP-2), or with the instruction's tokens beside them (InstructBLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_vlm.adapters.base import Adapter
from lightning_vlm.encoders.text import load_text_encoder

MaskKind = Literal["unimodal", "bidirectional", "multimodal_causal"]


def attention_mask(num_queries: int, text_mask: Tensor, kind: MaskKind) -> Tensor:
    """Who may attend to whom over ``[queries; text]``: a bool (B, Q + T, Q + T), True = may attend.

    - unimodal (ITC): queries see queries, text sees text: neither modality sees the other;
    - bidirectional (ITM): everything sees everything;
    - multimodal_causal (ITG): queries see queries only; a text token sees every query and the text up to itself.
    Padded text (``text_mask`` 0) is never attended to.
    """
    batch, text_len = text_mask.shape
    size = num_queries + text_len
    is_query = torch.arange(size, device=text_mask.device) < num_queries
    if kind == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    elif kind == "bidirectional":
        allowed = torch.ones(size, size, dtype=torch.bool, device=text_mask.device)
    elif kind == "multimodal_causal":
        causal = torch.ones(size, size, dtype=torch.bool, device=text_mask.device).tril()
        allowed = torch.where(is_query[:, None], is_query[None, :], is_query[None, :] | causal)
    else:
        raise ValueError(f"unknown Q-Former mask {kind!r}; choose unimodal, bidirectional or multimodal_causal")
    keys = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
    return allowed[None] & keys[:, None, :]


class Attention(nn.Module):
    """BERT's post-norm attention block, LayerNorm(x + out(attend(x, context))); `context` may be another width."""

    def __init__(self, width: int, num_heads: int, context_width: int, dropout: float, eps: float) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"hidden size {width} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), context (B, S, D_ctx), mask (B, L, S) bool or None -> (B, L, D)."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731  (B, h, len, d)
        attended = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(context)), heads(self.value(context)),
            attn_mask=None if mask is None else mask[:, None], dropout_p=self.dropout if self.training else 0.0,
        )
        out = F.dropout(self.out(attended.transpose(1, 2).flatten(2)), self.dropout, self.training)
        return self.norm(x + out)


class FeedForward(nn.Module):
    """BERT's post-norm feed-forward block, LayerNorm(x + output(gelu(intermediate(x))))."""

    def __init__(self, width: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.intermediate = nn.Linear(width, hidden)
        self.output = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        out = F.dropout(self.output(F.gelu(self.intermediate(x))), self.dropout, self.training)
        return self.norm(x + out)


class QFormerLayer(nn.Module):
    """Shared self-attention, optional cross-attention for the queries, then per-modality feed-forward."""

    def __init__(self, width: int, heads: int, hidden: int, vision_width: int, cross_attention: bool,
                 dropout: float, eps: float) -> None:
        super().__init__()
        self.attention = Attention(width, heads, width, dropout, eps)
        self.crossattention = Attention(width, heads, vision_width, dropout, eps) if cross_attention else None
        self.text_ffn = FeedForward(width, hidden, dropout, eps)
        self.query_ffn = FeedForward(width, hidden, dropout, eps)

    def forward(self, hidden: Tensor, mask: Tensor | None, num_queries: int, image: Tensor | None) -> Tensor:
        hidden = self.attention(hidden, hidden, mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if num_queries:
            if self.crossattention is not None:
                queries = self.crossattention(queries, image)
            queries = self.query_ffn(queries)
        return torch.cat([queries, self.text_ffn(text)], dim=1)


@dataclass
class QFormerOutput:
    """queries: (B, Q, D) query outputs, or None in a text-only pass; text: (B, T, D), or None without text."""

    queries: Tensor | None
    text: Tensor | None


class QFormer(nn.Module):
    """BLIP-2's Q-Former over image features of width ``vision_width`` (given by the model that owns it).

    ``name_or_path``: a BERT checkpoint whose embeddings, self-attention and feed-forward initialise the text
    and the query paths alike (cross-attention, queries and the decoding token are new); else ``config``
    (keys of a transformers BertConfig) builds one from scratch. ``tokenizer`` defaults to the checkpoint's;
    ``vocab_size`` sizes the word table of one built from ``config`` without a tokenizer.
    ``grad_checkpointing``: each layer recomputes its activations in backward (less memory, one more forward).
    """

    def __init__(
        self,
        vision_width: int,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        num_queries: int = 32,
        cross_attention_freq: int = 2,
        grad_checkpointing: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        bert, self.tokenizer = load_text_encoder(name_or_path, config, vocab_size, tokenizer)
        c = bert.config
        self.width, self.num_queries = c.hidden_size, num_queries
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.embed_dropout = c.hidden_dropout_prob
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, c.hidden_size) * c.initializer_range)
        self.decoder_token = nn.Parameter(torch.randn(c.hidden_size) * c.initializer_range)  # ITG's [DEC]
        self.layers = nn.ModuleList(
            QFormerLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, vision_width,
                         i % cross_attention_freq == 0, c.attention_probs_dropout_prob, c.layer_norm_eps)
            for i in range(c.num_hidden_layers)
        )
        # from a checkpoint, its weights; from a config, transformers' BERT initialisation of them
        self.load_report = self._load_bert(bert)

    def forward(
        self,
        image: Tensor | None = None,
        input_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        mask: MaskKind = "unimodal",
        decoder: bool = False,
    ) -> QFormerOutput:
        """Queries reading ``image`` (B, N, D_v), text ``input_ids`` (B, T), or both under the ``mask`` kind.

        ``decoder``: the first text token is replaced by the decoding token (ITG).
        """
        parts = []
        if image is not None:
            parts.append(self.query_tokens.expand(image.shape[0], -1, -1))
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            if decoder:
                text = torch.cat([(self.decoder_token + self.position_embeddings.weight[0]).expand(len(text), 1, -1),
                                  text[:, 1:]], dim=1)
            parts.append(text)
        if not parts:
            raise ValueError("the Q-Former needs image features, text, or both")
        hidden = F.dropout(self.embed_norm(torch.cat(parts, dim=1)), self.embed_dropout, self.training)
        num_queries = self.num_queries if image is not None else 0
        both = image is not None and input_ids is not None
        if text_mask is None and input_ids is not None:
            text_mask = torch.ones_like(input_ids)
        if both:
            allowed = attention_mask(num_queries, text_mask, mask)
        elif input_ids is not None:
            allowed = attention_mask(0, text_mask, "bidirectional")
        else:
            allowed = None
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # written by hand: the Q-Former's layers are ours; torch's checkpoint replays dropout's RNG
                hidden = checkpoint(layer, hidden, allowed, num_queries, image, use_reentrant=False)
            else:
                hidden = layer(hidden, allowed, num_queries, image)
        return QFormerOutput(hidden[:, :num_queries] if image is not None else None,
                             hidden[:, num_queries:] if input_ids is not None else None)

    def _load_bert(self, bert: nn.Module) -> dict[str, list[str]]:
        """Copy a transformers BertModel's weights; return what stayed newly initialised and what went unused.

        BERT adds token_type_embeddings[0] to every token; it is folded into the position table (exactly equal).
        """
        source = bert.state_dict()
        mapped: dict[str, Tensor] = {
            "word_embeddings.weight": source["embeddings.word_embeddings.weight"],
            "position_embeddings.weight": source["embeddings.position_embeddings.weight"]
            + source["embeddings.token_type_embeddings.weight"][0],
            "embed_norm.weight": source["embeddings.LayerNorm.weight"],
            "embed_norm.bias": source["embeddings.LayerNorm.bias"],
        }
        renames = {"attention.self.query": "attention.query", "attention.self.key": "attention.key",
                   "attention.self.value": "attention.value", "attention.output.dense": "attention.out",
                   "attention.output.LayerNorm": "attention.norm"}
        ffn = {"intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "norm"}
        for i in range(len(self.layers)):
            for theirs, ours in renames.items():
                for p in ("weight", "bias"):
                    mapped[f"layers.{i}.{ours}.{p}"] = source[f"encoder.layer.{i}.{theirs}.{p}"]
            for theirs, ours in ffn.items():
                for path in ("text_ffn", "query_ffn"):
                    for p in ("weight", "bias"):
                        mapped[f"layers.{i}.{path}.{ours}.{p}"] = source[f"encoder.layer.{i}.{theirs}.{p}"]
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        used = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
        used |= {f"encoder.layer.{i}.{t}.{p}" for i in range(len(self.layers))
                 for t in (*renames, *ffn) for p in ("weight", "bias")}
        return {"newly_initialised": sorted(missing), "unused": sorted(set(source) - used) + sorted(unexpected)}


# blip2.yaml's Q-Former at TINY_BERT's two layers; no dropout
ADAPTER_CONFIG: dict[str, Any] = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256,
                                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class QFormerAdapter(Adapter):
    """BLIP-2's Q-Former (Li et al., 2023) as an adapter: `num_queries` learned queries read the image tokens
    (cross-attention every `cross_attention_freq` layers), then a linear map into the LM's width, as BLIP-2 prompts
    its LM. ``instruction_aware`` (InstructBLIP, Dai et al., 2023): the instruction's tokens, in the LM's ids, share
    the queries' self-attention (the queries alone read the image), so the queries extract what it asks about; only
    the queries reach the LM. The model holding it gives the LM's vocabulary (`for_vocabulary`) before `build` and
    each image's instruction to every call. ``config``: keys of a BertConfig over `ADAPTER_CONFIG`.
    """

    def __init__(self, num_queries: int = 4, cross_attention_freq: int = 2,
                 config: dict[str, Any] | None = None, instruction_aware: bool = False) -> None:
        super().__init__()
        self.num_queries, self.cross_attention_freq = num_queries, cross_attention_freq
        self.config = {**ADAPTER_CONFIG, **(config or {})}
        self.instruction_aware = instruction_aware
        self.vocab_size: int | None = None

    @property
    def reads_instruction(self) -> bool:
        """Whether each call needs the instruction's token ids (a model holding the adapter asks this)."""
        return self.instruction_aware

    def for_vocabulary(self, vocab_size: int) -> QFormerAdapter:
        """Size the instruction's word table to the LM's vocabulary; before `build`, which creates it."""
        if self.width_in is not None:
            raise RuntimeError("QFormerAdapter.for_vocabulary comes before build: the word table is built there")
        self.vocab_size = vocab_size
        return self

    def _build(self, width_in: int, width_out: int) -> None:
        if self.instruction_aware and self.vocab_size is None:
            raise ValueError("an instruction-aware QFormerAdapter reads the LM's token ids: call "
                             "for_vocabulary(the LM's vocabulary size) before build (LLaVA does)")
        self.qformer = QFormer(width_in, config=self.config, num_queries=self.num_queries,
                               cross_attention_freq=self.cross_attention_freq, vocab_size=self.vocab_size or 1)
        # the unused text path is dropped, so every parameter left trains and is counted as such
        del self.qformer.decoder_token
        if not self.instruction_aware:
            del self.qformer.word_embeddings, self.qformer.position_embeddings
        for layer in self.qformer.layers if not self.instruction_aware else self.qformer.layers[-1:]:
            layer.text_ffn = nn.Identity()  # applied to an empty text part, or to text no later layer reads
        self.proj = nn.Linear(self.qformer.width, width_out)

    def forward(self, tokens: Tensor, instruction: Tensor | None = None,
                instruction_mask: Tensor | None = None) -> Tensor:
        """(B, N, D_in) image tokens, and with ``instruction_aware`` each image's instruction ids (B, T) with their
        padding mask (B, T) -> (B, num_queries, D_out); the instruction's own outputs are dropped. An instruction
        longer than the Q-Former's position table keeps its start (InstructBLIP truncates it alike)."""
        if self.instruction_aware != (instruction is not None):
            raise ValueError(f"this QFormerAdapter (instruction_aware={self.instruction_aware}) was "
                             f"{'given' if instruction is not None else 'not given'} an instruction")
        if instruction is not None:
            length = self.qformer.position_embeddings.num_embeddings
            instruction_mask = torch.ones_like(instruction) if instruction_mask is None else instruction_mask
            instruction, instruction_mask = instruction[:, :length], instruction_mask[:, :length]
        # InstructBLIP's mask: queries and instruction all see each other, padding none
        return self.proj(self.qformer(tokens, instruction, instruction_mask, mask="bidirectional").queries)

    def num_output_tokens(self, num_tokens: int) -> int:
        return self.num_queries

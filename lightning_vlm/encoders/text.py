"""Text encoder: a BERT-style transformers encoder, pretrained by name/path or built from a small config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_vlm.pretrained import from_hub_or_prepared
from lightning_vlm.tokens import load_tokenizer

TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}


def load_text_encoder(
    name_or_path: str | None, config: dict[str, Any] | None, vocab_size: int | None, tokenizer: str | None
) -> tuple[transformers.PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A BERT-style transformers encoder (no pooler) and the tokenizer it reads with (default: `name_or_path`).

    Pretrained by name or path, embeddings resized when the tokenizer's vocabulary differs; or built from
    TINY_BERT updated by `config`, sized by `vocab_size` or else the tokenizer.
    """
    tokenizer = tokenizer or name_or_path
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    if vocab_size is None and loaded is not None:
        vocab_size = len(loaded)
    if name_or_path is not None:
        if config is not None:
            raise ValueError("give either name_or_path or config, not both")
        model = from_hub_or_prepared(transformers.AutoModel.from_pretrained, name_or_path, add_pooling_layer=False)
        if vocab_size is not None and vocab_size != model.config.vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model, loaded
    if vocab_size is None:
        raise ValueError("vocab_size (from the tokenizer) is required to build a text encoder from config")
    kwargs = {**TINY_BERT, **(config or {}), "vocab_size": vocab_size}
    hf_config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return transformers.AutoModel.from_config(hf_config, add_pooling_layer=False), loaded


@dataclass
class TextOutput:
    """tokens: (B, L, D) last hidden states (padding positions included, meaningless); pooled: (B, D)."""

    tokens: Tensor
    pooled: Tensor


class TextEncoder(nn.Module):
    """`AutoModel.from_pretrained(name_or_path)` or `AutoModel.from_config(config)`, pooled by [CLS] or masked mean.

    The encoder declares the tokenizer it reads with (`tokenizer`: a name, a tokenizer.json, or a dataset root
    holding one; default: `name_or_path`); the DataModule applies it. `vocab_size` comes from that tokenizer
    (or is passed directly): it sizes a model built from config and resizes a pretrained model's embeddings
    when it differs. `config` keys update TINY_BERT ("model_type" included).

    `length_buckets` > 1 sorts a batch by caption length and encodes it in that many chunks, each trimmed to its
    own longest row: the same states (attention never reads padding) for much less work when lengths vary (a
    CLIP batch of synthetic captions and their hard negatives: 17.7 real tokens of 30, text step 0.32 -> 0.20 s
    with 3 buckets). Right-padded batches only; others are encoded whole.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        tokenizer: str | None = None,
        length_buckets: int = 1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1, got {length_buckets}")
        self.pooling = pooling
        self.length_buckets = length_buckets
        self.model, self.tokenizer = load_text_encoder(name_or_path, config, vocab_size, tokenizer)
        if grad_checkpointing:
            enable_checkpointing(self.model)

    @property
    def width(self) -> int:
        """Hidden size D of tokens and pooled vector."""
        return self.model.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        """Encode (B, L) token ids; padding (attention_mask 0) is ignored by attention and by mean pooling."""
        tokens = self._hidden_states(input_ids, attention_mask)
        if self.pooling == "cls":
            return TextOutput(tokens, tokens[:, 0])
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return TextOutput(tokens, (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0))

    def _hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, D) last hidden states, in length buckets when asked and the batch is right-padded."""
        right_padded = bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())
        if self.length_buckets == 1 or len(input_ids) < 2 or not right_padded:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(dim=1)
        order = lengths.argsort()
        chunks = []
        for rows in order.chunk(self.length_buckets):
            length = max(1, int(lengths[rows].max()))
            ids, mask = input_ids[rows, :length], attention_mask[rows, :length]
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            chunks.append(F.pad(states, (0, 0, 0, input_ids.shape[1] - length)))
        return torch.cat(chunks)[order.argsort()]


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' own activation checkpointing of every layer (non-reentrant: frozen inputs need no grad), by its
    name since v5 or its older one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


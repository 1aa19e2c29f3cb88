"""Decoder-only language model: any transformers causal LM by name or path, or a tiny Llama built from config.

LoRA comes from peft (`add_lora`), injected in place so the wrapped model keeps its attribute paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
import transformers
from tokenizers import AddedToken
from torch import Tensor, nn

from lightning_vlm.encoders.text import enable_checkpointing
from lightning_vlm.pretrained import from_hub_or_prepared
from lightning_vlm.tokens import IMAGE_TOKEN, load_tokenizer, location_tokens

log = logging.getLogger(__name__)

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


@dataclass
class NextTokenOutput:
    """What a next-token loss reads (losses/language.py): the hidden states of every position (B, L, D), the
    unshifted labels (B, L; IGNORE_INDEX where no loss applies), and the head that turns hidden states into
    vocabulary logits, which the loss applies only where a label is. A model that scores every position itself
    (BLIP-2's ITG head, as BERT's LM head does) gives those logits (B, L, V) as ``hidden`` and no head."""

    hidden: Tensor
    labels: Tensor
    head: Callable[[Tensor], Tensor] | None = None


class LanguageModel(nn.Module):
    """`AutoModelForCausalLM.from_pretrained(name_or_path)` or `from_config(TINY_LLAMA | config)`.

    It declares its tokenizer (`tokenizer`, default `name_or_path`; a tokenizer.json or dataset root works too);
    a model built from config takes its vocabulary size and special token ids from it. `lora` (keys of
    peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules) adds LoRA adapters at construction.
    `location_bins` adds that many location tokens (``<loc_00>`` ...) to the tokenizer, and rows for them to the
    embeddings, for the grounding task (the DataModule's ``loc_bins`` must match). The tokenizer also gets the
    image placeholder ``<image>`` (`image_token_id`), which a model replaces by an image's tokens.
    `dtype` ("float32", "bfloat16", "float16"; unset: as transformers loads it) sets the LM's weights' dtype: half
    precision suits an LM that stays frozen (with or without LoRA, whose adapters stay float32), halving its memory
    and, on a CPU with bf16 instructions, its step time; inputs are cast to it, so the parts around it stay float32.
    `attn_implementation` goes to transformers ("eager", "sdpa", ...): on CPU, bf16 SDPA's backward is slow for
    short sequences, eager is not. `grad_checkpointing`: activation checkpointing of every decoder layer (less
    memory, one more forward per step).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        lora: dict[str, Any] | None = None,
        location_bins: int = 0,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        options = {"dtype": weights_dtype(dtype)} if dtype is not None else {}
        if attn_implementation is not None:
            options["attn_implementation"] = attn_implementation
        source = tokenizer or name_or_path
        if source is None:
            raise ValueError("a language model needs a tokenizer: give name_or_path or tokenizer")
        self.tokenizer = load_tokenizer(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if location_bins:
            self.tokenizer.add_tokens(list(location_tokens(location_bins)))
        self.tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if name_or_path is not None:
            if config is not None:
                raise ValueError("give either name_or_path or config, not both")
            self.model = from_hub_or_prepared(transformers.AutoModelForCausalLM.from_pretrained, name_or_path,
                                              **options)
            log.info("loaded language model %s (%s)", name_or_path, self.model.dtype)
        else:
            tok = self.tokenizer
            kwargs = {**TINY_LLAMA, **(config or {}), "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                      "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
            hf_config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
            self.model = transformers.AutoModelForCausalLM.from_config(hf_config, **options)
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer))
        if grad_checkpointing:
            enable_checkpointing(self.model)
        if lora:
            self.add_lora(**lora)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LM's weights, which its inputs are cast to."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def width(self) -> int:
        """Hidden size of the LM's token embeddings."""
        return self.model.get_input_embeddings().embedding_dim

    def add_lora(self, **lora_config: Any) -> list[str]:
        """Inject LoRA adapters (peft) into the targeted modules; returns the names of the new parameters.

        Only the adapters are trainable afterwards: the base weights of this LM are frozen. The adapters are float32
        whatever the LM's dtype (peft creates them in the base layer's), so the optimizer updates full precision.
        """
        before = {name for name, _ in self.model.named_parameters()}
        config = peft.LoraConfig(**{"target_modules": ["q_proj", "v_proj"], **lora_config})
        peft.inject_adapter_in_model(config, self.model)
        # peft renames each wrapped layer's own weight (q_proj.weight -> q_proj.base_layer.weight): not an adapter
        added = [name for name, _ in self.model.named_parameters() if name not in before and "lora_" in name]
        for name, param in self.model.named_parameters():
            param.requires_grad = name in added
            if name in added:
                param.data = param.data.float()
        return added

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, D) input embeddings."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor,
                position_ids: Tensor | None = None) -> NextTokenOutput:
        """The decoder's hidden states for the next-token loss on ``labels`` (unshifted). `attention_mask` is (B, L)
        padding or a prepared (B, 1, L, L) additive mask (a prefix-LM's) in the LM's `dtype`; `position_ids`
        default to sequential."""
        inputs_embeds = inputs_embeds.to(self.dtype)  # visual tokens come in float32
        hidden = self.model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                          position_ids=position_ids).last_hidden_state
        return NextTokenOutput(hidden, labels, self.logits)

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of hidden states: the output layer, then the final soft-capping of models that have it
        (Gemma 2), as transformers' forward applies it."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if not cap else cap * torch.tanh(logits / cap)

    @torch.no_grad()
    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor, **generation: Any) -> Tensor:
        """New token ids (B, <= max_new_tokens) continuing left-padded ``inputs_embeds``; `generation` goes to
        transformers' generate (max_new_tokens, num_beams, do_sample, top_p, temperature, ...)."""
        tok = self.tokenizer
        inputs_embeds = inputs_embeds.to(self.dtype)  # visual tokens come in float32
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **generation)


def weights_dtype(name: str) -> torch.dtype:
    """torch.float32, torch.bfloat16 or torch.float16 by name; anything else is a clear error."""
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in allowed:
        raise ValueError(f"dtype must be one of {sorted(allowed)}, got {name!r}")
    return allowed[name]

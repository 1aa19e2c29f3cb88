"""Chats rendered by a tokenizer's own chat template, with labels on the assistant's replies only.

transformers renders a chat but does not say which tokens are the assistant's (its
``return_assistant_tokens_mask`` needs templates written with {% generation %} markers, which most, SmolLM2's
included, lack). So each reply is located by rendering the chat twice around it: up to the generation prompt
before it, and through it; the tokens in between are the reply and its end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from lightning_vlm.tokens import IGNORE_INDEX


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def chat_ids(tokenizer: PreTrainedTokenizerBase, turns: Sequence[tuple[str, str]], system: str | None = None,
             supervised: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a chat of (user, assistant) turns: labels equal the ids on each assistant reply up to
    and including its end-of-turn token (the EOS), and IGNORE_INDEX everywhere else (system, user turns, role headers).
    ``supervised``: which replies carry labels (default all; few-shot demonstrations do not)."""
    messages = [{"role": "system", "content": system}] if system else []
    ids: list[int] = []
    labels: list[int] = []
    for (user, assistant), labelled in zip(turns, supervised or [True] * len(turns)):
        messages.append({"role": "user", "content": user})
        prefix = render(tokenizer, messages, generation_prompt=True)
        messages.append({"role": "assistant", "content": assistant})
        full = render(tokenizer, messages)
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise ValueError(f"the chat template of {tokenizer.name_or_path!r} does not render a chat as a prefix of "
                             "its continuation, so replies cannot be located")
        reply = full[len(prefix):]
        end = reply.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in reply else len(reply)
        answer = reply[:end] if labelled else [IGNORE_INDEX] * end
        labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + answer + [IGNORE_INDEX] * (len(reply) - end)
        ids = full
    return ids, labels


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None,
                          history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a chat up to where the assistant's reply to ``prompt`` starts, after the (user, assistant)
    turns of ``history`` (few-shot demonstrations, or an earlier conversation)."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return render(tokenizer, messages + [{"role": "user", "content": prompt}], generation_prompt=True)

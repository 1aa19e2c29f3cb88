"""Self-synthesized rehearsal (Huang et al., 2024): the language model itself, before any vision training, writes the
text a generative recipe later rehearses, so the study needs no outside corpus.

The prompts are a fixed list kept beside this module (``rehearsal_prompts.txt``): ``topic:`` lines ask for a short
paragraph, ``question:`` lines are answered. Sample i answers prompt i modulo their number, sampled (temperature,
top-p) from a seeded generator, so the same LM, seed and count write the same texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from lightning_vlm.data.collate import Collator
from lightning_vlm.data.tools.text import TextRow, qa_text
from lightning_vlm.encoders.lm import LanguageModel

PARAGRAPH_REQUEST = "Write a short paragraph of two or three sentences about {topic}."


@dataclass(frozen=True)
class RehearsalPrompt:
    """One entry of the list: ``kind`` "topic" (a paragraph is written on it) or "question" (it is answered)."""

    kind: str
    text: str

    @property
    def request(self) -> str:
        """What the LM is asked."""
        return PARAGRAPH_REQUEST.format(topic=self.text) if self.kind == "topic" else self.text


def load_prompts() -> list[RehearsalPrompt]:
    """The packaged prompt list, in file order (comment and blank lines skipped)."""
    text = resources.files("lightning_vlm.data").joinpath("rehearsal_prompts.txt").read_text(encoding="utf-8")
    prompts = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            kind, _, body = line.partition(":")
            if kind not in ("topic", "question") or not body.strip():
                raise ValueError(f"rehearsal_prompts.txt: a line must start with 'topic:' or 'question:', got {line!r}")
            prompts.append(RehearsalPrompt(kind, body.strip()))
    return prompts


@torch.no_grad()
def synthesize(lm: LanguageModel, samples: int, seed: int = 0, batch_size: int = 16, max_new_tokens: int = 60,
               temperature: float = 0.7, top_p: float = 0.9) -> list[TextRow]:
    """``samples`` texts the LM writes for the prompts, in turn (its chat template lays out the requests where it has
    one); a paragraph is kept as written, an answer after its question. Generations left empty are dropped. The
    global random state is left as it was."""
    prompts = load_prompts()
    chosen = [prompts[i % len(prompts)] for i in range(samples)]
    collator, device = Collator(lm.tokenizer), lm.model.device
    was_training = lm.training
    lm.eval()
    replies: list[str] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, samples, batch_size):
            ids, mask = collator.prompts([p.request for p in chosen[start:start + batch_size]])
            new = lm.generate(lm.embed(ids.to(device)), mask.to(device), max_new_tokens=max_new_tokens,
                              min_new_tokens=1, do_sample=True, temperature=temperature, top_p=top_p,
                              suppress_tokens=[lm.image_token_id])
            replies += [" ".join(text.split()) for text in lm.tokenizer.batch_decode(new, skip_special_tokens=True)]
    lm.train(was_training)
    return [_row(prompt, reply) for prompt, reply in zip(chosen, replies) if reply]


def _row(prompt: RehearsalPrompt, reply: str) -> TextRow:
    if prompt.kind == "topic":
        return TextRow(reply, {"kind": "paragraph", "topic": prompt.text})
    return TextRow(qa_text(prompt.text, reply), {"kind": "qa", "question": prompt.text, "answer": reply})

"""Task formatting: one stored sample becomes a (prompt, target) text pair for the task drawn for it.

Tasks mix by weight per recipe: ``contrastive`` (the caption alone, no LM loss), ``caption``, ``vqa``
(a question–answer pair from the sample's json), ``grounding`` (name an object, answer with its box as
discretised location tokens), ``chat`` (several of the sample's questions as a multi-turn conversation about
its image, every reply supervised), ``fewshot`` (a question after ``shots`` demonstrations: other images with
their answered questions, interleaved; the collator draws the demonstrations from the batch). A task a sample
cannot serve (plain caption data has no questions) falls back to captioning. A sample of a text-only source
(``modality: text``) drawn for a generative task becomes ``text``: language modelling on the whole text, no prompt
and no image (rehearsal against forgetting, as CogVLM2 and Phi-3-vision mix text-only data into VLM training); drawn
for ``contrastive`` it stays an unlabelled caption (FLAVA's MLM reads it).

Contrastive examples may also carry ``hard_negatives`` captions from the sample's json (NegCLIP, Yuksekgonul
et al., 2023): the same scene with one colour, shape, size or relation swapped, scored as extra negatives. With
``object_captions: p`` a scene of several objects is captioned, with probability p, by one of its objects alone
(the sub-captions of DreamLIP, Zheng et al., 2024, and DCI's region captions): a true description of part of the
image, which Llip's caption-conditioned embedding is built to match and which would otherwise only ever be
another image's caption, that is, a negative. Measured on Llip at p = 0.5 it hurt (docs/results/contrastive.md):
one object's caption is also true of other images of the batch, which score it as their negative.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.synthetic.language import object_caption
from lightning_vlm.tokens import location_tokens

TASKS = ("contrastive", "caption", "vqa", "grounding", "chat", "fewshot")
UNPROMPTED = ("contrastive", "text")  # tasks laid out as the text alone: no system prompt, prompt or image


@dataclass
class TextExample:
    """The text side of a training example; only `target` carries labels (none for contrastive).

    ``negatives``: hard-negative captions of a contrastive example, a fixed number per example; None pads a
    slot the sample had no negative for. ``system``: the system prompt of a generative example. ``history``:
    the earlier (question, reply) turns of a chat about the same image, each reply supervised too.
    ``demonstration``: a (question, answer) pair about this sample's image that a few-shot example elsewhere in
    the batch may show before its own question.
    """

    task: str
    prompt: str
    target: str
    extra: dict = field(default_factory=dict)
    negatives: list[str | None] = field(default_factory=list)
    system: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    demonstration: tuple[str, str] | None = None


def box_to_tokens(box: list[float], image_size: int, bins: int) -> str:
    """A pixel box (x0, y0, x1, y1) as four location tokens, each coordinate binned over the image side."""
    vocab = location_tokens(bins)
    return "".join(vocab[min(bins - 1, max(0, int(c / image_size * bins)))] for c in box)


@dataclass
class TaskFormatter:
    """Draws a task per sample by weight and writes its prompt and target; contrastive examples get
    ``hard_negatives`` negative captions drawn without replacement from the sample's json, and with probability
    ``object_captions`` (scenes of several objects only) one object's caption instead of the scene's. ``system_prompt``
    goes with every generative example (a system message under a chat template, else text before the prompt).
    ``chat_turns``: the most questions a chat example asks (at least two when the sample has them)."""

    weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    caption_prompt: str = ""
    grounding_template: str = "where is the {name}?"
    loc_bins: int = 32
    hard_negatives: int = 0
    object_captions: float = 0.0
    system_prompt: str = ""
    chat_turns: int = 3

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose among {TASKS}")
        self._names = [t for t, w in self.weights.items() if w > 0]
        self._weights = [self.weights[t] for t in self._names]

    def __call__(self, sample: RawSample, image_size: int, rng: random.Random, modality: str = "pair"
                 ) -> TextExample:
        example = self._format(sample, image_size, rng)
        if modality == "text" and example.task != "contrastive":
            return TextExample("text", "", sample.caption)
        if example.task != "contrastive":
            example.system = self.system_prompt
        if "fewshot" in self._names:
            example.demonstration = self._demonstration(sample, rng)
        return example

    def _demonstration(self, sample: RawSample, rng: random.Random) -> tuple[str, str]:
        """One of the sample's questions with its answer, or its caption when it has none."""
        if not sample.info.get("qa"):
            return self.caption_prompt, sample.caption
        qa = rng.choice(sample.info["qa"])
        return qa["question"], qa["answer"]

    def _format(self, sample: RawSample, image_size: int, rng: random.Random) -> TextExample:
        task = rng.choices(self._names, self._weights)[0]
        if task in ("vqa", "fewshot") and sample.info.get("qa"):
            qa = rng.choice(sample.info["qa"])
            return TextExample(task, qa["question"], qa["answer"], {"skill": qa.get("skill")})
        if task == "chat" and sample.info.get("qa"):
            *earlier, last = rng.sample(sample.info["qa"], min(self.chat_turns, len(sample.info["qa"])))
            return TextExample("chat", last["question"], last["answer"], {"skill": last.get("skill")},
                               history=[(qa["question"], qa["answer"]) for qa in earlier])
        if task == "grounding":
            nameable = _uniquely_named(sample.info.get("objects", []))
            if nameable:
                name, obj = rng.choice(nameable)
                target = box_to_tokens(obj["box"], image_size, self.loc_bins)
                return TextExample("grounding", self.grounding_template.format(name=name), target, {"box": obj["box"]})
        if task == "contrastive":
            caption = self._object_caption(sample, rng) or sample.caption
            return TextExample("contrastive", "", caption, negatives=self._negatives(sample, rng))
        return TextExample("caption", self.caption_prompt, sample.caption)

    def _object_caption(self, sample: RawSample, rng: random.Random) -> str | None:
        """With probability ``object_captions``, one object of a scene of several captioned alone; else None (and
        no draw from ``rng`` when the option is off, so runs without it see the same stream as before)."""
        objects = sample.info.get("objects", [])
        if not self.object_captions or len(objects) < 2 or rng.random() >= self.object_captions:
            return None
        return object_caption(rng.choice(objects), sample.info.get("word"))

    def _negatives(self, sample: RawSample, rng: random.Random) -> list[str | None]:
        """``hard_negatives`` captions of the sample's swaps, padded with None when it has fewer."""
        pool = [neg["caption"] for neg in sample.info.get("hard_negatives", [])]
        drawn = rng.sample(pool, min(self.hard_negatives, len(pool))) if self.hard_negatives else []
        return drawn + [None] * (self.hard_negatives - len(drawn))


def _uniquely_named(objects: list[dict]) -> list[tuple[str, dict]]:
    """Objects with the shortest description that no other object in the scene shares."""
    named = []
    for describe in (lambda o: f"{o['color']} {o['shape']}", lambda o: f"{o['size']} {o['color']} {o['shape']}"):
        counts = Counter(describe(o) for o in objects)
        named += [(describe(o), o) for o in objects if counts[describe(o)] == 1 and not any(o is n for _, n in named)]
    return named

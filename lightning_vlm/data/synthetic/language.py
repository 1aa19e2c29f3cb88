"""Text about a scene: a caption naming every object, skill-tagged questions, and hard-negative captions.

Every statement is checked against the boxes: answers are true, hard negatives are false, and no negative names
a held-out colour-shape pair that the scene does not show.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from itertools import combinations, permutations

from lightning_vlm.data.synthetic.scenes import COLORS, HELD_OUT, SHAPES, SIZES, Box, Scene, SceneObject

RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ("zero", "one", "two", "three", "four")
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
OBJECT_PHRASE = "a {size} {color} {shape}"  # how every caption names an object
WORD_SENTENCE = "the word {} is written"  # a caption's last sentence when the image shows a word

Clause = tuple[int, str | None, int | None]  # (object, relation, other object); a lone object has no relation


def holds(a: Box, relation: str, b: Box) -> bool:
    """Whether box `a` lies entirely `relation` box `b` (boxes end-exclusive, y down)."""
    return {"left of": a[2] <= b[0], "right of": a[0] >= b[2], "above": a[3] <= b[1], "below": a[1] >= b[3]}[relation]


def relation(a: Box, b: Box) -> str:
    """The relation of `a` to `b` along the axis on which they are farther apart (scene boxes never overlap)."""
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    if gap_x >= gap_y:
        return "left of" if a[2] <= b[0] else "right of"
    return "above" if a[3] <= b[1] else "below"


def clauses(scene: Scene) -> list[Clause]:
    """Objects paired in order, (0, 1) and (2, 3), each pair with its relation; an odd last object stands alone."""
    objs, n = scene.objects, len(scene.objects)
    pairs = [(i, relation(objs[i].box, objs[i + 1].box), i + 1) for i in range(0, n - 1, 2)]
    return pairs + [(n - 1, None, None)] if n % 2 else pairs


def caption(scene: Scene) -> str:
    """E.g. "a large red circle left of a small blue square. a small green star. the word cat is written." """
    return _write(scene.objects, clauses(scene), scene.word)


def questions(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """At most one question per skill, each asked only where its answer is unambiguous."""
    askers = {"color": _color, "shape": _shape, "count": _count, "spatial": _spatial, "text": _text,
              "existence": _existence}  # fmt: skip
    qa = [(skill, ask(scene, rng)) for skill, ask in askers.items()]
    return [{"question": pair[0], "answer": pair[1], "skill": skill} for skill, pair in qa if pair is not None]


def hard_negatives(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """One false caption per kind where one exists: colour, shape or size swapped or changed; a relation reversed."""
    parts = clauses(scene)
    options = {kind: [_write(objs, parts, scene.word) for objs in _attribute_edits(scene.objects, kind)]
               for kind in ATTRIBUTES}  # fmt: skip
    options["relation"] = [_write(scene.objects, p, scene.word) for p in _relation_flips(scene.objects, parts)]
    return [{"caption": rng.choice(texts), "kind": kind} for kind, texts in options.items() if texts]


def object_caption(obj: dict[str, str], word: str | None) -> str:
    """One object of a scene (a json ``objects`` entry) captioned alone, worded as the scene's caption names it,
    with the written word's sentence if any: a true description of part of the image."""
    return _joined([OBJECT_PHRASE.format(size=obj["size"], color=obj["color"], shape=obj["shape"])], word)


def _write(objects: list[SceneObject], parts: list[Clause], word: str | None) -> str:
    """The caption's sentences: one per clause, then the word if any."""
    sentences = [_phrase(objects[i]) + (f" {rel} {_phrase(objects[j])}" if rel and j is not None else "")
                 for i, rel, j in parts]  # fmt: skip
    return _joined(sentences, word)


def _joined(sentences: list[str], word: str | None) -> str:
    """Sentences as a caption, the written word's sentence last."""
    if word is not None:
        sentences = [*sentences, WORD_SENTENCE.format(word)]
    return ". ".join(sentences) + "."


def _phrase(obj: SceneObject) -> str:
    """How every caption names an object: a <size> <colour> <shape>."""
    return OBJECT_PHRASE.format(size=obj.size, color=obj.color, shape=obj.shape)


def _attribute_edits(objs: list[SceneObject], kind: str) -> list[list[SceneObject]]:
    """False variants with `kind` swapped between two objects, or else changed on one; swaps test binding harder."""
    swaps = [_edited(objs, {i: getattr(objs[j], kind), j: getattr(objs[i], kind)}, kind)
             for i, j in combinations(range(len(objs)), 2) if getattr(objs[i], kind) != getattr(objs[j], kind)]
    changes = [_edited(objs, {i: value}, kind)
               for i in range(len(objs)) for value in ATTRIBUTES[kind] if value != getattr(objs[i], kind)]  # fmt: skip
    for variants in (swaps, changes):
        valid = [v for v in variants if _valid_negative(objs, v)]
        if valid:
            return valid
    return []


def _edited(objs: list[SceneObject], values: dict[int, str], kind: str) -> list[SceneObject]:
    return [replace(o, **{kind: values[i]}) if i in values else o for i, o in enumerate(objs)]


def _valid_negative(objs: list[SceneObject], variant: list[SceneObject]) -> bool:
    """The variant is false (it names a different multiset of objects) and names no held-out pair the scene lacks."""
    seen = {(o.color, o.shape) for o in objs}
    new = {(o.color, o.shape) for o in variant} - seen
    return Counter(map(_triple, variant)) != Counter(map(_triple, objs)) and not new & set(HELD_OUT)


def _triple(o: SceneObject) -> tuple[str, str, str]:
    return o.size, o.color, o.shape


def _relation_flips(objs: list[SceneObject], parts: list[Clause]) -> list[list[Clause]]:
    """Clauses reversed where no two objects fitting the clause's descriptions satisfy the reversed relation."""
    flips = []
    for k, (i, rel, j) in enumerate(parts):
        if rel is None or j is None:
            continue
        a_like = [o for o in objs if _triple(o) == _triple(objs[i])]
        b_like = [o for o in objs if _triple(o) == _triple(objs[j])]
        if not any(holds(a.box, OPPOSITE[rel], b.box) for a in a_like for b in b_like if a is not b):
            flips.append(parts[:k] + [(i, OPPOSITE[rel], j)] + parts[k + 1 :])
    return flips


def _color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    return _ask_attribute(scene, rng, known="shape", asked="color", question="What colour is the {}?")


def _shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    return _ask_attribute(scene, rng, known="color", asked="shape", question="What shape is the {} object?")


def _ask_attribute(scene: Scene, rng: random.Random, known: str, asked: str, question: str) -> tuple[str, str] | None:
    """Ask for one attribute of an object named by another that no other object in the scene shares."""
    counts = Counter(getattr(o, known) for o in scene.objects)
    unique = [o for o in scene.objects if counts[getattr(o, known)] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return question.format(getattr(obj, known)), getattr(obj, asked)


def _count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "How many objects are there?", NUMBERS[len(scene.objects)]


def _spatial(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    """A yes/no relation question between two objects named by colour and shape; yes and no equally likely."""
    pairs = Counter((o.color, o.shape) for o in scene.objects)
    named = [o for o in scene.objects if pairs[(o.color, o.shape)] == 1]
    if len(named) < 2:
        return None
    a, b = rng.choice(list(permutations(named, 2)))
    rel = rng.choice([r for r in RELATIONS if holds(a.box, r, b.box)])
    yes = rng.random() < 0.5
    asked = rel if yes else OPPOSITE[rel]
    return f"Is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?", "yes" if yes else "no"


def _text(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    return None if scene.word is None else ("What word is written?", scene.word)


def _existence(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Is there a <colour> <shape>? Yes and no equally likely; a "no" never names a held-out pair."""
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c, s) not in HELD_OUT]
    yes = rng.random() < 0.5
    color, shape = rng.choice(present if yes else absent)
    article = "an" if color[0] in "aeiou" else "a"
    return f"Is there {article} {color} {shape}?", "yes" if yes else "no"

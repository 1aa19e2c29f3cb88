"""The evaluation suite: retrieval, zero-shot and binding on hand-computed cases, and the evaluator end to end."""

from collections import namedtuple

import pytest
import torch
from torch import Tensor
from torchmetrics.retrieval import RetrievalHitRate

from lightning_vlm.eval import ContrastiveEvaluator, binding_accuracy, retrieval_recall, zero_shot_accuracy
from lightning_vlm.eval.zero_shot import concat_reprs, select_rows

WORDS = ["red", "blue", "green", "circle", "square", "triangle"]


class Vocabulary:
    """A fake tokenizer: each distinct text gets one id, returned as a single-token sequence."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = []
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
            ids.append(self.texts.index(text))
        return torch.tensor(ids)[:, None], torch.ones(len(texts), 1, dtype=torch.long)


def bag_of_words(words: list[str]) -> Tensor:
    """Normalised counts of the colour and shape words: blind to size, order and relations."""
    vector = torch.tensor([float(words.count(word)) for word in WORDS])
    return vector / vector.norm()


class BagOfWordsModel:
    """A fake scoring model: images carry their bag of words in the first pixels, texts are bags of their words."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        return pixel_values[:, 0, 0, : len(WORDS)]

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        texts = [self.vocabulary.texts[i] for i in input_ids[:, 0].tolist()]
        return torch.stack([bag_of_words(text.rstrip(".").split()) for text in texts])

    def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
        return image_repr @ text_repr.T


Pair = namedtuple("Pair", ["embedding", "scale"])


class TupleModel(BagOfWordsModel):
    """The same model with namedtuple representations, as a caption-conditioned model like Llip might return."""

    def encode_images(self, pixel_values: Tensor) -> Pair:
        return Pair(super().encode_images(pixel_values), torch.ones(len(pixel_values)))

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return super().encode_texts(input_ids, attention_mask), torch.full((len(input_ids),), 2.0)

    def similarity(self, image_repr: Pair, text_repr: tuple[Tensor, Tensor]) -> Tensor:
        return image_repr.scale[:, None] * text_repr[1][None, :] * super().similarity(image_repr[0], text_repr[0])


class MixedPrecisionModel(BagOfWordsModel):
    """Images encoded under bf16 autocast during validation steps, texts in float32 when the epoch ends (as Lightning's
    bf16-mixed does): the evaluator must still score them together."""

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        return super().encode_images(pixel_values).bfloat16()


def test_retrieval_recall_hand_computed_with_repeated_captions() -> None:
    captions = ["a", "b", "a", "c"]
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0],  # "a": top1 "b" miss, top2 has "a" (column 2)
            [0.2, 0.5, 0.1, 0.7],  # "b": top1 "c" miss, top2 has "b"
            [0.9, 0.1, 0.2, 0.3],  # "a": top1 is column 0, another copy of "a": a hit
            [0.4, 0.3, 0.6, 0.1],  # "c": its caption is ranked last
        ]
    )
    metrics = retrieval_recall(scores, captions, captions, ks=(1, 2, 10))
    # text -> image, per column: "a" hit@1; "b" hit@2; "a" hit@1 (image 0 shows "a"); "c" hit@3
    assert metrics == pytest.approx(
        {"i2t_r1": 0.25, "i2t_r2": 0.75, "i2t_r10": 1.0, "t2i_r1": 0.5, "t2i_r2": 0.75, "t2i_r10": 1.0}
    )


def test_retrieval_recall_matches_torchmetrics_hit_rate() -> None:
    generator = torch.Generator().manual_seed(0)
    image_texts = [f"caption {i}" for i in torch.randint(0, 8, (30,), generator=generator).tolist()]
    texts = [f"caption {i}" for i in torch.randint(0, 8, (20,), generator=generator).tolist()]
    scores = torch.randn(30, 20, generator=generator)
    metrics = retrieval_recall(scores, image_texts, texts, ks=(1, 5))
    target = torch.tensor([[a == b for b in texts] for a in image_texts])
    for k in (1, 5):
        for name, s, t in (("i2t", scores, target), ("t2i", scores.T, target.T)):
            indexes = torch.arange(len(s))[:, None].expand_as(s)
            expected = RetrievalHitRate(top_k=k)(s.flatten(), t.flatten(), indexes=indexes.flatten())
            assert metrics[f"{name}_r{k}"] == pytest.approx(expected.item())


class LookupModel:
    """Images are class indices; a text scores ``table[matches]`` by whether it names the image's class."""

    def __init__(self, vocabulary: Vocabulary, classes: list[str], table: dict[bool, float]) -> None:
        self.vocabulary, self.classes, self.table = vocabulary, classes, table

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return input_ids[:, 0]

    def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
        texts = [self.vocabulary.texts[i] for i in text_repr.tolist()]
        names = [self.classes[i] for i in image_repr.tolist()]
        return torch.tensor([[self.table[name in text.rstrip(".").split()] for text in texts] for name in names])


@pytest.mark.parametrize(("table", "expected"), [({True: 1.0, False: 0.0}, 1.0), ({True: 0.0, False: 1.0}, 0.0)])
def test_zero_shot_accuracy_perfect_and_anti_models(table: dict[bool, float], expected: float) -> None:
    classes, vocabulary = ["circle", "square", "triangle"], Vocabulary()
    images = torch.tensor([0, 1, 2, 2, 1])
    targets = [classes[i] for i in images.tolist()]
    model = LookupModel(vocabulary, classes, table)
    accuracy = zero_shot_accuracy(model, vocabulary, images, targets, classes, ["a {}.", "a photo of a {}."])
    assert accuracy == expected


@pytest.mark.parametrize(("reduction", "expected"), [("mean", 1.0), ("max", 0.0)])
def test_zero_shot_reduces_scores_over_templates(reduction: str, expected: float) -> None:
    """Template 1 favours the right class by 1.0, template 2 a wrong one by 0.6: the mean is right, the max wrong."""
    classes, vocabulary = ["circle", "square"], Vocabulary()

    class TwoTemplateModel(LookupModel):
        def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
            correct = super().similarity(image_repr, text_repr)
            texts = [self.vocabulary.texts[i] for i in text_repr.tolist()]
            photo = torch.tensor([text.startswith("a photo") for text in texts])
            return torch.where(photo, 1.2 - 0.6 * correct, correct)

    model = TwoTemplateModel(vocabulary, classes, {True: 1.0, False: 0.0})
    templates = ["a {}.", "a photo of a {}."]
    accuracy = zero_shot_accuracy(model, vocabulary, torch.tensor([0, 1]), ["circle", "square"], classes, templates,
                                  reduction=reduction)
    assert accuracy == expected


def test_zero_shot_max_lets_only_the_template_that_describes_the_image_vote() -> None:
    """Images are red circles and blue squares. A template naming the wrong colour scores "square" high whatever the
    image (a bias the mean inherits); the template with the image's own colour ranks the shapes correctly."""
    classes, vocabulary = ["circle", "square"], Vocabulary()
    colors = ["red", "blue"]

    class ColourBiasedModel(LookupModel):
        def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
            correct = super().similarity(image_repr, text_repr)
            texts = [self.vocabulary.texts[i] for i in text_repr.tolist()]
            own_colour = torch.tensor([[colors[i] in text for text in texts] for i in image_repr.tolist()])
            says_square = torch.tensor(["square" in text for text in texts])
            return torch.where(own_colour, 2.0 + correct, says_square * 2.0 + 0.5)

    model = ColourBiasedModel(vocabulary, classes, {True: 1.0, False: 0.0})
    images, targets, templates = torch.tensor([0, 0, 1]), ["circle", "circle", "square"], ["a red {}.", "a blue {}."]
    assert zero_shot_accuracy(model, vocabulary, images, targets, classes, templates, reduction="max") == 1.0
    mean = zero_shot_accuracy(model, vocabulary, images, targets, classes, templates, reduction="mean")
    assert mean == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="reduction"):
        zero_shot_accuracy(model, vocabulary, images, targets, classes, templates, reduction="median")


def test_binding_accuracy_per_kind() -> None:
    scores_true = torch.tensor([0.9, 0.5, 0.7, 0.2, 0.6])
    scores_neg = torch.tensor([0.1, 0.5, 0.8, 0.1, 0.3])  # the tie on the second pair is a failure
    kinds = ["color", "color", "relation", "size", "shape"]
    assert binding_accuracy(scores_true, scores_neg, kinds) == pytest.approx(
        {"binding_all": 0.6, "binding_color": 0.5, "binding_relation": 0.0, "binding_size": 1.0, "binding_shape": 1.0}
    )


def test_representation_helpers_keep_tuple_types() -> None:
    pairs = [Pair(torch.arange(3), torch.zeros(3)), Pair(torch.arange(3, 5), torch.ones(2))]
    joined = concat_reprs(pairs)
    assert isinstance(joined, Pair) and joined.embedding.tolist() == [0, 1, 2, 3, 4]
    picked = select_rows(joined, torch.tensor([4, 0]))
    assert picked.embedding.tolist() == [4, 0] and picked.scale.tolist() == [1.0, 0.0]
    with pytest.raises(TypeError, match="Tensor or a non-empty tuple of Tensors"):
        concat_reprs([[torch.zeros(1)]])


def sample(objects: list[tuple[str, str]], caption: str, negatives: list[tuple[str, str]]) -> dict:
    """A meta entry (CONTRACTS.md) with the (colour, shape) objects and (caption, kind) hard negatives."""
    return {
        "caption": caption,
        "objects": [{"color": c, "shape": s, "size": "small", "box": [0, 0, 1, 1]} for c, s in objects],
        "hard_negatives": [{"caption": text, "kind": kind} for text, kind in negatives],
    }


def batch(metas: list[dict]) -> dict:
    """A batch whose images carry the bag of words of their objects in their first pixels."""
    pixel_values = torch.zeros(len(metas), 3, 4, 8)
    for i, meta in enumerate(metas):
        words = [word for obj in meta["objects"] for word in (obj["color"], obj["shape"])]
        pixel_values[i, 0, 0, : len(WORDS)] = bag_of_words(words)
    return {"pixel_values": pixel_values, "meta": metas}


BATCHES = [
    [
        sample([("red", "circle")], "a large red circle.", [("a large blue circle.", "color")]),
        sample([("blue", "square")], "a small blue square.", [("a small blue triangle.", "shape")]),
    ],
    [
        sample(
            [("red", "circle"), ("blue", "square")],
            "a red circle left of a blue square.",
            [("a red circle right of a blue square.", "relation"), ("a blue circle left of a red square.", "color")],
        ),
        sample([("red", "circle")], "a large red circle.", [("a small red circle.", "size")]),
    ],
    [sample([("green", "triangle"), ("green", "square")], "a green triangle above a green square.", [])],
]


@pytest.mark.parametrize("model_class", [BagOfWordsModel, TupleModel, MixedPrecisionModel])
def test_evaluator_end_to_end(model_class: type) -> None:
    vocabulary = Vocabulary()
    model = model_class(vocabulary)
    evaluator = ContrastiveEvaluator(vocabulary, chunk_size=3)
    for metas in BATCHES:
        evaluator.update(model, batch(metas))
    metrics = evaluator.compute(model, "val")
    # The bag of words retrieves every caption; it sees colours and shapes but neither sizes nor relations, and
    # misses the colour swap between two objects ("a blue circle left of a red square." has the same words).
    assert metrics == pytest.approx(
        {
            **{f"val/{way}_r{k}": 1.0 for way in ("i2t", "t2i") for k in (1, 5, 10)},
            "val/binding_all": 0.4,
            "val/binding_color": 0.5,
            "val/binding_shape": 1.0,
            "val/binding_size": 0.0,
            "val/binding_relation": 0.0,
            "val/zeroshot_color": 1.0,
            "val/zeroshot_color_n": 4.0,  # the two-colour scene is left out
            "val/zeroshot_color_multi": 1.0,  # the two green objects
            "val/zeroshot_color_multi_n": 1.0,
            "val/zeroshot_shape": 1.0,
            "val/zeroshot_shape_n": 3.0,  # both two-shape scenes are left out
        }
    )


def test_zero_shot_scores_multi_object_scenes_apart() -> None:
    """A model blind to scenes of several objects loses exactly those in ``_multi`` (no shape is shared by two)."""
    vocabulary = Vocabulary()
    model, evaluator = BagOfWordsModel(vocabulary), ContrastiveEvaluator(vocabulary)
    for metas in BATCHES:
        images = batch(metas)
        images["pixel_values"][torch.tensor([len(meta["objects"]) > 1 for meta in metas])] = 0  # ties: class 0
        evaluator.update(model, images)
    metrics = evaluator.compute(model, "val")
    assert metrics["val/zeroshot_color"] == 0.75 and metrics["val/zeroshot_color_n"] == 4.0
    assert metrics["val/zeroshot_color_multi"] == 0.0 and metrics["val/zeroshot_color_multi_n"] == 1.0
    assert metrics["val/zeroshot_shape"] == 1.0 and "val/zeroshot_shape_multi" not in metrics


def test_evaluator_max_samples_and_reset() -> None:
    vocabulary = Vocabulary()
    model, evaluator = BagOfWordsModel(vocabulary), ContrastiveEvaluator(vocabulary, max_samples=3)
    for metas in BATCHES:
        evaluator.update(model, batch(metas))
    assert len(evaluator.metas) == 3 and sum(len(r) for r in evaluator.image_reprs) == 3
    assert evaluator.compute(model, "test")["test/zeroshot_shape_n"] == 2.0
    evaluator.reset()
    with pytest.raises(ValueError, match="before any update"):
        evaluator.compute(model, "test")


def test_caption_templates_leave_the_attribute_open_and_fill_the_others():
    from lightning_vlm.eval.zero_shot import caption_templates

    objects = [{"size": "small", "color": "red", "shape": "circle"},
               {"size": "large", "color": "blue", "shape": "square"}]
    assert caption_templates("shape", objects) == ["a large blue {}.", "a large red {}.", "a small blue {}.",
                                                   "a small red {}."]
    assert caption_templates("color", objects)[0].format("green") == "a large green circle."
    with_words = caption_templates("shape", objects, ["cat", "dog", "cat"])
    assert len(with_words) == 4 * 3 and with_words[:4] == caption_templates("shape", objects)
    assert with_words[4:6] == ["a large blue {}. the word cat is written.", "a large blue {}. the word dog is written."]
    braced = caption_templates("shape", objects[:1], ["{x}"])[1]
    assert braced.format("circle") == "a small red circle. the word {x} is written."  # a word is text, not a slot


def test_word_templates_spell_the_captions_of_images_with_a_word():
    """A prompt filled with a scene's own attributes and word is exactly its caption, as training saw it."""
    import random

    from lightning_vlm.data.synthetic.language import caption
    from lightning_vlm.data.synthetic.scenes import sample_scene
    from lightning_vlm.eval.zero_shot import caption_templates

    rng = random.Random(0)
    scenes = [scene for scene in (sample_scene(rng) for _ in range(200)) if scene.word and len(scene.objects) == 1]
    assert scenes
    for scene in scenes[:5]:
        obj = vars(scene.objects[0])
        templates = caption_templates("shape", [obj], [scene.word])
        assert caption(scene) in [template.format(obj["shape"]) for template in templates]


def test_grounding_counts_boxes_with_iou_at_least_half():
    from lightning_vlm.eval.grounding import box_iou, grounding_accuracy, tokens_to_box

    assert tokens_to_box("<loc_02> <loc_03><loc_05><loc_07> trailing") == (2, 3, 6, 8)
    assert tokens_to_box("<loc_02><loc_03>") is None and tokens_to_box("<loc_05><loc_03><loc_02><loc_07>") is None
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
    target = "<loc_00><loc_00><loc_03><loc_03>"  # 4 x 4 bins
    generated = ["<loc_00><loc_00><loc_03><loc_03>",  # exact: IoU 1
                 "<loc_00><loc_00><loc_03><loc_02>",  # 16 vs 12 cells: IoU 0.75
                 "<loc_02><loc_02><loc_05><loc_05>",  # 4 of 28 cells: IoU 1/7
                 "a red circle"]  # no box
    assert grounding_accuracy(generated, [target] * 4) == 0.5


def test_generation_evaluator_reports_grounding():
    from lightning_vlm.eval.generation import GenerationEvaluator

    evaluator = GenerationEvaluator(lambda batch: ["<loc_00><loc_00><loc_03><loc_03>", "nothing"])
    metas = [{"task": "grounding", "target": "<loc_00><loc_00><loc_03><loc_03>"}] * 2
    evaluator.update(None, {"meta": metas})
    assert evaluator.compute(None, "val") == {"val/grounding_iou50": 0.5}

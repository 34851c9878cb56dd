"""What a LoRA learned and what it broke, read by the toy-world scorer.

Shared by ``python -m lib_lora demo`` and ``benchmarks/concept.py``.  Any kohya-format file works
(ours or another trainer's): files are applied through ``Runtime`` exactly as ``<lora:name:w>`` in
a WebUI prompt, so the numbers measure the file, not the trainer that wrote it.

Every measurement but ``shape_fit`` (per-prompt IoUs) is a fraction of prompts (drawn by
``world.generate`` with a fixed seed; image i of a call uses noise seed ``seed + i``, so two
settings see the same noise image by image).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

from .world import BASE_WORLD, Concept, Scene, generate


def _tokens(loras: Iterable[tuple[str, float]]) -> str:
    return "".join(f" <lora:{name}:{w:g}>" for name, w in loras if w)


class LoraRenderer:
    """Generate through the Runtime, exactly as a prompt with ``<lora:...>`` tokens would."""

    def __init__(self, checkpoint, lora_dirs: Sequence[Path], steps: int = 20, cfg: float = 5.0,
                 batch: int = 32):
        from ..library import Library
        from ..modelmap import ModelMap
        from ..runtime import Runtime

        self.ck, self.steps, self.cfg, self.batch = checkpoint, steps, cfg, batch
        self.rt = Runtime(Library([Path(d) for d in lora_dirs]))
        self.rt.set_model(ModelMap.build(checkpoint.family, checkpoint.unet, checkpoint.text_encoders))
        self.messages: list[str] = []

    def __call__(self, prompts: list[str], seed: int | list[int]) -> list[Image.Image]:
        """Image i uses noise ``seed + i`` (an int) or ``seed[i]`` (a list)."""
        from ..hosts.cli.attention import sdpa_attention
        from ..params import parse_prompt

        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        images: list[Image.Image | None] = [None] * len(prompts)
        groups: dict[str, list] = {}   # one prompt may carry its own LoRA tokens: apply once per set
        for i, p in enumerate(prompts):
            clean, requests = parse_prompt(p)
            key = repr([(r.name, r.te, r.unet, r.dyn) for r in requests])
            groups.setdefault(key, []).append((" ".join(clean.split()), requests, i))
        for items in groups.values():
            res = self.rt.activate(items[0][1])
            self.messages += res.messages
            try:
                with sdpa_attention(self.ck.unet), bundled_vectors(self.ck, res.embeddings):
                    for j in range(0, len(items), self.batch):
                        chunk = items[j:j + self.batch]
                        imgs = self._sample([c for c, _, _ in chunk], [seeds[i] for _, _, i in chunk])
                        for (_, _, i), im in zip(chunk, imgs):
                            images[i] = im
            finally:
                self.rt.activate([])
        return images  # type: ignore[return-value]

    def _sample(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        from ..hosts.cli.sampling import sample

        kw = dict(steps=self.steps, cfg=self.cfg, width=64, height=64)
        if seeds == list(range(seeds[0], seeds[0] + len(seeds))):   # sample() gives image i seed + i
            return sample(self.ck, prompts, seed=seeds[0], **kw)
        return [sample(self.ck, [p], seed=s, **kw)[0] for p, s in zip(prompts, seeds)]

    def refresh(self) -> None:
        """Re-scan the LoRA folders (files written after construction)."""
        self.rt.library.refresh()

    def close(self) -> None:
        self.rt.set_model(None)


@contextmanager
def bundled_vectors(checkpoint: Any, found: list) -> Iterator[None]:
    """The active LoRAs' bundled embeddings (``(lora, BundledEmbedding)`` pairs) in place of their names while
    the block renders, as ``render`` and the WebUI use them (``Checkpoint.embeddings_for``)."""
    checkpoint.embeddings, _ = checkpoint.embeddings_for(found)
    try:
        yield
    finally:
        checkpoint.embeddings = []


def rate(images: list[Image.Image], scenes: list[Scene], check: Callable[[Any, Scene], bool]) -> float:
    from .scorer import score

    return round(sum(check(score(im), sc) for im, sc in zip(images, scenes)) / max(len(images), 1), 4)


def shows(concept: Concept) -> Callable[[Any, Scene], bool]:
    """Scorer check: the image shows the concept's held-out value (e.g. shape == "star")."""
    return lambda sc, scene: getattr(sc, concept.attribute) == concept.value


def shape_and_colour(sc, scene: Scene) -> bool:
    return sc.shape == scene.shape and sc.colour == scene.colour


def concept_prompts(concept: Concept, n: int, seed: int) -> tuple[list[str], list[Scene]]:
    """Held-out prompts in the concept's world, with its trigger word: "a red zkx on a dotted background"."""
    got = generate(n, seed, concept.world, concept.words)
    return [c for _, c, _ in got], [sc for _, _, sc in got]


def acquisition(render: LoraRenderer, lora: str, concept: Concept, weights: Iterable[float] = (0, 0.5, 1),
                n: int = 30, seed: int = 100) -> dict[str, float]:
    """Weight -> fraction of trigger prompts whose image shows the concept."""
    prompts, scenes = concept_prompts(concept, n, seed)
    return {f"{w:g}": rate(render([p + _tokens([(lora, w)]) for p in prompts], seed + 1000), scenes, shows(concept))
            for w in weights}


def shape_fit(render: LoraRenderer, lora: str, concept: Concept, weights: Iterable[float] = (0, 1),
              n: int = 40, seed: int = 100) -> dict[str, list[float]]:
    """Weight -> per-prompt IoU of the drawn object with the concept's shape (0 where none is drawn).

    A continuous, paired companion to ``acquisition``: image i sees the same noise at every weight,
    so a short run that moves every object towards the new shape shows up long before the scorer's
    verdict flips on enough images to tell apart from chance."""
    from .scorer import score

    if concept.attribute != "shape":
        raise ValueError(f"shape_fit measures shape concepts; {concept.name} is a {concept.attribute}")
    prompts, _ = concept_prompts(concept, n, seed)
    out = {}
    for w in weights:
        scored = [score(im) for im in render([p + _tokens([(lora, w)]) for p in prompts], seed + 1000)]
        out[f"{w:g}"] = [s.details["ious"][concept.value] if s.shape is not None else 0.0 for s in scored]
    return out


def base_accuracy(render: LoraRenderer, loras: Iterable[tuple[str, float]] = (), n: int = 30,
                  seed: int = 102) -> float:
    """Fraction of BASE_WORLD prompts drawn in the prompted shape and colour, with ``loras`` applied."""
    got = generate(n, seed, BASE_WORLD)
    images = render([c + _tokens(loras) for _, c, _ in got], seed + 1000)
    return rate(images, [sc for _, _, sc in got], shape_and_colour)


def composition(render: LoraRenderer, first: tuple[str, Concept], second: tuple[str, Concept], n: int = 30,
                seed: int = 103) -> float:
    """Both LoRAs at weight 1, both triggers in the prompt: fraction of images showing both concepts.

    Scenes come from the first concept's world with the second's attribute forced to its value, then
    both held-out words are replaced by their triggers."""
    (l1, c1), (l2, c2) = first, second
    force = {f"{c2.attribute}s": (c2.value,)}
    words = {**c1.words, **c2.words}
    got = generate(n, seed, c1.world, words, **force)
    images = render([c + _tokens([(l1, 1), (l2, 1)]) for _, c, _ in got], seed + 1000)
    both = lambda sc, scene: shows(c1)(sc, scene) and shows(c2)(sc, scene)  # noqa: E731
    return rate(images, [sc for _, _, sc in got], both)

"""Toy world: synthetic captioned images plus a scorer, for measuring LoRA training."""
from .world import (
    BACKGROUNDS, BASE_WORLD, CONCEPTS, FULL_WORLD, PALETTE, SHAPES, SIDE, Concept, Scene, World, caption,
    generate, render, sample_scene, write_kohya_dataset,
)
from .scorer import MILD, STRONG, Degrade, Scoring, accuracy, degrade, score

__all__ = [
    "BACKGROUNDS", "BASE_WORLD", "MILD", "STRONG", "CONCEPTS", "FULL_WORLD", "PALETTE", "SHAPES", "SIDE", "Concept", "Degrade", "Scene",
    "Scoring", "World", "accuracy", "caption", "degrade", "generate", "render", "sample_scene", "score",
    "write_kohya_dataset",
]

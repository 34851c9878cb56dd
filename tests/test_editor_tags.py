"""The notes editor's training tags (lib_lora/editor_tags.py), against hand-computed lists, texts and
probabilities.  Reference: the built-in Lora's editor (WebUI v1.10.1): tags summed over folders, the words
of sentence captions, a clicked tag toggled in the activation text, each tag drawn with probability
count / the highest count."""
from __future__ import annotations

import json
import random

from lib_lora.editor_tags import editor_tags, random_prompt, toggle_tag


def meta(folders: dict) -> dict:
    return {"ss_tag_frequency": json.dumps(folders)}


def test_tags_are_summed_over_folders_most_frequent_first():
    assert editor_tags(meta({"5_a": {"cat": 3, " dog ": 1}, "5_b": {"cat": 2}})) == [("cat", 5), ("dog", 1)]
    assert editor_tags({}) == [] and editor_tags(meta({})) == []


def test_sentence_captions_are_listed_by_their_words():
    # average length 25 >= 16: words of 3+ characters, each with the count of the captions it is in
    tags = editor_tags(meta({"1_x": {"a red cube on a wooden table": 2, "a blue ball on grass": 1}}))
    assert tags == [("cube", 2), ("red", 2), ("table", 2), ("wooden", 2), ("ball", 1), ("blue", 1), ("grass", 1)]
    # short tags stay whole, even with spaces in them
    assert editor_tags(meta({"1_x": {"red cube": 2, "on grass": 1}})) == [("red cube", 2), ("on grass", 1)]


def test_a_clicked_tag_is_added_or_taken_out():
    assert toggle_tag("", "cat") == "cat"
    assert toggle_tag("cat", "dog") == "cat, dog"
    assert toggle_tag("cat,", "dog") == "cat, dog"
    assert toggle_tag("cat, dog", "cat") == "dog"
    assert toggle_tag("cat,  dog ,, owl", "dog") == "cat, owl"
    assert toggle_tag("cats", "cat") == "cats, cat"  # whole parts only
    text = "style, cat"
    assert toggle_tag(toggle_tag(text, "dog"), "dog") == text


class Draws:
    """A random.Random whose random() returns the given draws in turn."""

    def __init__(self, *draws: float):
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_random_prompt_draws_each_tag_by_its_frequency():
    tags = [("a", 4), ("b(c)", 2), ("d", 1)]
    assert random_prompt(tags, Draws(0.99, 0.5, 0.3)) == "a"  # 3.96 < 4; 2 is not < 2; 1.2 is not < 1
    assert random_prompt(tags, Draws(0.0, 0.49, 0.24)) == "a, b\\(c\\), d"  # escaped, alphabetical
    assert random_prompt([], Draws()) == ""
    rng = random.Random(0)
    n = 4000
    picks = [random_prompt(tags, rng).split(", ") for _ in range(n)]
    assert all("a" in p for p in picks)
    for tag, p in (("b\\(c\\)", 0.5), ("d", 0.25)):
        share = sum(tag in x for x in picks) / n
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5, (tag, share)

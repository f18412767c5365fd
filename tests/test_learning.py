"""Training learns: a short LoRA run on sdlora-mini teaches the trigger word `sks` the star glyph, by the judge,
and leaves the unrelated digit prompts within a stated margin of the base model.

The judge (sdlora/mini/judge.py) is a classifier fitted on real digit scans, not the model. A trainer that
trains the wrong thing fails here: SDLORA_LEARNING_TEST_BREAK takes `key=value` config overrides (comma
separated) to show it, e.g. `SDLORA_LEARNING_TEST_BREAK=model.prediction_type=v_prediction` (the wrong
training target) fails the concept assertion (docs/mini.md records the run).
"""

import os

import pytest
import yaml

from sdlora.util.allocator import keep_freed_cpu_memory
from sdlora.config import validate
from sdlora.commands.demo import DEMO_STEPS, demo_recipe, evaluate_adapter, make_demo_data
from sdlora.mini import MINI_MODEL_DIR
from sdlora.mini.judge import Judge
from sdlora.training.loop import train

STEPS = DEMO_STEPS
CONCEPT_LEARNED = 0.6  # of the 18 trigger samples (every colour pair), the star at least this often
BASE_CONCEPT_AT_MOST = 0.1  # the base model does not draw it
# The 30 unrelated digit prompts (3 per digit): digit accuracy at most 25 points below the base (measured 7 below:
# 2 of 30 samples; one sample is 3.3 points; seeds 1 and 2 of the recipe 13 and 10 below), colours at most 15 points
# below, and at most 10% of them drawn as the star (measured 0%; seeds 1 and 2: 7% and 3%; the same LoRA trained on
# the stars alone turns 73% of them into stars, docs/quality.md). Concept measured 83% (seeds 1 and 2: 78%, 67%).
DIGIT_MARGIN = 0.25
COLOUR_MARGIN = 0.15
BLEED_AT_MOST = 0.1


def _broken(cfg: dict) -> dict:
    for item in filter(None, os.environ.get("SDLORA_LEARNING_TEST_BREAK", "").split(",")):
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = cfg
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    return cfg


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    keep_freed_cpu_memory()
    root = tmp_path_factory.mktemp("learn")
    make_demo_data(root / "data")
    cfg = _broken(demo_recipe(root, STEPS))
    cfg["log"] = {"tracker": "none"}
    result = train(validate(cfg), log=lambda *a: None)
    judged, _ = evaluate_adapter(MINI_MODEL_DIR, result.adapter_path, Judge.fit(), unrelated_per_digit=3)
    print(judged)
    return judged


def test_the_trigger_word_draws_the_new_concept_after_training_and_not_before(scores):
    assert scores["base"]["concept"] <= BASE_CONCEPT_AT_MOST, scores
    assert scores["adapted"]["concept"] >= CONCEPT_LEARNED, scores


def test_unrelated_prompts_stay_within_the_margin_of_the_base(scores):
    base, adapted = scores["base"], scores["adapted"]
    assert adapted["digit"] >= base["digit"] - DIGIT_MARGIN, scores
    assert adapted["colour"] >= base["colour"] - COLOUR_MARGIN, scores
    assert adapted["unrelated_star"] <= BLEED_AT_MOST, scores

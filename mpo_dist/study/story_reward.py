"""A known ("true") reward for stories, and Bradley-Terry preference labels drawn from it.

The reward/KL frontier study (tools/study_frontier.py) needs a task whose true reward is known, so
that every trained policy can be scored on its own samples (tools/evaluate.py
`--reward mpo_dist.study.story_reward:reward`). The task: continue a story opening with the stories260K
model (a llama2.c TinyStories model); the reward is the story's net sentiment.

    reward(prompt, response) = SCALE * (positive words - negative words) / words of the response

Words are the lower-cased runs of letters and apostrophes of the response (the prompt is ignored);
POSITIVE and NEGATIVE are small lexicons of the emotion words these stories use ("happy", "smiled",
"friends", ...; "sad", "scared", "cried", ...). An empty response scores 0.

Why this reward:

- It varies between samples of one prompt, so a pair of two reference samples carries signal: on
  stories260K continuations of 64 tokens (about 29 words) of six story openings, 100 samples each,
  the within-prompt standard deviation of the net rate was 0.032-0.038 per word, and two samples
  differed in ~80% of pairs. SCALE = 25 (net sentiment words per 25 words, about one response)
  makes the typical within-prompt difference |r(y1) - r(y2)| about 1, so a Bradley-Terry
  preference sigmoid(r1 - r2) is informative but noisy, like human labels. Measured on the study's
  pairs (400 openings, 8 samples each, tools/label_story_pairs.py's report): reward mean 0.38,
  within-prompt standard deviation 0.85, mean |r(y1) - r(y2)| 0.96 with 19% of pairs tied, a mean
  Bradley-Terry probability of 0.62 for the label drawn, and chosen the better one in 75% of the
  pairs that are not tied.
- A policy can move it smoothly: these are frequent words, and changing their probability a little
  changes the expected reward a little, with no threshold to cross. It can also be over-optimised
  (a story of nothing but "happy"), which is what the KL regulariser is there to prevent.
- It is a rate, not a count: it does not reward longer responses (responses in the study have a
  fixed token budget anyway, and the model rarely stops before it).
- It is a documented pure function of the text, cheap (microseconds), with no model of its own.

Preference labels (`preference_probability`, `sample_preference`): the Bradley-Terry model on the
true reward, P(a preferred to b) = sigmoid(r(a) - r(b)). A sampled label is drawn from a uniform
that depends only on (seed, key), so a label does not depend on the order in which pairs are made.
"""

from __future__ import annotations

import hashlib
import math
import re

SCALE = 25.0

POSITIVE = frozenset("""
    happy happily happier glad joy joyful love loved loves lovely fun funny excited smile smiled smiles
    smiling laugh laughed laughing nice good great kind friend friends beautiful pretty yummy proud hug
    hugged enjoy enjoyed best wonderful amazing safe thank thanks cheer cheered brave
""".split())

NEGATIVE = frozenset("""
    sad sadly unhappy scared scary afraid frightened cry cried cries crying tears angry mad upset hurt
    pain lost bad broke broken sorry worried worry tired dirty mean ouch hate hated naughty alone sick
    lonely fear bored grumpy danger dangerous
""".split())

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """The words the reward counts: lower-cased runs of letters and apostrophes."""
    return _WORD.findall(text.lower())


def sentiment_rate(text: str) -> float:
    """(positive words - negative words) / words of `text`; 0 for text without words."""
    found = words(text)
    if not found:
        return 0.0
    net = sum(word in POSITIVE for word in found) - sum(word in NEGATIVE for word in found)
    return net / len(found)


def reward(prompt_text: str, response_text: str) -> float:
    """The true reward of a story continuation: SCALE x its net sentiment rate (the prompt is ignored).

    For tools/evaluate.py: `--reward mpo_dist.study.story_reward:reward`."""
    del prompt_text  # the opening is given; only what the policy wrote is rewarded
    return SCALE * sentiment_rate(response_text)


def preference_probability(reward_a: float, reward_b: float) -> float:
    """Bradley-Terry: the probability that a response with reward_a is preferred to one with reward_b."""
    difference = reward_a - reward_b
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    expo = math.exp(difference)
    return expo / (1.0 + expo)


def label_uniform(seed: int, key: str) -> float:
    """A uniform in [0, 1) that depends only on (seed, key): stable across runs, machines and orders."""
    digest = hashlib.sha256(f"mpo_dist.study.story_reward.v1/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sample_preference(reward_a: float, reward_b: float, *, seed: int, key: str) -> bool:
    """A Bradley-Terry label: True when a is preferred, with probability sigmoid(reward_a - reward_b)."""
    return label_uniform(seed, key) < preference_probability(reward_a, reward_b)

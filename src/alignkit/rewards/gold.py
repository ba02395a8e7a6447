"""Gold sentiment reward: VADER compound score (the "true" reward for the sentiment quickstart).

VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
Text", ICWSM) sums lexicon valences s_i of the words in a text, adjusted by rules (negation, "but",
intensifiers, capitals, "!"), and squashes the sum x into [-1, 1]:

    compound = x / sqrt(x^2 + alpha),  alpha = 15

e.g. "good" has valence 1.9, so compound("good") = 1.9 / sqrt(1.9^2 + 15) = 0.4404.
The lexicon ships inside the ``vaderSentiment`` package; no download.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    """The SentimentIntensityAnalyzer, built once per process (it parses the lexicon file)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_scores(texts: list[str]) -> list[float]:
    """VADER compound score in [-1, 1] for each text (positive > 0, negative < 0, empty -> 0)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]

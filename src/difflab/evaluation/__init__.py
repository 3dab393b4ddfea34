"""Evaluation of samples: a reference classifier (the "judge") trained once per dataset and
cached, and the metrics computed with it: conditional accuracy, the Fréchet distance on the
judge's features beside the real-vs-real floor, and within-class diversity.
"""

from difflab.evaluation.judge import Judge, JudgeNet, get_judge, train_judge
from difflab.evaluation.metrics import (
    conditional_accuracy,
    diversity,
    features_of,
    frechet_distance,
    real_floor,
)

__all__ = [
    "Judge",
    "JudgeNet",
    "conditional_accuracy",
    "diversity",
    "features_of",
    "frechet_distance",
    "get_judge",
    "real_floor",
    "train_judge",
]

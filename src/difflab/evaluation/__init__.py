"""Evaluation of samples: a reference classifier (the "judge") trained once per dataset and
cached, and the metrics computed with it: conditional accuracy, the Fréchet distance and KID
on the judge's features beside the real-vs-real floor, and within-class diversity. The
Fréchet distance and KID have one implementation (:mod:`.distances`) for every feature
extractor, the judge's and Inception-v3's alike. :mod:`.stats` says how sure each number is
(bootstrap intervals, paired comparisons, sample sizes); :mod:`.memorisation` counts the
samples that are near-copies of training images.
"""

from difflab.evaluation.distances import frechet_distance, kid
from difflab.evaluation.judge import Judge, JudgeNet, get_judge, train_judge
from difflab.evaluation.metrics import conditional_accuracy, diversity, features_of, real_floor

__all__ = [
    "Judge",
    "JudgeNet",
    "conditional_accuracy",
    "diversity",
    "features_of",
    "frechet_distance",
    "get_judge",
    "kid",
    "real_floor",
    "train_judge",
]

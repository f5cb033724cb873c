"""`evaluate` of a class-conditional model (``model.num_classes = K``): what its classes buy (issue 26).

Beside the scores of the samples asked for (by default its null class: the unconditional scores,
keyed as an unconditional model's, so the two compare), `ddpm-pipe evaluate` of a class-conditional
model measures ``num`` samples asked for every class in turn (``--classes balanced``), with the
guidance asked for (``--guidance``, default the model's ``sample.guidance``):

1. Conditional accuracy (:func:`ddpm.features.conditional_accuracy`): the share the digits
   classifier puts in the class each sample asked for, overall (``cond_accuracy``, what `promote
   --metric cond_accuracy` gates on) and per class (``class<c>/cond_accuracy``), with jackknife
   standard errors. Its ceiling is the classifier's accuracy on the held-out real digits with their
   true labels (``feature_net_test_accuracy``).
2. The yardstick per class: ``class<c>/kid``, the samples asked for class c against the held-out
   digits of class c.
3. Within-class diversity: ``class_spread`` (:func:`ddpm.features.class_spread_score`; 1 is the
   real digits' spread).
4. The guidance sweep (w in :data:`SWEEP`, the same seeds and classes at every w): conditional
   accuracy, diversity (recall and class spread) and precision and KID against the held-out split,
   logged as ``guidance-<w>/<metric>``, and as the table ``evaluation/guidance_sweep.{json,md}``
   that ``scripts/plots.py --guidance-sweep`` draws.

This file scores; ``pipelines/registry/evaluate.py`` samples, keys and logs. Digits only: the
classifier is the digits feature network (:mod:`ddpm.features`); other data get a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ddpm import features, metrics

SWEEP = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)  # guidance weights of the sweep: unconditional, conditional, guided
SWEEP_SCORES = ("cond_accuracy", "class_spread", "recall", "precision", "kid")  # its columns, in order
COLUMNS = {"cond_accuracy": "conditional accuracy", "class_spread": "class spread (1: real)",
           "recall": "recall", "precision": "precision", "kid": "KID"}

Value = tuple[float, float]  # (value, jackknife standard error)


@dataclass
class ClassScores:
    """One set of class-conditional samples, scored: ``overall`` ``{score: (value, se)}`` (the
    :data:`SWEEP_SCORES`) and ``per_class`` ``{c: {"cond_accuracy": ..., "kid": ..., "num": n}}``."""

    overall: dict[str, Value]
    per_class: dict[int, dict[str, Any]]


class ClassYardstick:
    """The digits classifier's scores of class-conditional samples against held-out digits with
    their true labels (``test``, ``test_labels``); ``train`` for the yardstick's copy rate.

    Built once per evaluation: the whole held-out split's :class:`ddpm.features.DigitsYardstick`
    and one per class (its held-out digits of that class).
    """

    def __init__(self, net: features.DigitsFeatureNet, test: torch.Tensor, test_labels: torch.Tensor,
                 train: torch.Tensor, train_labels: torch.Tensor, k: int) -> None:
        self.net, self.k = net, k
        self.test, self.test_labels = test, torch.as_tensor(test_labels, dtype=torch.long)
        train_labels = torch.as_tensor(train_labels, dtype=torch.long)
        self.whole = features.DigitsYardstick(net, test, train, k=k)
        self.by_class = {c: features.DigitsYardstick(net, test[self.test_labels == c], train[train_labels == c], k=k)
                         for c in range(features.NUM_CLASSES) if int((self.test_labels == c).sum()) > k + 1}

    def scores(self, samples: torch.Tensor, labels: torch.Tensor, per_class: bool = True) -> ClassScores:
        """Score ``[N x 1 x 8 x 8]`` samples in [-1, 1], sample j asked for class ``labels[j]``."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        acc = features.conditional_accuracy(self.net, samples, labels)
        overall = {"cond_accuracy": (acc["cond_accuracy"], acc["cond_accuracy_se"]),
                   "class_spread": metrics.score_value(
                       features.class_spread_score(self.net, samples, labels, self.test, self.test_labels))}
        whole = self.whole.scores(samples)
        overall.update({name: metrics.score_value(whole[name]) for name in ("recall", "precision", "kid")})
        classes: dict[int, dict[str, Any]] = {}
        for c in sorted(set(labels.tolist())) if per_class else ():
            mine = labels == c
            classes[c] = {"num": int(mine.sum()),
                          "cond_accuracy": (acc[f"cond_accuracy_class{c}"], acc[f"cond_accuracy_class{c}_se"])}
            if c in self.by_class and int(mine.sum()) > self.k + 1:  # k-NN and the jackknife need k + 2
                classes[c]["kid"] = metrics.score_value(self.by_class[c].scores(samples[mine])["kid"])
        return ClassScores(overall, classes)

    def reference(self, c: int) -> int:
        """How many held-out digits class ``c``'s yardstick compares with."""
        return len(self.by_class[c].test)


def _cell(value: Value) -> str:
    v, se = value
    return f"{v:.4g}" + (f" ± {se:.2g}" if se == se else "")


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """The guidance sweep as markdown: one row per w (value ± one standard error)."""
    head = ["w", *(COLUMNS[n] for n in SWEEP_SCORES), "s/sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['guidance']:g}", *(_cell((r["scores"][n], r["se"][n])) for n in SWEEP_SCORES),
                 f"{r['sec_per_sample']:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines.append(f"\n{rows[0]['num']} samples per w, every class in turn, the same seeds at every w; "
                     "w = 0 is the null class (unconditional), 1 plain conditional; recall, precision and KID "
                     "against the held-out digits; ± is one standard error (jackknife)")
    return "\n".join(lines)


__all__ = ["COLUMNS", "SWEEP", "SWEEP_SCORES", "ClassScores", "ClassYardstick", "sweep_markdown"]

"""One owner for class-balanced sampling: ``igconda.data.schema.class_balanced_weights``, built on
the ratio the training job's oversampling and the classifiers' loss weights use
(``healthy_per_unhealthy``). A benchmark that writes the weights out by hand fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from igconda.data.schema import HEALTHY, UNHEALTHY, class_balanced_weights

ROOT = Path(__file__).resolve().parents[1]


def test_each_class_is_drawn_with_probability_one_half():
    labels = np.array([HEALTHY] * 9 + [UNHEALTHY] * 3, np.int8)
    weights = class_balanced_weights(labels)
    assert np.isclose(weights.sum(), 1.0)
    assert np.isclose(weights[labels == HEALTHY].sum(), 0.5)
    assert np.isclose(weights[labels == UNHEALTHY].sum(), 0.5)
    # The hand-written form the benchmarks used before: 0.5 / n_class per slice.
    expected = np.where(labels == HEALTHY, 0.5 / 9, 0.5 / 3)
    assert np.allclose(weights, expected / expected.sum())


def test_one_class_only_gives_uniform_weights():
    for labels in (np.full(4, HEALTHY), np.full(4, UNHEALTHY)):
        assert np.allclose(class_balanced_weights(labels), 0.25)


def _hand_written(path: Path) -> list[int]:
    """Lines dividing 0.5 by a class count (``0.5 / max(1, n)``): the weights by hand."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.left, ast.Constant) and node.left.value == 0.5]


def test_no_benchmark_writes_the_weights_by_hand():
    found = {p.name: lines for p in sorted((ROOT / "benchmarks").glob("*.py"))
             if (lines := _hand_written(p))}
    assert found == {}

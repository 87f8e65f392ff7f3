"""The detectors against the labeled corpora (tests/pii_corpus, tests/pii_holdout): precision >= 0.98
and recall >= 0.95 for every entity type, the targets `tests/bench/pii_quality.py` reports on."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.pii.detect import ENTITY_TYPES, default_detector
from tests.bench.pii_quality import Result, evaluate, load_corpus

TESTS = Path(__file__).resolve().parents[1]
# Two corpora written independently of each other and of the detectors (see their READMEs).
CORPORA = ("pii_corpus", "pii_holdout")


@pytest.fixture(scope="module", params=CORPORA)
def result(request: pytest.FixtureRequest) -> Result:
    return evaluate(load_corpus(TESTS / request.param), default_detector(), ENTITY_TYPES, keep=5)


@pytest.mark.parametrize("entity", ENTITY_TYPES)
def test_precision_and_recall_meet_the_targets(result: Result, entity: str) -> None:
    st = result.stats[entity]
    assert st.gold >= 290
    missed = [e.doc.text[:120] for e in st.fn_examples]
    wrong = [e.doc.text[:120] for e in st.fp_examples]
    assert st.precision >= 0.98, f"{entity} precision {st.precision:.4f}; false positives like {wrong}"
    assert st.recall >= 0.95, f"{entity} recall {st.recall:.4f}; missed like {missed}"

"""The detectors against the labeled corpus (tests/pii_corpus): precision >= 0.98 and recall >= 0.95
for every entity type, the targets `tests/bench/pii_quality.py` reports on."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.pii.detect import ENTITY_TYPES, default_detector
from tests.bench.pii_quality import Result, evaluate, load_corpus

CORPUS = Path(__file__).resolve().parents[1] / "pii_corpus"


@pytest.fixture(scope="module")
def result() -> Result:
    return evaluate(load_corpus(CORPUS), default_detector(), ENTITY_TYPES, keep=5)


@pytest.mark.parametrize("entity", ENTITY_TYPES)
def test_precision_and_recall_meet_the_targets(result: Result, entity: str) -> None:
    st = result.stats[entity]
    assert st.gold >= 300
    missed = [e.doc.text[:120] for e in st.fn_examples]
    wrong = [e.doc.text[:120] for e in st.fp_examples]
    assert st.precision >= 0.98, f"{entity} precision {st.precision:.4f}; false positives like {wrong}"
    assert st.recall >= 0.95, f"{entity} recall {st.recall:.4f}; missed like {missed}"

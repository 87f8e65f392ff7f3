"""Quality of the PII/secret detector on the labeled corpus in tests/pii_corpus/ (README.md there).

Every text of every corpus file (positives of each type and the hard negatives) goes through
`detector.find(text)`; predictions are matched to the gold entities per type. A prediction is a true
positive when a gold entity of the same type overlaps it with intersection-over-union >= 0.5; pairs
are taken best IoU first and each gold entity and each prediction is used at most once. Unmatched
predictions are false positives, unmatched gold entities false negatives. Per type it prints gold
count, TP, FP, FN, exact (TPs with identical boundaries), precision, recall and F1, then the first
false negatives and false positives with their context, and the throughput of `find` in MB/s
(UTF-8 bytes of text scanned per second of time spent inside `find`).

    .venv/bin/python tests/bench/pii_quality.py                      # all types
    .venv/bin/python tests/bench/pii_quality.py --type PHONE --show 30
    .venv/bin/python tests/bench/pii_quality.py --json /tmp/pii.json
    .venv/bin/python tests/bench/pii_quality.py --detector /tmp/stub/pii_stub.py:make

--detector names a zero-argument factory as module:function (a dotted module importable from the
repository root, or a path to a .py file); the default is extproc.pii.detect:default_detector. The
object it returns needs `find(text) -> list` of objects with `.type` (str), `.start`, `.end` (int,
Python str indices). Predictions of a type the corpus does not know are listed, never counted.

Exit status: 0 when every evaluated type reaches the targets (precision >= 0.98 and recall >= 0.95
unless --min-precision / --min-recall say otherwise), 1 when one does not, 2 on a usage error. A type
without predictions has precision 1.0 (and fails on recall). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "pii_corpus"
TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET")
DEFAULT_DETECTOR = "extproc.pii.detect:default_detector"
MIN_IOU = 0.5


class Prediction(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


class Detector(Protocol):
    def find(self, text: str) -> Sequence[Prediction]: ...


@dataclass(frozen=True)
class Span:
    type: str
    start: int
    end: int


@dataclass
class Doc:
    id: str
    file: str
    kind: str
    text: str
    gold: list[Span]


@dataclass
class Example:
    doc: Doc
    span: Span
    note: str = ""


@dataclass
class TypeStats:
    gold: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    exact: int = 0
    fn_examples: list[Example] = field(default_factory=list)
    fp_examples: list[Example] = field(default_factory=list)
    fn_by_kind: Counter[str] = field(default_factory=Counter)
    fp_by_kind: Counter[str] = field(default_factory=Counter)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def load_corpus(folder: Path) -> list[Doc]:
    docs: list[Doc] = []
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no *.jsonl files in {folder}")
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                gold = [Span(e["type"], int(e["start"]), int(e["end"])) for e in obj["entities"]]
                docs.append(Doc(str(obj["id"]), path.name, str(obj.get("kind", "")), str(obj["text"]), gold))
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path.name}:{n}: bad corpus line: {exc}") from exc
    return docs


def load_detector(spec: str) -> Detector:
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise SystemExit(f"--detector must be module:function, got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise SystemExit(f"cannot load {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)
    else:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        module = importlib.import_module(module_name)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise SystemExit(f"{module_name} has no callable {func_name}")
    return cast(Detector, factory())


def iou(a: Span, b: Span) -> float:
    inter = min(a.end, b.end) - max(a.start, b.start)
    if inter <= 0:
        return 0.0
    return inter / ((a.end - a.start) + (b.end - b.start) - inter)


def match(gold: list[Span], pred: list[Span]) -> tuple[list[tuple[Span, Span]], list[Span], list[Span]]:
    """Pairs (gold, prediction) of one type, best IoU first; then unmatched gold and predictions."""
    pairs = sorted(
        ((iou(g, p), gi, pi) for gi, g in enumerate(gold) for pi, p in enumerate(pred) if iou(g, p) >= MIN_IOU),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_g: set[int] = set()
    used_p: set[int] = set()
    matched: list[tuple[Span, Span]] = []
    for _, gi, pi in pairs:
        if gi in used_g or pi in used_p:
            continue
        used_g.add(gi)
        used_p.add(pi)
        matched.append((gold[gi], pred[pi]))
    return (
        matched,
        [g for i, g in enumerate(gold) if i not in used_g],
        [p for i, p in enumerate(pred) if i not in used_p],
    )


@dataclass
class Result:
    stats: dict[str, TypeStats]
    other: Counter[str]
    texts: int
    nbytes: int
    seconds: float
    bad_predictions: list[str]

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def evaluate(docs: list[Doc], detector: Detector, types: Sequence[str], keep: int, repeat: int = 1) -> Result:
    stats = {t: TypeStats() for t in types}
    other: Counter[str] = Counter()
    bad: list[str] = []
    seconds = 0.0
    nbytes = 0
    for doc in docs:
        raw: Sequence[Prediction] = ()
        for _ in range(repeat):
            t0 = time.perf_counter()
            raw = detector.find(doc.text)
            seconds += time.perf_counter() - t0
            nbytes += len(doc.text.encode("utf-8"))
        preds: list[Span] = []
        for p in raw:
            span = Span(str(p.type), int(p.start), int(p.end))
            if not 0 <= span.start < span.end <= len(doc.text):
                bad.append(f"{doc.id}: {span} outside the text (length {len(doc.text)})")
                continue
            if span.type not in TYPES:
                other[span.type] += 1
                continue
            preds.append(span)
        for t in types:
            st = stats[t]
            gold = [g for g in doc.gold if g.type == t]
            mine = [p for p in preds if p.type == t]
            matched, fns, fps = match(gold, mine)
            st.gold += len(gold)
            st.tp += len(matched)
            st.exact += sum(1 for g, p in matched if g == p)
            st.fn += len(fns)
            st.fp += len(fps)
            for g in fns:
                st.fn_by_kind[doc.kind] += 1
                if len(st.fn_examples) < keep:
                    near = [p for p in preds if iou(p, g) > 0]
                    note = (
                        "predicted: " + ", ".join(f"{p.type} {doc.text[p.start : p.end]!r}" for p in near)
                        if near
                        else ""
                    )
                    st.fn_examples.append(Example(doc, g, note[:160]))
            for p in fps:
                st.fp_by_kind[doc.kind] += 1
                if len(st.fp_examples) < keep:
                    near_g = [g for g in doc.gold if iou(p, g) > 0]
                    note = (
                        "gold: " + ", ".join(f"{g.type} {doc.text[g.start : g.end]!r}" for g in near_g)
                        if near_g
                        else ""
                    )
                    st.fp_examples.append(Example(doc, p, note[:160]))
    return Result(stats, other, len(docs), nbytes, seconds, bad)


def snippet(text: str, span: Span, width: int = 50, max_span: int = 70) -> str:
    value = text[span.start : span.end]
    if len(value) > max_span:
        value = value[: max_span - 20] + "…" + value[-19:]
    left = text[max(0, span.start - width) : span.start]
    right = text[span.end : span.end + width]
    left = ("…" if span.start > width else "") + left
    right = right + ("…" if span.end + width < len(text) else "")
    out = f"{left}⟦{value}⟧{right}"
    return out.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def report(res: Result, types: Sequence[str], show: int, min_p: float, min_r: float, spec: str, folder: Path) -> str:
    lines = [
        f"corpus {folder} · {res.texts} texts, {res.nbytes / 1e6:.2f} MB scanned · detector {spec}",
        "",
        f"{'type':<12} {'gold':>6} {'TP':>6} {'FP':>5} {'FN':>5} {'exact':>6} {'precision':>9} {'recall':>7} "
        f"{'F1':>6}  target",
    ]
    total = TypeStats()
    for t in types:
        st = res.stats[t]
        for name in ("gold", "tp", "fp", "fn", "exact"):
            setattr(total, name, getattr(total, name) + getattr(st, name))
        ok = passed(st, min_p, min_r)
        lines.append(
            f"{t:<12} {st.gold:>6} {st.tp:>6} {st.fp:>5} {st.fn:>5} {st.exact:>6} {st.precision:>9.4f} "
            f"{st.recall:>7.4f} {st.f1:>6.4f}  {'ok' if ok else 'FAIL'}"
        )
    if len(types) > 1:
        lines.append(
            f"{'all':<12} {total.gold:>6} {total.tp:>6} {total.fp:>5} {total.fn:>5} {total.exact:>6} "
            f"{total.precision:>9.4f} {total.recall:>7.4f} {total.f1:>6.4f}"
        )
    lines.append("")
    lines.append(f"throughput: {res.mb_per_s:.2f} MB/s ({res.nbytes / 1e6:.2f} MB in {res.seconds:.3f} s inside find)")
    if res.other:
        lines.append(
            "predictions of types outside the corpus (not counted): "
            + ", ".join(f"{k} {v}" for k, v in res.other.items())
        )
    if res.bad_predictions:
        lines.append(
            f"{len(res.bad_predictions)} predictions outside their text (ignored), first: {res.bad_predictions[0]}"
        )
    for t in types:
        st = res.stats[t]
        for label, examples, count, by_kind in (
            ("false negatives", st.fn_examples, st.fn, st.fn_by_kind),
            ("false positives", st.fp_examples, st.fp, st.fp_by_kind),
        ):
            if not count or not show:
                continue
            kinds = ", ".join(f"{k} {n}" for k, n in by_kind.most_common())
            lines.append("")
            lines.append(f"{t} {label}: {count} ({kinds}); first {min(show, len(examples))}:")
            for ex in examples[:show]:
                lines.append(f"  {ex.doc.id} [{ex.doc.kind}] {snippet(ex.doc.text, ex.span)}")
                if ex.note:
                    lines.append(f"      {ex.note}")
    return "\n".join(lines)


def passed(st: TypeStats, min_p: float, min_r: float) -> bool:
    return st.precision >= min_p and st.recall >= min_r


def to_json(res: Result, types: Sequence[str], min_p: float, min_r: float, spec: str, folder: Path) -> dict[str, Any]:
    return {
        "corpus": str(folder),
        "detector": spec,
        "texts": res.texts,
        "bytes": res.nbytes,
        "seconds_in_find": round(res.seconds, 6),
        "mb_per_s": round(res.mb_per_s, 3),
        "targets": {"precision": min_p, "recall": min_r, "min_iou": MIN_IOU},
        "passed": all(passed(res.stats[t], min_p, min_r) for t in types),
        "types": {
            t: {
                "gold": st.gold,
                "tp": st.tp,
                "fp": st.fp,
                "fn": st.fn,
                "exact": st.exact,
                "precision": round(st.precision, 6),
                "recall": round(st.recall, 6),
                "f1": round(st.f1, 6),
                "passed": passed(st, min_p, min_r),
                "fn_by_kind": dict(st.fn_by_kind),
                "fp_by_kind": dict(st.fp_by_kind),
                "fn_examples": [{"id": e.doc.id, "text": snippet(e.doc.text, e.span)} for e in st.fn_examples],
                "fp_examples": [{"id": e.doc.id, "text": snippet(e.doc.text, e.span)} for e in st.fp_examples],
            }
            for t, st in ((t, res.stats[t]) for t in types)
        },
        "other_types": dict(res.other),
        "bad_predictions": len(res.bad_predictions),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=DEFAULT_DETECTOR, help="factory as module:function or file.py:function")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="folder of *.jsonl files (default: tests/pii_corpus)")
    ap.add_argument("--type", dest="types", action="append", choices=TYPES, help="evaluate only this type (repeatable)")
    ap.add_argument("--show", type=int, default=10, help="false negatives / positives shown per type (default 10)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--min-precision", type=float, default=0.98)
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--repeat", type=int, default=1, help="scan each text this many times (steadier MB/s)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    types: list[str] = args.types or list(TYPES)
    try:
        docs = load_corpus(args.corpus)
        detector = load_detector(args.detector)
    except SystemExit as exc:
        print(f"pii_quality: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"pii_quality: cannot import the detector {args.detector}: {exc}", file=sys.stderr)
        return 2
    res = evaluate(docs, detector, types, keep=max(args.show, 10), repeat=max(1, args.repeat))
    print(report(res, types, args.show, args.min_precision, args.min_recall, args.detector, args.corpus))
    if args.json:
        figures = to_json(res, types, args.min_precision, args.min_recall, args.detector, args.corpus)
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    failing = [t for t in types if not passed(res.stats[t], args.min_precision, args.min_recall)]
    if failing:
        print(f"\nbelow target (precision >= {args.min_precision}, recall >= {args.min_recall}): {', '.join(failing)}")
        return 1
    print(f"\nall {len(types)} types at target (precision >= {args.min_precision}, recall >= {args.min_recall})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What PII redaction costs: scanning throughput, added latency per prompt size, added time per
streamed event with placeholders put back.

1. Scanning (in process, CPU time, best of 7): MB/s of text for English prose without entities, this
   README (prose, code, tables), the README with a corpus snippet holding entities every ~1 KB, and
   the labeled corpus itself (an entity every ~100 characters: the worst case).
2. Through the gateway (one stack: Envoy, the server, the mock provider): the same requests from a
   key whose tenant has no PII policy (B) and from one whose tenant has `action: restore` (P), in
   alternating wrk runs at 1 connection; prompts of 1 KB, 10 KB and 100 KB of mixed text with an
   entity every ~1 KB. Added p50 = P - B.
3. Streams with `responses: restore`: the mock echoes a prompt holding placeholders in 3-character
   events (x-mock-echo), so every event is read, parsed and rewritten; added time per event =
   (P - B) / events, and the server's CPU per event.

Run by hand (needs wrk): .venv/bin/python tests/bench/bench_pii.py [--duration 6] [--repeats 3]
Floors (issue: PII): scanning >= 20 MB/s; <= 1 ms added for a 10 KB prompt; <= 0.5 ms per streamed event.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from extproc.pii import detect  # noqa: E402
from tests.bench.bench_gateway import wrk  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def texts() -> dict[str, str]:
    random.seed(7)
    readme = (ROOT / "README.md").read_text()
    docs: list[dict[str, Any]] = []
    for name in sorted(glob.glob(str(ROOT / "tests/pii_corpus/*.jsonl"))):
        docs += [json.loads(line) for line in Path(name).read_text().splitlines()]
    corpus = [d["text"] for d in docs]
    positives = [d["text"] for d in docs if d["entities"]]
    mixed: list[str] = []
    for i in range(0, len(readme), 1000):
        mixed += [readme[i : i + 1000], random.choice(positives)]
    english = (
        "The quarterly report shows steady growth across all regions. Our team met with the client on "
        "Tuesday to discuss the roadmap, and they asked for a revised estimate by the end of the month. "
    ) * 500
    return {
        "english prose": english,
        "README": readme,
        "README + entity/KB": "\n".join(mixed),
        "corpus": "\n".join(corpus),
    }


def scanning() -> dict[str, float]:
    det = detect.default_detector()
    detect.warm_up()
    out = {}
    for name, text in texts().items():
        best = min(timeit.repeat(functools.partial(det.find, text), number=1, repeat=7, timer=time.process_time))
        out[name] = len(text.encode()) / best / 1e6
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def prompt_of(size: int) -> str:
    mixed = texts()["README + entity/KB"]
    text = (mixed * (size // len(mixed) + 1))[:size]
    return text.replace("\\", " ").replace('"', "'")


def body(prompt: str, stream: bool = False) -> str:
    return json.dumps({"model": "gpt-5.4-mini", "stream": stream, "messages": [{"role": "user", "content": prompt}]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="1,10,100", help="prompt sizes in KB, comma-separated")
    parser.add_argument("--no-scan", action="store_true", help="skip the in-process scanning figures")
    parser.add_argument("--no-stream", action="store_true", help="skip the streamed events' figure")
    args = parser.parse_args()
    sizes = [int(kb) * 1024 for kb in args.sizes.split(",") if kb]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    if not args.no_scan:
        print("scanning, CPU time, best of 7:")
        for name, mbs in scanning().items():
            print(f"  {name:22} {mbs:7.1f} MB/s")
    work = Path(tempfile.mkdtemp(prefix="bench-pii-"))
    overrides = {"tenants": {"plain": {}, "redacted": {"pii": {"action": "restore"}}}}
    stack, admin = make_stack(work, None, overrides=overrides)
    plain, _ = admin.key("plain", "b")
    redacted, _ = admin.key("redacted", "p")
    stack.start()
    pid = stack.procs["server"].pid
    url = stack.base_url + "/v1/chat/completions"
    rows: list[tuple[str, float, float, float]] = []
    try:
        for size in sizes:
            payload = body(prompt_of(size))
            res: dict[str, list[float]] = {"B": [], "P": []}
            for key in (plain, redacted):
                wrk(url, payload, 1, 2, {"Authorization": f"Bearer {key}"})
            for rnd in range(args.repeats):
                order = [("B", plain), ("P", redacted)]
                for name, key in order if rnd % 2 == 0 else order[::-1]:
                    res[name].append(wrk(url, payload, 1, args.duration, {"Authorization": f"Bearer {key}"})["p50"])
            b, p = statistics.median(res["B"]), statistics.median(res["P"])
            rows.append((f"{size // 1024} KB prompt", b, p, p - b))
        cpu_b = cpu_p = float("nan")
        if not args.no_stream:
            # Streams: the answer echoes a prompt with placeholders in 3-character events.
            echo_prompt = " ".join(f"mail user{i}@acme-corp.io about order {i}" for i in range(12))
            events = len(echo_prompt) // 3 + 1
            payload = body(echo_prompt, stream=True)
            res = {"B": [], "P": []}
            cpu: dict[str, list[float]] = {"B": [], "P": []}
            hdrs: dict[str, str] = {"x-mock-echo": "1"}
            for key in (plain, redacted):
                wrk(url, payload, 1, 2, {**hdrs, "Authorization": f"Bearer {key}"})
            for rnd in range(args.repeats):
                order = [("B", plain), ("P", redacted)]
                for name, key in order if rnd % 2 == 0 else order[::-1]:
                    before = cpu_seconds(pid)
                    r = wrk(url, payload, 1, args.duration, {**hdrs, "Authorization": f"Bearer {key}"})
                    cpu[name].append((cpu_seconds(pid) - before) / (r["rps"] * args.duration * events) * 1e6)
                    res[name].append(r["p50"])
            b, p = statistics.median(res["B"]), statistics.median(res["P"])
            rows.append((f"stream of {events} events", b, p, (p - b) / events))
            cpu_b, cpu_p = statistics.median(cpu["B"]), statistics.median(cpu["P"])
    finally:
        stack.stop()
    print(f"\nthrough the gateway (wrk, 1 connection, medians of {args.repeats} x {args.duration} s):")
    print("| | p50 without PII (ms) | p50 with restore (ms) | added |")
    print("|---|---|---|---|")
    for name, b, p, added in rows:
        unit = "ms per event" if name.startswith("stream") else "ms"
        print(f"| {name} | {b:.2f} | {p:.2f} | {added:+.3f} {unit} |")
    if not args.no_stream:
        print(f"\nserver CPU per streamed event: {cpu_b:.0f} µs without PII, {cpu_p:.0f} µs with restore")
    summary: dict[str, Any] = {"rows": rows, "cpu_per_event_us": (cpu_b, cpu_p)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

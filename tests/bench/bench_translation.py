"""What schema translation costs, per request and per streamed event, against pass-through.

One stack (Envoy, the server, the mock provider); for each provider schema, the same upstream answer
reached two ways, in alternating wrk runs at 1 connection:
- Claude: the Anthropic schema straight through (pass-through) vs an OpenAI-schema request
  translated to Anthropic and its answer back;
- GPT: the OpenAI schema straight through vs an Anthropic-schema request translated to OpenAI.
Non-streamed requests give the added p50 per request; streams of N events (x-mock-output-tokens)
give the added time per event ((T - P) / N) and the server's CPU per event.

Run by hand (needs wrk): .venv/bin/python tests/bench/bench_translation.py [--duration 5] [--repeats 3]
Floors (issue: translation): <= 0.3 ms added per request, <= 0.2 ms per streamed event.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_gateway import wrk  # noqa: E402
from tests.bench.bench_pii import cpu_seconds  # noqa: E402
from tests.e2e.conftest import make_stack  # noqa: E402

EVENTS = 100
PROMPT = "Summarize the quarterly report in three sentences for the board. " * 8


def openai_body(model: str, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 200,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body)


def anthropic_body(model: str, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 200,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-translation-"))
    stack, admin = make_stack(work, None)
    key, _ = admin.key("bench", "t")
    stack.start()
    pid = stack.procs["server"].pid
    oai = {"Authorization": f"Bearer {key}"}
    ant = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    base = stack.base_url
    # name -> (pass-through (url, body builder, headers), translated (...)), same upstream answer.
    pairs = {
        "Claude": (
            (f"{base}/v1/messages", anthropic_body, ant, "claude-sonnet-5-5"),
            (f"{base}/v1/chat/completions", openai_body, oai, "claude-sonnet-5-5"),
        ),
        "GPT": (
            (f"{base}/v1/chat/completions", openai_body, oai, "gpt-5.5"),
            (f"{base}/v1/messages", anthropic_body, ant, "gpt-5.5"),
        ),
    }
    rows: list[tuple[str, float, float, float, float, float]] = []
    try:
        for name, (plain, translated) in pairs.items():
            for stream in (False, True):
                hdrs = {"x-mock-output-tokens": str(EVENTS if stream else 20)}
                res: dict[str, list[float]] = {"P": [], "T": []}
                cpu: dict[str, list[float]] = {"P": [], "T": []}
                runs = {"P": plain, "T": translated}
                for url, build, h, model in runs.values():
                    wrk(url, build(model, stream), 1, 2, {**h, **hdrs})
                for rnd in range(args.repeats):
                    order = ["P", "T"] if rnd % 2 == 0 else ["T", "P"]
                    for which in order:
                        url, build, h, model = runs[which]
                        before = cpu_seconds(pid)
                        r = wrk(url, build(model, stream), 1, args.duration, {**h, **hdrs})
                        per = r["rps"] * args.duration * (EVENTS if stream else 1)
                        cpu[which].append((cpu_seconds(pid) - before) / per * 1e6)
                        res[which].append(r["p50"])
                p, t = statistics.median(res["P"]), statistics.median(res["T"])
                added = (t - p) / EVENTS if stream else t - p
                rows.append(
                    (
                        f"{name}, {'stream' if stream else 'JSON'}",
                        p,
                        t,
                        added,
                        statistics.median(cpu["P"]),
                        statistics.median(cpu["T"]),
                    )
                )
    finally:
        stack.stop()
    print(f"\nwrk, 1 connection, medians of {args.repeats} x {args.duration} s; streams of {EVENTS} events")
    print("| upstream, response | p50 pass-through (ms) | p50 translated (ms) | added | server CPU P / T (µs) |")
    print("|---|---|---|---|---|")
    for name, p, t, added, cp, ct in rows:
        unit = "ms per event" if "stream" in name else "ms per request"
        per = "per event" if "stream" in name else "per request"
        print(f"| {name} | {p:.2f} | {t:.2f} | {added:+.3f} {unit} | {cp:.0f} / {ct:.0f} {per} |")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()

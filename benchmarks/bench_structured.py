"""Structured-output overhead: time per decoded token with a JSON schema enforced
(falconet/constraints.py: an llguidance mask per step) over plain greedy decoding, on
the same model, prompt and token count, in one run.

Both sides decode --tokens greedy tokens through the engine the server runs (one
sequence, caller-driven): unconstrained with ignore_eos, constrained with a schema whose
shortest output is longer than --tokens (an array of records, each with a string, an
integer in range, an enum list and a nested object), so neither stops early. Time per
token is taken from the first token to the last (the prefill is left out: it is the
same on both sides and no mask runs in it). The runs alternate, medians over
--repeats after a warm-up; the grammar processor's own time per call is timed too.
Not used by the tests.

    python benchmarks/bench_structured.py                         # falconet-tiny
    python benchmarks/bench_structured.py --model .bench_cache/falcon-1b-mq --tokens 48
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import falconet
from falconet.constraints import Grammar
from falconet.engine import Engine
from falconet.sampling import SamplingParams

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "owner"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 1000}


class Timed:
    """A logits processor that times the one it wraps."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner(ids, logits)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def decode_seconds(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, int]:
    """Seconds from the first token to the last, and the tokens after the first."""
    (stream,) = engine.submit([prompt], [params])
    first = last = None
    n = 0
    for d in engine.iterate(stream):
        if d.finish_reason == "error":
            raise RuntimeError(d.error)
        if d.token_ids:
            last = time.perf_counter()
            first = first or last
            n += len(d.token_ids)
    return last - first, n - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default falconet-tiny)")
    ap.add_argument("--tokens", type=int, default=96, help="tokens decoded per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = falconet.load(args.model)
    engine = Engine.from_llm(llm, max_batch=1)
    prompt = llm.tokenizer.encode("Records:")
    t0 = time.perf_counter()
    grammar = Grammar.compile("json_schema", SCHEMA, llm.tokenizer)
    compile_s = time.perf_counter() - t0
    free = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    free_s, guided_s, mask_s = [], [], []
    for i in range(args.repeats + 1):  # the first round warms up
        timed = Timed(grammar.processor())
        guided = SamplingParams(max_tokens=args.tokens, logits_processors=(timed,))
        a, na = decode_seconds(engine, prompt, free)
        b, nb = decode_seconds(engine, prompt, guided)
        if i:
            free_s.append(a / na)
            guided_s.append(b / nb)
            mask_s.append(timed.seconds / timed.calls)
    f, g, m = (statistics.median(x) * 1e3 for x in (free_s, guided_s, mask_s))
    name = args.model or "falconet-tiny"
    print(f"model {name}: vocab {llm.model.config.vocab_size} (tokenizer "
          f"{llm.tokenizer.vocab_size}), {args.tokens} tokens, median of {args.repeats}, "
          f"{args.threads} threads; schema compiled in {compile_s * 1e3:.1f} ms")  # fmt: skip
    print("| decode | ms/token |")
    print("|---|---:|")
    print(f"| unconstrained | {f:.2f} |")
    print(f"| JSON schema | {g:.2f} |")
    print(f"| of which the grammar processor | {m:.3f} |")
    print(f"| **ratio JSON schema / unconstrained** | **{g / f:.3f}** |")


if __name__ == "__main__":
    main()

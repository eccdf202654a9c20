"""Batch scoring throughput: records/s of `falconet batch` (BatchJob: continuous batching
through the engine, the SQLite ledger and fsynced outputs included) against a naive loop
of `llm.generate` over the same prompts, on the same model, in one run.

Both sides render the same template over the same --records synthetic records and
decode --max-tokens greedy tokens each (ignore_eos, so every record costs the same on
both sides and the token counts match). The naive loop is what a user writes without
the batch command: one `llm.generate` per record, nothing persisted. The batch side
starts from an empty ledger in a temp folder. Its outputs are checked equal to the
loop's (temperature 0 and batch-invariant kernels: the same text). Not used by the
tests.

With `--ray ADDRESS` (`local`: a cluster of this machine's CPUs started for each run) the same
job also runs on Ray (RayBatchJob: one model and engine per actor, an SQLite ledger,
since every node is this machine) with 1 worker and then 2. Its rows give the wall time
(actors loading the model included) and the steady rate: records finished after the
first batch came back, over the time since.

    python benchmarks/bench_batch.py                          # falconet-tiny, 128 records
    python benchmarks/bench_batch.py --records 512 --max-batch 64 --model PATH
    python benchmarks/bench_batch.py --ray local              # and Ray, 2 workers vs 1
    python benchmarks/bench_batch.py --smoke [--ray local]    # 32 records: does it run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import falconet
from falconet.batch import BatchJob, BatchSettings
from falconet.sampling import SamplingParams

TEMPLATE = "Write a one-line note about transaction {{ id }}: {{ text }}\nNote:"
WORDS = [
    "payment",
    "refund",
    "falcon",
    "transfer",
    "invoice",
    "salary",
    "coffee",
    "rent",
    "flight",
    "hotel",
]


def records(n: int) -> list[dict]:
    return [
        {"id": i, "text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 5))}
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: falconet-tiny)")
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--naive-records", type=int, default=None,
                    help="records timed in the naive loop (default: all; its rate is per record)")  # fmt: skip
    ap.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="also run on the Ray cluster at ADDRESS (local: start one here)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true",
                    help="32 records of 4 tokens, max_batch 4 (two Ray tasks): a quick run")  # fmt: skip
    args = ap.parse_args()
    if args.smoke:
        args.records, args.max_tokens, args.naive_records, args.max_batch = 32, 4, 4, 4

    llm = falconet.load(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    data = records(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        settings = BatchSettings(
            folder / "in.jsonl", TEMPLATE, folder / "out.jsonl", params=params,
            key_field="id", max_batch=args.max_batch,
        )  # fmt: skip
        llm.generate("warm up", max_tokens=2)
        job = BatchJob(llm, settings)
        t0 = time.perf_counter()
        final = job.run()
        batch_s = time.perf_counter() - t0
        job.close()
        assert final.done == args.records, final
        batched = {
            int(r["key"]): r["text"]
            for r in map(json.loads, (folder / "out.jsonl").read_text().splitlines())
        }

    naive_n = min(args.naive_records or args.records, args.records)
    t0 = time.perf_counter()
    naive = {}
    for r in data[:naive_n]:
        prompt = job.template.render(r)
        naive[r["id"]] = llm.generate(prompt, **_kw(params))
    naive_s = time.perf_counter() - t0
    same = all(batched[i] == text for i, text in naive.items())

    batch_rate, naive_rate = args.records / batch_s, naive_n / naive_s
    print(f"model {llm.path}  records {args.records}  max_tokens {args.max_tokens}  "
          f"max_batch {args.max_batch}")  # fmt: skip
    print(f"{'runner':<28}{'records':>9}{'seconds':>10}{'records/s':>12}{'tokens/s':>11}")
    for name, n, s in (("naive llm.generate loop", naive_n, naive_s),
                       ("falconet batch (BatchJob)", args.records, batch_s)):  # fmt: skip
        print(f"{name:<28}{n:>9}{s:>10.2f}{n / s:>12.2f}{n * args.max_tokens / s:>11.1f}")
    print(f"speed-up {batch_rate / naive_rate:.2f}x (target >= 4x); "
          f"outputs equal to the loop's: {same}")  # fmt: skip
    if args.ray is not None:
        bench_ray(args, data, params, batched)


def bench_ray(args, data: list[dict], params: SamplingParams, batched: dict[int, str]) -> None:
    """The same job on Ray with 1 worker, then 2; a table of wall time and steady rate."""
    from falconet.batch.ray_job import RayBatchJob

    print(f"\nRay at {args.ray}: wall includes the actors loading the model; steady = "
          "records after the first batch / time since")  # fmt: skip
    print(f"{'runner':<28}{'records':>9}{'wall s':>10}{'records/s':>12}{'steady/s':>11}")
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
            settings = BatchSettings(
                folder / "in.jsonl", TEMPLATE, folder / "out.jsonl", params=params,
                key_field="id", max_batch=args.max_batch,
            )  # fmt: skip
            first: list[tuple[float, int]] = []

            def report(progress, first=first) -> None:
                if progress.done and not first:
                    first.append((time.perf_counter(), progress.done))

            job = RayBatchJob(settings, args.ray, args.model, workers)
            t0 = time.perf_counter()
            final = job.run(report)
            end = time.perf_counter()
            job.close()
            assert final.done == args.records, final
            texts = {
                int(r["key"]): r["text"]
                for r in map(json.loads, (folder / "out.jsonl").read_text().splitlines())
            }
        (at, done) = first[0]
        steady = (args.records - done) / (end - at) if end > at and done < args.records else 0.0
        rates[workers] = steady
        name = f"Ray, {workers} worker{'s' if workers > 1 else ''}"
        print(f"{name:<28}{args.records:>9}{end - t0:>10.2f}{args.records / (end - t0):>12.2f}"
              f"{steady:>11.2f}  outputs equal: {texts == batched}")  # fmt: skip
    if rates[1]:
        print(f"2 workers vs 1 (steady): {rates[2] / rates[1]:.2f}x")


def _kw(params: SamplingParams) -> dict:
    return {"max_tokens": params.max_tokens, "temperature": params.temperature,
            "ignore_eos": params.ignore_eos}  # fmt: skip


if __name__ == "__main__":
    main()

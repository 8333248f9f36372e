#!/usr/bin/env python3
"""How the validator's time grows with a dataset's size: linear, or one comparison per pair of examples.

Examples:
  python bench/validation_scale.py                  # 2,000, 4,000 and 8,000 examples (about a minute)
  python bench/validation_scale.py --sizes 4000,16000

Each size is a JSON-lines file of distinct made-up examples (random words) that all share one system
prompt, as many users' files do, validated by finetune.DatasetValidator in this process (no tokenizer:
the token counts are the tokenizer's time, not the validator's). It prints the seconds the whole
validation took and those of its near-duplicate check, and the ratio of each to the size before it:
about 2 per doubling is linear; about 4 is quadratic. All sizes run one after the other in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402

SYSTEM = ("You are Deep Tree Echo, an adaptive, self-reflective AI built on echo state reservoirs, membrane "
          "P-systems and hypergraph memory. Answer kindly and clearly.")


def write_dataset(path: Path, size: int, rng: random.Random) -> None:
    words = sorted(set((ROOT / "general_text.txt").read_text(encoding="utf-8").split()))

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    with path.open("w", encoding="utf-8") as handle:
        for _ in range(size):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text(5, 20) + "?"},
                        {"role": "assistant", "content": text(30, 150) + "."}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,4000,8000", help="comma-separated example counts (default 2000,4000,8000)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    import torch  # only to name the CPU, as the other benchmarks do

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    check = finetune.near_duplicates
    timed = {"seconds": 0.0}

    def near_duplicates(texts, *more, **options):
        start = time.perf_counter()
        try:
            return check(texts, *more, **options)
        finally:
            timed["seconds"] = time.perf_counter() - start

    finetune.near_duplicates = near_duplicates  # the validator looks the function up at call time
    print(f"{'examples':>9} {'validation':>11} {'ratio':>6} {'near-dup check':>15} {'ratio':>6} {'warnings':>9}")
    before = None
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            path = Path(folder) / f"{size}.jsonl"
            write_dataset(path, size, random.Random(size))
            start = time.perf_counter()
            report = finetune.DatasetValidator().validate_file(path)
            whole = time.perf_counter() - start
            ratios = ("", "") if before is None else (f"{whole / before[0]:.2f}", f"{timed['seconds'] / before[1]:.2f}")
            print(f"{size:>9,} {whole:>10.1f}s {ratios[0]:>6} {timed['seconds']:>14.2f}s {ratios[1]:>6} "
                  f"{len(report.warnings['near duplicate']):>9}")
            before = (whole, timed["seconds"])
    finetune.exit_without_teardown(0)


if __name__ == "__main__":
    main()

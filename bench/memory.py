#!/usr/bin/env python3
"""Peak memory of a training run: this tool's default recipe beside the naive one and TRL's.

Examples:
  python bench/memory.py                      # 8 steps of each recipe, each in a process of its own (a few minutes)
  python bench/memory.py --steps 4 --json memory.json
  python bench/memory.py --recipes default    # one recipe

Each recipe trains in a fresh process, so that its peak is its own: the peak resident memory of that
process (what /usr/bin/time -v calls "Maximum resident set size"), and on CUDA the most torch
allocated on the GPU. All three train on the same examples, the longest of the shipped dataset
(what sets a run's peak), rendered by finetune.render, at the same batch size and for the same
number of steps:
  default  finetune.py's own code path (HuggingFaceFineTuner, its Trainer): LoRA, the loss on labelled
           positions in chunks, batches in pieces of --max-batch-tokens, precision from the hardware;
  naive    what older scripts do: full fine-tune in fp32, every example padded to 512 tokens, the
           model's own loss over every position, a plain torch loop (bench/train_throughput.py's (b));
  trl      TRL's SFTTrainer: LoRA r16 on all linear layers, the model's own loss, bf16 autocast where
           native (bench/train_throughput.py's (e)).
Target (issue: a 135M model fine-tunes in under 2 GB): the default's peak at most 2 GB on a CPU.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import finetune  # noqa: E402
import train_throughput as throughput  # noqa: E402

RECIPES = ("default", "naive", "trl")
STEPS = 8


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per recipe (default {STEPS})")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--child", choices=RECIPES, help=argparse.SUPPRESS)  # one recipe, in this process
    args = parser.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if unknown := set(args.recipes) - set(RECIPES):
        parser.error(f"unknown recipes: {', '.join(sorted(unknown))}")
    return args


# --------------------------------------------------------------------------------------------
# One recipe, in a process of its own (--child).
# --------------------------------------------------------------------------------------------
def the_examples(settings: dict, steps: int) -> tuple[list[dict], list[list[int]]]:
    """The steps x batch longest examples of the shipped dataset, and their order: longest first, a
    batch at a time (the order Transformers' length-grouped sampler starts with)."""
    report = finetune.DatasetValidator(settings["max_length"]).validate_file(ROOT / finetune.DEFAULT_SETTINGS["dataset"])
    tokenizer = finetune.HuggingFaceFineTuner(settings).load_tokenizer()
    lengths = [len(finetune.render(tokenizer, ex["messages"])["input_ids"]) for ex in report.examples]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[: steps * settings["batch_size"]]
    examples = [report.examples[i] for i in longest]
    batch = settings["batch_size"]
    return examples, [list(range(k, min(k + batch, len(examples)))) for k in range(0, len(examples), batch)]


def run_child(recipe: str, steps: int) -> dict:
    total = throughput.WARMUP_STEPS + steps  # the warm-up step trains too: the peak covers every step
    settings = dict(finetune.DEFAULT_SETTINGS, validation_split=0, max_steps=total, save_steps=total + 1, evaluate_after_training=False)
    settings = finetune.resolve_hardware(settings)
    examples, order = the_examples(settings, total)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        settings["output_dir"] = folder
        if recipe == "default":
            result = throughput.run_default_recipe(settings, examples, steps)["result"]
        else:
            tuner = finetune.HuggingFaceFineTuner(settings)
            tokenizer = tuner.load_tokenizer()
            rows = [finetune.render(tokenizer, ex["messages"], max_length=settings["max_length"]) for ex in examples]
            lengths = {i: len(row["input_ids"]) for i, row in enumerate(rows)}
            if recipe == "naive":
                result = throughput.run_naive_recipe(tuner.base_path, tokenizer, examples, order, lengths, settings["device"], settings["seed"])
            else:
                result = throughput.run_trl_recipe(settings, tuner.base_path, tokenizer, rows, order, steps, folder)
    return {"recipe": recipe, "peak": finetune.peak_memory(), "precision": result["precision"], "method": result["method"],
            "batch_size": result["batch_size"], "steps": result["timed_steps"],
            "dataset_tokens": result["dataset_tokens"], "dataset_tokens_per_second": result["dataset_tokens_per_second"],
            "max_batch_tokens": settings["max_batch_tokens"] if recipe == "default" else None}


# --------------------------------------------------------------------------------------------
# The comparison.
# --------------------------------------------------------------------------------------------
def format_report(results: dict, cpu: dict) -> str:
    lines = ["| recipe | precision | peak resident memory | peak GPU memory | dataset tok/s |", "|---|---|---:|---:|---:|"]
    for r in results.values():
        gpu = f"{r['peak']['cuda_gb']:.2f} GB" if "cuda_gb" in r["peak"] else "-"
        lines.append(f"| {r['recipe']}: {r['method']}, batch {r['batch_size']} | {r['precision']} | "
                     f"{r['peak']['resident_gb']:.2f} GB | {gpu} | {r['dataset_tokens_per_second']:.0f} |")
    default = results.get("default")
    for other in ("naive", "trl"):
        if default and other in results:
            ratio = results[other]["peak"]["resident_gb"] / default["peak"]["resident_gb"]
            lines.append(f"{other}/default peak resident memory = {ratio:.2f}x")
    if default:
        verdict = "met" if default["peak"]["resident_gb"] <= 2.0 else "NOT met"
        lines.append(f"default peak {default['peak']['resident_gb']:.2f} GB (target <= 2 GB: {verdict}); "
                     f"max_batch_tokens {default['max_batch_tokens']}")
    lines.append(f"CPU: {cpu['model'] or 'unknown'}, capability {cpu['capability']}, native bf16 "
                 f"{'yes' if cpu['native_bf16'] else 'no'}, torch threads {cpu['threads']} of {cpu['cores']} cores; "
                 f"each recipe {next(iter(results.values()))['steps']} steps on the same longest examples, in a process of its own")
    lines.append("command: python " + shlex.join(sys.argv))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    finetune.quiet_libraries()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps)))
        return 0
    results = {}
    for recipe in throughput.runnable(args.recipes):
        results[recipe] = throughput.in_own_process(__file__, recipe, ["--steps", str(args.steps)])
        finetune.log(f"{recipe}: peak {finetune.format_memory(results[recipe]['peak'])}")
    print(format_report(results, throughput.cpu_description()))
    if args.json:
        finetune.write_atomic(args.json, json.dumps(results, indent=2) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    finetune.exit_without_teardown(finetune.run_command(main, verbose=True))

#!/usr/bin/env python3
"""Training at a GPU user's scale: this tool's default recipe beside TRL's SFTTrainer, on random weights of a named shape.

Examples:
  python bench/gpu_train.py                            # SmolLM2-1.7B's shape, 10 timed steps of each (a CUDA machine)
  python bench/gpu_train.py --shape 135m --steps 2     # anywhere: on a CPU this is the fallback, same code, slow
  python bench/gpu_train.py --batch-size 32 --json gpu.json
  python bench/gpu_train.py --lever padding_free=true --lever batch_size=16 --recipes default
  python bench/gpu_train.py --profile --steps 4                        # and where one step's time goes
  ATEN_CPU_CAPABILITY=avx2 python bench/gpu_train.py --shape 135m --recipes default --set precision=fp32 --lever max_batch_tokens=512

Random weights, because a GPU machine may reach no model hub and a run's speed and memory depend on
the model's shape, not its weights: SmolLM2's architecture at the size named, in bf16, with the
embedded SmolLM2's tokenizer (every size shares its vocabulary). Both recipes train on the same
examples (a seeded sample of the shipped dataset, rendered by finetune.render), with the same batch
size and steps, each in a process of its own so that its peak memory is its own:
  default  finetune.py's own path (HuggingFaceFineTuner and its Trainer), with the settings it chooses
           on this device (bench/train_throughput.py's (a));
  trl      TRL's SFTTrainer, LoRA r16 on all linear layers, its defaults otherwise (train_throughput's (e)).
Reported per recipe: dataset tokens/s (the examples' tokens, padding not counted) over the timed steps;
MFU, that rate x 4 x the base's parameters (LoRA computes no gradients for frozen weights) over the
device's peak dense bf16 rate (a table of known GPUs, or --peak-tflops; on a CPU the measured
2048 x 2048 matmul rate, so there it is a share of what this CPU reaches, not of a datasheet); and the
peak memory: torch.cuda.max_memory_allocated on CUDA, the resident set everywhere.
Each --lever KEY=VALUE (a setting of finetune.py, as config.json spells it) adds a row: the default
recipe with that setting changed, in a process of its own on the same examples, and its ratio to the
default: the levers measured one by one, in one run (KEY=VALUE,KEY=VALUE changes several in one row).
--set KEY=VALUE changes a setting for every row. "first step" is the untimed warm-up step's time:
with --lever compile=true, the time it spends compiling.
--profile: each row runs one step more, untimed, under torch.profiler, and the report ends with that
step's top ops, the ops the host dispatched and the values it read back (on a GPU a step of small
kernels takes the time of its ops' count; each value read back is a sync), and on a GPU the share of
its wall time the GPU was computing (where a step's time goes).
Targets (issue 24, 1.7B shape, LoRA, on a GPU): the default at least 2x TRL in dataset tokens/s at
the same batch, and at least 25% MFU.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import finetune  # noqa: E402
import train_throughput as throughput  # noqa: E402

# SmolLM2's published configurations (config.json of HuggingFaceTB/SmolLM2-{135M,360M,1.7B}-Instruct).
SHAPES = {
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "rope_theta": 100000.0},
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5, "rope_theta": 100000.0},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "rope_theta": 130000.0},
}
SHARED_SHAPE = {"vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core rates from the vendors' datasheets, by a word in the device's name
    "H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "RTX 4090": 165.0,
}
RECIPES = ("default", "trl")
STEPS = 10
TARGETS = {"trl": 2.0, "mfu": 0.25}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1.7b", help="the model's shape (default 1.7b)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per recipe, after one warm-up step (default {STEPS})")
    parser.add_argument("--batch-size", default="auto", help="examples per step for both recipes (default: the tool's auto)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a setting for every recipe (repeatable), e.g. precision=fp32")
    parser.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                        help="also the default recipe with this setting changed (repeatable), e.g. padding_free=true; "
                             "several settings in one row: compile=true,batch_size=32")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for a GPU not in the table")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="a folder (or hub id) with SmolLM2's tokenizer, where the embedded model is not installed "
                             "(a machine that reaches no package index: its tokenizer files are 3 MB to carry)")
    parser.add_argument("--seed", type=int, default=finetune.DEFAULT_SETTINGS["seed"])
    parser.add_argument("--profile", action="store_true",
                        help="each row also runs one untimed step under torch.profiler: its top ops and, on a GPU, how busy it was")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one recipe, in this process
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)  # a lever's settings, as JSON
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)  # the random-weight model the parent made
    args = parser.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if unknown := set(args.recipes) - set(RECIPES):
        parser.error(f"unknown recipes: {', '.join(sorted(unknown))}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    def setting(text: str, flag: str) -> dict:
        settings = {}
        for pair in re.split(r",(?=\w+=)", text):  # compile=true,batch_size=32: one row, both changed
            key, _, value = pair.partition("=")
            if key not in finetune.DEFAULT_SETTINGS or not value:
                parser.error(f"{flag} takes KEY=VALUE with a setting of finetune.py (config.json's names), not {pair!r}")
            try:
                settings[key] = json.loads(value)  # true, 16, 0.5, "auto"
            except json.JSONDecodeError:
                settings[key] = value
            if text := finetune.broken_rule(key, settings[key]):  # the rule config.json and the flags are held to
                parser.error(f"{flag} {key} must be {text} (got {value})")
        return settings

    args.levers = {lever: setting(lever, "--lever") for lever in args.lever}
    args.settings = {key: value for text in args.settings for key, value in setting(text, "--set").items()}
    if args.batch_size != "auto":
        if not args.batch_size.isdigit() or int(args.batch_size) < 1:
            parser.error(f"--batch-size must be auto or a positive whole number, not {args.batch_size!r}")
        args.batch_size = int(args.batch_size)
    return args


# --------------------------------------------------------------------------------------------
# The model: random weights of a named shape, saved where both recipes load it.
# --------------------------------------------------------------------------------------------
def make_model(shape: str, folder: Path, seed: int, tokenizer: str | None = None) -> int:
    """SmolLM2's architecture at `shape`, random bf16 weights, with the embedded model's tokenizer (or
    `tokenizer`'s); its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHARED_SHAPE, **SHAPES[shape], head_dim=SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"])
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    finetune.load_tokenizer(tokenizer or finetune.resolve_base(finetune.SMOLLM2_ALIAS)).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# One recipe, in a process of its own (--child).
# --------------------------------------------------------------------------------------------
def run_child(recipe: str, args) -> dict:
    total = throughput.WARMUP_STEPS + args.steps + args.profile  # the profiled step comes after the timed ones
    settings = dict(finetune.DEFAULT_SETTINGS, model=args.model_folder, batch_size=args.batch_size, seed=args.seed,
                    validation_split=0, max_steps=total, save_steps=total + 1, evaluate_after_training=False)
    settings.update(json.loads(args.overrides))
    settings = finetune.resolve_hardware(settings)
    examples = throughput.load_examples(str(ROOT / finetune.DEFAULT_SETTINGS["dataset"]), settings["max_length"])
    rng = random.Random(args.seed)  # the same sample in both processes; repeated where a run needs more than the dataset
    examples = [rng.choice(examples) for _ in range(total * settings["batch_size"])]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        settings["output_dir"] = folder
        if recipe != "trl":  # the default, or a lever on it
            result = throughput.run_default_recipe(settings, examples, args.steps, args.profile)["result"]
        else:
            tuner = finetune.HuggingFaceFineTuner(settings)
            tokenizer = tuner.load_tokenizer()
            rows = [finetune.render(tokenizer, ex["messages"], max_length=settings["max_length"]) for ex in examples]
            batch = settings["batch_size"]
            order = [list(range(k, k + batch)) for k in range(0, len(rows), batch)]
            result = throughput.run_trl_recipe(settings, tuner.base_path, tokenizer, rows, order, args.steps, folder, args.profile)
    return dict(result, peak=finetune.peak_memory(), device=settings["device"], hardware=settings.get("hardware"))


# --------------------------------------------------------------------------------------------
# The comparison.
# --------------------------------------------------------------------------------------------
def peak_rate(device: str, precision: str, given: float | None) -> tuple[float | None, str]:
    """The FLOP/s an MFU is a share of, and where that figure comes from."""
    if given:
        return given * 1e12, f"--peak-tflops {given:g}"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        word = next((w for w in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True) if w in name), None)
        if word is None:
            return None, f"{name} is not in the table: give --peak-tflops"
        return PEAK_BF16_TFLOPS[word] * 1e12, f"{name}: {PEAK_BF16_TFLOPS[word]:g} TFLOP/s dense bf16 (datasheet)"
    measured = throughput.measure_matmul(device, precision)
    best = max(measured["gflops"].values())
    return best * 1e9, f"this {device}'s measured {throughput.MATMUL_SIZE}x{throughput.MATMUL_SIZE} matmul rate, {best:.0f} GFLOP/s"


def format_report(results: dict, parameters: int, peak: float | None, peak_source: str, shape: str) -> str:
    lines = ["| recipe | precision | batch | dataset tok/s | MFU | first step | peak GPU memory | peak resident |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        mfu = r["dataset_tokens_per_second"] * throughput.FLOPS_PER_TOKEN[r["method"]] * parameters / peak if peak else None
        r["mfu"] = mfu
        gpu = f"{r['peak']['cuda_gb']:.2f} GB" if "cuda_gb" in r["peak"] else "-"
        lines.append(f"| {name} | {r['precision']} | {r['batch_size']} | {r['dataset_tokens_per_second']:.0f} | "
                     f"{'-' if mfu is None else f'{mfu:.1%}'} | {r['warmup_seconds']:.1f} s | {gpu} | {r['peak']['resident_gb']:.2f} GB |")
    default, trl = results.get("default"), results.get("trl")
    for name, r in results.items():
        if default and name not in RECIPES:
            lines.append(f"{name}: {r['dataset_tokens_per_second'] / default['dataset_tokens_per_second']:.2f}x the default's dataset tokens/s")
    if default and trl:
        ratio = default["dataset_tokens_per_second"] / trl["dataset_tokens_per_second"]
        lines.append(f"default/TRL dataset tokens/s = {ratio:.2f}x (target {TARGETS['trl']:g}x on a GPU)")
    if default and default["mfu"] is not None:
        lines.append(f"default MFU {default['mfu']:.1%} (target {TARGETS['mfu']:.0%} on a GPU) of {peak_source}")
    first = next(iter(results.values()))
    cpu = throughput.cpu_description()
    lines.append(f"model: SmolLM2's {shape} shape, {parameters / 1e6:.0f}M parameters, random bf16 weights; "
                 f"{first['timed_steps']} timed step{'s' if first['timed_steps'] > 1 else ''} after 1 warm-up, each recipe in a process of its own; device {first['device']}"
                 + ("" if first["device"] == "cuda" else f" (CPU capability {cpu['capability']}, native bf16 "
                                                         f"{'yes' if cpu['native_bf16'] else 'no'}, {cpu['threads']} threads)"))
    lines.append("command: python " + shlex.join(sys.argv))
    for name, r in results.items():
        if profile := r.get("profile"):
            busy = profile["device_busy_seconds"]
            lines += ["", f"{name}: step {profile['step'] + 1} under torch.profiler (not timed), {profile['wall_seconds']:.3f} s"
                      + ("" if busy is None else f", the GPU computing {busy:.3f} s of it ({busy / profile['wall_seconds']:.0%})"),
                      f"host: {profile['ops']} ops dispatched" + (f" ({profile['kernels']} GPU kernels)" if "kernels" in profile else "")
                      + f", {profile['scalar_reads']} values read back (outside the optimizer; on a GPU each is a sync)",
                      profile["table"].rstrip()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    finetune.quiet_libraries()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-model-") as folder:
        parameters = make_model(args.shape, Path(folder), args.seed, args.tokenizer)
        finetune.log(f"random-weight model of the {args.shape} shape: {parameters / 1e6:.0f}M parameters")
        flags = ["--model-folder", folder, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                 *(["--profile"] if args.profile else [])]
        runs = [(recipe, {}) for recipe in throughput.runnable(args.recipes)] + list(args.levers.items())
        for recipe, overrides in runs:
            results[recipe] = throughput.in_own_process(__file__, recipe, flags + ["--overrides", json.dumps({**args.settings, **overrides})])
            r = results[recipe]
            finetune.log(f"{recipe}: {r['dataset_tokens_per_second']:.0f} dataset tok/s, peak {finetune.format_memory(r['peak'])}")
    if not results:
        raise finetune.UserError("no recipe ran", 1)
    first = next(iter(results.values()))
    peak, source = peak_rate(first["device"], first["precision"], args.peak_tflops)
    print(format_report(results, parameters, peak, source, args.shape))
    if args.json:
        finetune.write_atomic(args.json, json.dumps({"shape": args.shape, "parameters": parameters, "peak_flops": peak,
                                                     "peak_source": source, "results": results}, indent=2) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    finetune.exit_without_teardown(finetune.run_command(main, verbose=True))

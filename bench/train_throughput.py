#!/usr/bin/env python3
"""Training throughput: this tool's default recipe beside the naive one and TRL's, and this machine's ceilings.

Examples:
  python bench/train_throughput.py                        # 6 timed steps of each recipe, several minutes on 2 cores
  python bench/train_throughput.py --steps 3 --json bench.json
  python bench/train_throughput.py --precision fp32       # the default recipe (and TRL's) without bf16 autocast
  pip install -r bench/requirements.txt                   # TRL, for (e); without it (e) is skipped

In one process, on the same examples and the same base model:
  (a) the default recipe, through finetune.py's own code path (HuggingFaceFineTuner, Trainer):
      LoRA, chat template, loss on assistant tokens, batches grouped by length, precision from the hardware;
  (b) the naive recipe of older scripts: "User: ...\\n\\nAssistant: ..." padded to 512 tokens,
      full fine-tune in fp32, AdamW lr 5e-5, loss on every token (padding included), a plain torch loop,
      the examples of (a) in the same order;
  (e) TRL's SFTTrainer: LoRA r16 on all linear layers, bf16 autocast where native (fp32 otherwise),
      no gradient checkpointing, no packing: the rows (a) trained on (rendered by finetune.render, same
      length), in TRL's own random batches padded to their longest row, same batch size and steps;
  (c) the matmul rate of this machine: 2048x2048 (fp32, and bf16 where the CPU computes it natively),
      and at the model's own layer shapes (x @ W forward, dY @ W^T backward, tokens = batch x mean
      length) in the precision (a) trains with, each shape weighted by the FLOPs it takes in a step.
All recipes count the same dataset tokens: each example's length as finetune.render makes it.
Loss-bearing tokens are labels other than -100. A ceiling in tokens/s is a matmul rate divided by
4 x parameters FLOPs per token (LoRA: no gradients for frozen weights; 6 x for full fine-tuning).
Targets: (a) at least 2x (e) and 4x (b) in dataset tokens/s on a CPU with native bf16 (1.5x and
2.5x without), and at least 50% of the layer-shape ceiling.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402

# --------------------------------------------------------------------------------------------
# Settings of the benchmark (the default recipe's own settings come from finetune.DEFAULT_SETTINGS).
# --------------------------------------------------------------------------------------------
STEPS = 6  # timed optimizer steps per recipe
WARMUP_STEPS = 1  # run first, not timed (first-call allocations, autocast caches)
NAIVE_LENGTH = 512  # the naive recipe pads and truncates every example to this many tokens
NAIVE_LEARNING_RATE = 5e-5
MATMUL_SIZE = 2048
MATMUL_SECONDS = 2.0  # per precision
FLOPS_PER_TOKEN = {"lora": 4, "full": 6}  # x parameters; LoRA computes no gradients for frozen weights
LAYER_SHAPE_SECONDS = 0.4  # per distinct matmul shape
PROFILE_ROWS = 15  # ops in a profiled step's table (bench/gpu_train.py --profile)
TARGETS = {  # (a)/(b), (a)/(e) in dataset tokens/s, and (a)'s share of the layer-shape ceiling
    "native bf16": {"naive": 4.0, "trl": 2.0, "layer_ceiling": 0.50},
    "no native bf16": {"naive": 2.5, "trl": 1.5, "layer_ceiling": 0.50},
}
BUSY_WARNING = 0.20  # share of the CPUs other processes may use before the results are flagged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per recipe, after {WARMUP_STEPS} warm-up step (default {STEPS})")
    parser.add_argument("--batch-size", default="auto", help="examples per step for both recipes (default: the tool's auto)")
    parser.add_argument("--examples", default=str(ROOT / finetune.DEFAULT_SETTINGS["dataset"]), metavar="FILE",
                        help="JSONL dataset (default: training_dataset.jsonl)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="the default recipe's precision, resolved by the tool (default auto: bf16 where native)")
    parser.add_argument("--seed", type=int, default=finetune.DEFAULT_SETTINGS["seed"])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--no-trl", action="store_true", help="skip (e), TRL's SFTTrainer")
    parser.add_argument("--no-processes", action="store_true",
                        help="skip (d), the 1-process vs 2-process comparison (about 2 minutes)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            parser.error(f"--batch-size must be a number or auto, not {args.batch_size}")
    return args


# --------------------------------------------------------------------------------------------
# Data: the examples as the tool reads them, and their length as the tool renders them.
# --------------------------------------------------------------------------------------------
def load_examples(path: str, max_length: int) -> list[dict]:
    report = finetune.DatasetValidator(max_length).validate_file(path)
    if report.n_valid == 0:
        raise finetune.UserError(f"{path} has no valid examples", exit_code=1)
    finetune.log(f"{report.n_valid} examples from {path}" + (f" ({report.n_invalid} invalid lines skipped)" if report.n_invalid else ""))
    return report.examples


def naive_text(messages: list[dict]) -> str:
    """What older scripts trained on: "User: {prompt}\\n\\nAssistant: {completion}", turns joined alike."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


# --------------------------------------------------------------------------------------------
# (c) The matmul rates: the ceilings.
# --------------------------------------------------------------------------------------------
def matmul_rate(device: str, dtype, m: int = MATMUL_SIZE, k: int = MATMUL_SIZE, n: int = MATMUL_SIZE,
                seconds: float = MATMUL_SECONDS) -> float:
    """GFLOP/s of repeated [m, k] @ [k, n] matmuls for about `seconds`, after one untimed."""
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        synchronize(device)
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def measure_matmul(device: str, precision: str) -> dict:
    """fp32 always; bf16 where it is native (without it, one matmul takes about a minute on CPU);
    fp16 only off the CPU. Returns {"fp32": GFLOP/s, ...} and the precision the ceiling uses."""
    import torch

    rates = {"fp32": matmul_rate(device, torch.float32)}
    if device != "cpu" or finetune.cpu_has_native_bf16():
        rates["bf16"] = matmul_rate(device, torch.bfloat16)
    if device != "cpu" and precision == "fp16":
        rates["fp16"] = matmul_rate(device, torch.float16)
    ceiling_precision = precision if precision in rates else "fp32"
    return {"gflops": rates, "ceiling_precision": ceiling_precision,
            "note": None if ceiling_precision == precision else f"{precision} is not native here; ceiling from fp32"}


def layer_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count) of every weight matrix a token goes through, from the model's config:
    per layer q, k, v, o and the gated MLP; then the output projection (tied to the embedding or not,
    it is one vocab-wide matmul per token; the embedding lookup itself is no matmul)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [("q_proj", hidden, q, layers), ("k_proj", hidden, kv, layers), ("v_proj", hidden, kv, layers),
            ("o_proj", q, hidden, layers), ("gate_proj", hidden, inter, layers), ("up_proj", hidden, inter, layers),
            ("down_proj", inter, hidden, layers), ("lm_head", hidden, config.vocab_size, 1)]


def layer_shape_rate(device: str, dtype, config, tokens: int, seconds: float = LAYER_SHAPE_SECONDS) -> dict:
    """The matmul rate at the shapes one LoRA step computes: per weight W (in x out), forward x @ W
    ([tokens, in] @ [in, out]) and the gradient wrt the input dY @ W^T ([tokens, out] @ [out, in]),
    2 x tokens x in x out FLOPs each (4 x parameters per token in all). Each distinct shape is timed
    once; the rate is the FLOPs of a whole step over the time its matmuls take at the measured rates."""
    shapes = {}  # (m, k, n) -> FLOPs per step
    for _, fan_in, fan_out, count in layer_shapes(config):
        for k, n in ((fan_in, fan_out), (fan_out, fan_in)):  # x @ W, dY @ W^T
            shapes[(tokens, k, n)] = shapes.get((tokens, k, n), 0) + 2 * tokens * k * n * count
    rates = {shape: matmul_rate(device, dtype, *shape, seconds=seconds) for shape in shapes}
    flops = sum(shapes.values())
    step_seconds = sum(f / (rates[shape] * 1e9) for shape, f in shapes.items())
    return {"gflops": flops / step_seconds / 1e9, "tokens": tokens,
            "shapes": [{"m": m, "k": k, "n": n, "flop_share": shapes[(m, k, n)] / flops, "gflops": rates[(m, k, n)]}
                       for (m, k, n) in shapes]}


# --------------------------------------------------------------------------------------------
# (a) The default recipe, through the tool's own code path.
# --------------------------------------------------------------------------------------------
def step_timer():
    """A Trainer callback that records when each optimizer step begins and ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def step_profiler(step: int, device: str, rows: int = PROFILE_ROWS):
    """A Trainer callback that runs torch.profiler over optimizer step `step` (counted from 0): the ops
    that took the most time (on the GPU where there is one, else on the CPU), and on a GPU the share of
    the step's wall time it was computing: what a step's time goes to, where a rate alone cannot say."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        profiler, report = None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                activities = [torch.profiler.ProfilerActivity.CPU]
                activities += [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []
                synchronize(device)
                self.profiler, self.start = torch.profiler.profile(activities=activities), time.perf_counter()
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or self.report is not None:
                return
            synchronize(device)
            wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            ops = self.profiler.key_averages()
            on_device = device == "cuda"
            busy = sum(op.self_device_time_total for op in ops) / 1e6 if on_device else None
            self.report = {"step": step, "wall_seconds": wall, "device_busy_seconds": busy, **host_work(self.profiler),
                           "table": ops.table(sort_by="self_device_time_total" if on_device else "self_cpu_time_total", row_limit=rows)}

    return StepProfiler()


def host_work(profiler) -> dict:
    """What the host did in a profiled step, whatever the device: "ops", the ops it dispatched one by one
    (aten ops called from Python or the autograd engine, not from inside another op; on a GPU each
    costs microseconds of host time to dispatch and launch, so a step of small kernels is bound by
    their count); "scalar_reads", the values it read back from tensors outside the optimizer (whose
    step counts live on the host): on a GPU each waits for every kernel queued before it, so the host
    cannot run ahead. On CUDA also "kernels", those the GPU ran.
    Read from the profiler's raw events, nested as torch's own profiler.events() nests them (an event
    inside another's time on its thread is its child) without building its event objects: the same
    counts, 1 s for a 64-token answer's 400,000 events instead of 14."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import _filter_name

    threads, kernels = collections.defaultdict(list), 0
    for event in profiler.profiler.kineto_results.events():
        if event.device_type() != DeviceType.CPU:
            kernels += event.device_type() == DeviceType.CUDA
        elif event.start_thread_id() == event.end_thread_id() and not _filter_name(event.name()):  # async ones nest nowhere
            threads[event.start_thread_id()].append((event.start_ns(), -event.end_ns(), event.name()))
    ops = reads = 0
    for events in threads.values():
        parents = []  # (end, name, inside the optimizer): each inside the one below it
        for start, end, name in sorted(events):
            end = -end
            while parents and (start >= parents[-1][0] or end > parents[-1][0]):
                parents.pop()
            parent = parents[-1] if parents else (0, "", False)
            ops += name.startswith("aten::") and not parent[1].startswith("aten::")
            optimizer = parent[2] or name.startswith("Optimizer.step")
            reads += name == "aten::_local_scalar_dense" and not optimizer  # .item(), bool(), int() of a tensor
            parents.append((end, name, optimizer))
    return {"ops": ops, "scalar_reads": reads, **({"kernels": kernels} if kernels else {})}


def train_counting_tokens(trainer, timer, by_tokens: dict, steps: int, settings: dict, who: str, recipe: str,
                          method: str, profile: bool = False) -> tuple[dict, list[list[dict]]]:
    """Runs warm-up + steps of `trainer`, counting the tokens of every batch its collator builds
    (`by_tokens` names each row's example); the summary of the timed steps, and each step's batches.
    `profile`: the trainer runs one step more, under torch.profiler and not timed (step_profiler; the
    result's "profile"), so that the profiler's own cost stays out of the rates."""
    profiler = step_profiler(WARMUP_STEPS + steps, settings["device"]) if profile else None
    if profiler:
        trainer.add_callback(profiler)
    batches, collate = [], trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        batches.append({
            "examples": [by_tokens[tuple(f["input_ids"])] for f in features],
            "dataset_tokens": sum(len(f["input_ids"]) for f in features),
            "loss_tokens": int((batch["labels"] != -100).sum()),
            "computed_tokens": int(batch["input_ids"].numel()),  # padding included
        })
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    if len(timer.ends) != WARMUP_STEPS + steps + bool(profile):
        raise RuntimeError(f"expected {WARMUP_STEPS + steps + bool(profile)} steps, {who} ran {len(timer.ends)}")
    del timer.begins[WARMUP_STEPS + steps:], timer.ends[WARMUP_STEPS + steps:]  # the profiled step is not timed
    accumulation = settings["gradient_accumulation"]
    per_step = [batches[k * accumulation:(k + 1) * accumulation] for k in range(WARMUP_STEPS + steps)]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e][: WARMUP_STEPS + steps]
    result = summarise_steps(recipe=recipe, method=method, precision=settings["precision"], batch_size=settings["batch_size"],
                             accumulation=accumulation, step_batches=per_step, ends=timer.ends, begins=timer.begins,
                             losses=losses)
    if profiler:
        result["profile"] = profiler.report
    return result, per_step


def run_default_recipe(settings: dict, examples: list[dict], steps: int, profile: bool = False) -> dict:
    """Trains warm-up + steps with the tool's Trainer; counts tokens from the batches it consumed."""
    from datasets import Dataset

    tuner = finetune.HuggingFaceFineTuner(settings)
    tokenizer = tuner.load_tokenizer()
    model = tuner.load_model()
    base_name, base_path = tuner.base_name, tuner.base_path
    if settings["method"] == "lora":  # the base model's own parameters, without the adapter's
        trainable, total = model.get_nb_trainable_parameters()
        base_parameters = total - trainable
    else:
        trainable = base_parameters = sum(p.numel() for p in model.parameters())
    rows = tuner.rows(examples, tokenizer)
    train = Dataset.from_list(rows)
    # Which example each row is (the dataset keeps the rows, not the examples): by its tokens.
    lengths, by_tokens = {}, {}
    for i, row in enumerate(rows):
        by_tokens.setdefault(tuple(row["input_ids"]), i)
        lengths[i] = len(row["input_ids"])

    timer = step_timer()
    trainer = tuner.make_trainer(model, tokenizer, train, None, Path(settings["output_dir"], "checkpoints"), [timer])
    result, per_step = train_counting_tokens(trainer, timer, by_tokens, steps, settings, "the Trainer",
                                             recipe="(a) default", method=settings["method"], profile=profile)
    result["trainable_parameters"] = trainable
    del trainer, model
    gc.collect()
    return {"result": result, "base_parameters": base_parameters, "base_path": base_path, "base_model": base_name,
            "tokenizer": tokenizer, "lengths": lengths, "rows": rows,
            "example_order": [[i for b in batches_of_step for i in b["examples"]] for batches_of_step in per_step]}


# --------------------------------------------------------------------------------------------
# (b) The naive recipe: what older scripts did, in a plain torch loop.
# --------------------------------------------------------------------------------------------
def run_naive_recipe(base_path: str, tokenizer, examples: list[dict], example_order: list[list[int]],
                     lengths: dict, device: str, seed: int) -> dict:
    """A fresh copy of the base model, full fine-tune in fp32, the same examples in the same order."""
    import torch

    torch.manual_seed(seed)
    model = finetune.load_causal_lm(base_path).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=NAIVE_LEARNING_RATE)
    step_batches, inputs = [], []
    for indices in example_order:  # tokenized before the clock starts, as a dataset.map would
        encoded = tokenizer([naive_text(examples[i]["messages"]) for i in indices], padding="max_length",
                            truncation=True, max_length=NAIVE_LENGTH, return_tensors="pt")
        labels = encoded["input_ids"].clone()  # every position, padding included
        inputs.append({"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device),
                       "labels": labels.to(device)})
        step_batches.append([{"examples": indices, "dataset_tokens": sum(lengths[i] for i in indices),
                              "loss_tokens": int((labels != -100).sum()), "computed_tokens": int(labels.numel())}])
    begins, ends, losses = [], [], []
    for batch in inputs:
        begins.append(time.perf_counter())
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        synchronize(device)
        ends.append(time.perf_counter())
    result = summarise_steps(
        recipe="(b) naive", method="full", precision="fp32", batch_size=len(example_order[0]), accumulation=1,
        step_batches=step_batches, ends=ends, begins=begins, losses=losses)
    del model, optimizer, inputs
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------
# (e) TRL's SFTTrainer: the usual library recipe, on the rows (a) trained on.
# --------------------------------------------------------------------------------------------
def trl_missing() -> str | None:
    """Why (e) cannot run, or None: TRL is installed for the benchmark only (bench/requirements.txt)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return f"TRL is not installed; install it with: {sys.executable} -m pip install -r bench/requirements.txt"
    return None


def runnable(recipes: list[str]) -> list[str]:
    """`recipes` less "trl" where TRL is not installed (said once, on stderr)."""
    if "trl" in recipes and trl_missing():
        finetune.log(f"trl skipped: {trl_missing()}")
        return [r for r in recipes if r != "trl"]
    return recipes


def in_own_process(script: str, recipe: str, flags: list[str]) -> dict:
    """`script --child RECIPE FLAGS` run in a fresh process, so that the recipe's peak memory is its own:
    the JSON its last line prints (bench/memory.py and bench/gpu_train.py)."""
    done = subprocess.run([sys.executable, script, "--child", recipe, *flags], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise finetune.UserError(f"the {recipe} recipe failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", 1)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_trl_recipe(settings: dict, base_path: str, tokenizer, rows: list[dict], example_order: list[list[int]],
                   steps: int, output_dir: str, profile: bool = False) -> dict:
    """SFTTrainer with LoRA r16 on all linear layers, a fresh copy of the base model. Its dataset is the
    rows (a) consumed, already tokenized (TRL keeps given input_ids and labels), so the examples, their
    rendering and their length are those of (a); TRL batches them its own way (random order, each batch
    padded to its longest row) with the same batch size, for the same warm-up and timed steps.
    Precision: bf16 autocast where (a) uses it (native bf16), else fp32; SFTConfig's own default is bf16
    on any hardware, hundreds of times slower on a CPU without native bf16."""
    import datasets
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()  # TRL's dataset preparation bars

    by_tokens = {tuple(rows[i]["input_ids"]): i for order in example_order for i in order}
    dataset = Dataset.from_list([{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]}
                                 for order in example_order for i in order])
    config = trl.SFTConfig(
        output_dir=output_dir, max_steps=len(example_order), per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation"], learning_rate=settings["learning_rate"],
        bf16=settings["precision"] == "bf16", fp16=settings["precision"] == "fp16", use_cpu=settings["device"] == "cpu",
        gradient_checkpointing=False, packing=False, padding_free=False, max_length=settings["max_length"],
        logging_steps=1, save_strategy="no", report_to="none", seed=settings["seed"], data_seed=settings["seed"],
        disable_tqdm=True)
    lora = LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    timer = step_timer()
    trainer = trl.SFTTrainer(model=finetune.load_causal_lm(base_path), args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints log dicts to stdout, where the report goes
    result, _ = train_counting_tokens(trainer, timer, by_tokens, steps, settings, "TRL", recipe="(e) TRL", method="lora",
                                      profile=profile)
    result["trl_version"] = trl.__version__
    del trainer
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------
# Counting and reporting.
# --------------------------------------------------------------------------------------------
def summarise_steps(recipe, method, precision, batch_size, accumulation, step_batches, ends, begins, losses) -> dict:
    """Rates over the timed steps: from the end of the warm-up to the end of the last step, so the
    Trainer's own work between steps (fetching and padding the next batch, logging) counts too."""
    timed = step_batches[WARMUP_STEPS:]
    seconds = ends[-1] - ends[WARMUP_STEPS - 1]
    count = lambda key: sum(b[key] for batches in timed for b in batches)  # noqa: E731
    return {
        "recipe": recipe, "method": method, "precision": precision, "batch_size": batch_size,
        "gradient_accumulation": accumulation, "timed_steps": len(timed), "seconds": seconds,
        "seconds_per_step": seconds / len(timed),
        "step_seconds": [round(e - p, 3) for p, e in zip(ends[WARMUP_STEPS - 1:], ends[WARMUP_STEPS:])],
        "compute_seconds": sum(e - b for b, e in zip(begins[WARMUP_STEPS:], ends[WARMUP_STEPS:])),
        "warmup_seconds": ends[WARMUP_STEPS - 1] - begins[0],  # the untimed first step: where --compile compiles
        "dataset_tokens": count("dataset_tokens"), "loss_tokens": count("loss_tokens"),
        "computed_tokens": count("computed_tokens"),
        "dataset_tokens_per_second": count("dataset_tokens") / seconds,
        "loss_tokens_per_second": count("loss_tokens") / seconds,
        "computed_tokens_per_second": count("computed_tokens") / seconds,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }


def cpu_description() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return {"model": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": finetune.cpu_has_native_bf16(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count()}


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def part(name: str, parts: dict):
    """Times one part of the benchmark and measures the share of all CPUs that other processes used
    meanwhile: the machine's busy time less this process's own CPU time (all its threads, and the
    subprocesses it ran and waited for)."""
    own_seconds = lambda: time.process_time() + os.times().children_user + os.times().children_system  # noqa: E731
    busy, own, start = machine_busy_seconds(), own_seconds(), time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    others = None
    if busy is not None:
        used = machine_busy_seconds() - busy - (own_seconds() - own)
        others = max(0.0, used / (seconds * (os.cpu_count() or 1)))
    parts[name] = {"seconds": seconds, "others_busy": others}


def run_process_comparison(steps: int, batch_size: int, seed: int) -> dict:
    """(d) The default recipe as users launch it: one process, then two (accelerate launch, gloo on CPU),
    with the same global batch (two processes take half each). Whole runs, so start-up is excluded by
    reading the tokens/s each run measured over its own training steps."""
    runs = {}
    for processes in (1, 2):
        with tempfile.TemporaryDirectory(prefix="bench-ddp-") as folder:
            flags = ["--max-steps", str(steps), "--batch-size", str(batch_size // processes), "--validation-split", "0",
                     "--save-steps", str(steps + 1), "--no-eval", "--seed", str(seed), "--output-dir", f"{folder}/out"]
            launcher = [sys.executable]
            if processes > 1:
                launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            started = time.perf_counter()
            done = subprocess.run([*launcher, str(ROOT / "finetune.py"), *flags], cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise finetune.UserError(f"{processes}-process run failed: {done.stderr.strip().splitlines()[-1:]}", 1)
            summary = json.loads(Path(folder, "out", "training_summary.json").read_text())
        runs[processes] = {"processes": summary["processes"], "tokens_per_second": summary["tokens_per_second"],
                           "wall_seconds": time.perf_counter() - started, "per_process_batch": batch_size // processes}
    runs["ratio"] = runs[2]["tokens_per_second"] / runs[1]["tokens_per_second"]
    return runs


def format_report(results: dict) -> str:
    a, b, e, matmul, cpu = results["default"], results["naive"], results["trl"], results["matmul"], results["cpu"]
    lines = [
        "| recipe | precision | dataset tok/s | loss-bearing tok/s | s/step |",
        "|---|---|---:|---:|---:|",
    ]
    for r in (a, b, e):
        if r:
            lines.append(f"| {r['recipe']}: {r['method']}, batch {r['batch_size']} | {r['precision']} | "
                         f"{r['dataset_tokens_per_second']:.0f} | {r['loss_tokens_per_second']:.0f} | {r['seconds_per_step']:.2f} |")
    ratios, ceilings, targets = results["ratios"], results["ceilings"], results["targets"]
    verdict = lambda value, target: f"target >= {target:.2g}x: {'met' if value >= target else 'NOT met'}"  # noqa: E731
    share = lambda value, target: f"target >= {target:.0%}: {'met' if value >= target else 'NOT met'}"  # noqa: E731
    rates = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in matmul["gflops"].items())
    square, layers = ceilings["square"], ceilings["layer_shapes"]
    per_token = f"{FLOPS_PER_TOKEN[a['method']]} x {results['base_parameters'] / 1e6:.1f} M parameters per token"
    lines += [
        "",
        f"CPU: {cpu['model'] or 'unknown'}, capability {cpu['capability']}, native bf16 "
        f"{'yes' if cpu['native_bf16'] else 'no'}, torch threads {cpu['threads']} of {cpu['cores']} cores"
        + ("" if results["device"] == "cpu" else f"; device {results['device']} ({results['hardware']})")
        + f"; targets for {results['target_set']}",
        f"default/naive (a)/(b) dataset tok/s = {ratios['naive']:.2f}x ({verdict(ratios['naive'], targets['naive'])})",
        (f"default/TRL (a)/(e) dataset tok/s = {ratios['trl']:.2f}x ({verdict(ratios['trl'], targets['trl'])})"
         if e else f"default/TRL (a)/(e): not measured ({results['trl_skipped']})"),
        f"(a) = {layers['fraction']:.0%} of the layer-shape ceiling ({layers['tokens_per_second']:.0f} tok/s from "
        f"{layers['gflops']:.0f} GFLOP/s {layers['precision']} at the model's shapes, {layers['tokens']} tokens per batch, "
        f"{per_token}) ({share(layers['fraction'], targets['layer_ceiling'])})",
        f"(a) = {square['fraction']:.0%} of the {MATMUL_SIZE}x{MATMUL_SIZE} ceiling ({square['tokens_per_second']:.0f} tok/s "
        f"from {square['gflops']:.0f} GFLOP/s {square['precision']}) (no target)" + (f"; {matmul['note']}" if matmul["note"] else ""),
        f"matmul {MATMUL_SIZE}x{MATMUL_SIZE}: {rates}; at the layer shapes ([tokens, k] @ [k, n], share of a step's FLOPs): "
        + ", ".join(f"{s['k']}x{s['n']} {s['gflops']:.0f} ({s['flop_share']:.0%})" for s in matmul["layer_shapes"]["shapes"]),
        "other processes used (share of all CPUs): " + ", ".join(
            f"{name} {'?' if p['others_busy'] is None else format(p['others_busy'], '.0%')}"
            for name, p in results["parts"].items() if name not in ("total", "(d) processes")),
        f"timed: {a['timed_steps']} steps each after {WARMUP_STEPS} warm-up; same {sum(map(len, results['example_order']))} "
        f"examples; dataset tokens {a['dataset_tokens']} per recipe ((e) {e['dataset_tokens'] if e else '-'}: its own order), "
        f"computed tokens (padding included) (a) {a['computed_tokens']}, (b) {b['computed_tokens']}, "
        f"(e) {e['computed_tokens'] if e else '-'}" + (f"; TRL {e['trl_version']}" if e else ""),
        "command: python " + shlex.join(sys.argv),
    ]
    d = results["processes"]
    if d:
        lines.insert(-1, (
            f"(d) whole runs of finetune.py, global batch {d[1]['per_process_batch']}: 1 process "
            f"{d[1]['tokens_per_second']:.0f} tok/s, 2 processes (accelerate launch, gloo) {d[2]['tokens_per_second']:.0f} "
            f"tok/s = {d['ratio']:.2f}x. Both use the same {cpu['cores']} cores (2 processes of one thread each, or one "
            f"process of {cpu['threads']} threads, each process with half the batch): the ratio compares two ways of using "
            f"the same cores, net of the gradient all-reduce, not more hardware."))
    busy = [p["others_busy"] for name, p in results["parts"].items()
            if name not in ("total", "(d) processes") and p["others_busy"] is not None]
    if busy and max(busy) > BUSY_WARNING:
        lines.append(f"WARNING: other processes used up to {max(busy):.0%} of the CPUs; these rates understate this machine")
    lines.append("time: " + ", ".join(f"{name} {p['seconds']:.0f} s" for name, p in results["parts"].items()))
    return "\n".join(lines)


def ceiling(gflops: float, precision: str, flops_per_token: float, achieved: float) -> dict:
    tokens_per_second = gflops * 1e9 / flops_per_token
    return {"precision": precision, "gflops": gflops, "tokens_per_second": tokens_per_second,
            "fraction": achieved / tokens_per_second}


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoConfig

    args = parse_args(argv)
    finetune.quiet_libraries()
    parts = {}
    with part("total", parts):
        with part("idle check", parts):
            time.sleep(1)
        if (parts["idle check"]["others_busy"] or 0) > BUSY_WARNING:
            finetune.log(f"warning: other processes keep {parts['idle check']['others_busy']:.0%} of the CPUs busy; "
                         "the rates will be low")
        settings = dict(finetune.DEFAULT_SETTINGS, dataset=args.examples, precision=args.precision,
                        batch_size=args.batch_size, seed=args.seed, validation_split=0,
                        max_steps=WARMUP_STEPS + args.steps,
                        save_steps=WARMUP_STEPS + args.steps + 1,  # no checkpoint inside the timed steps
                        evaluate_after_training=False)
        settings = finetune.resolve_hardware(settings)
        examples = load_examples(args.examples, settings["max_length"])

        with part("(c) matmul", parts):
            matmul = measure_matmul(settings["device"], settings["precision"])
        finetune.log(f"(c) matmul: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in matmul['gflops'].items())} "
                     f"({parts['(c) matmul']['seconds']:.0f} s)")

        with part("(a) default", parts), tempfile.TemporaryDirectory(prefix="bench-") as folder:
            default = run_default_recipe(dict(settings, output_dir=folder), examples, args.steps)
        a = default["result"]
        finetune.log(f"(a) default: {a['dataset_tokens_per_second']:.0f} dataset tok/s, {a['seconds_per_step']:.1f} s/step "
                     f"({parts['(a) default']['seconds']:.0f} s with loading)")

        with part("(c) layer shapes", parts):  # tokens per batch: batch x the dataset's mean rendered length
            tokens = round(settings["batch_size"] * sum(default["lengths"].values()) / len(default["lengths"]))
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[matmul["ceiling_precision"]]
            matmul["layer_shapes"] = layer_shape_rate(settings["device"], dtype, AutoConfig.from_pretrained(default["base_path"]), tokens)
        finetune.log(f"(c) layer shapes: {matmul['layer_shapes']['gflops']:.0f} GFLOP/s {matmul['ceiling_precision']} "
                     f"({parts['(c) layer shapes']['seconds']:.0f} s)")

        with part("(b) naive", parts):
            b = run_naive_recipe(default["base_path"], default["tokenizer"], examples, default["example_order"],
                                 default["lengths"], settings["device"], args.seed)
        finetune.log(f"(b) naive: {b['dataset_tokens_per_second']:.0f} dataset tok/s, {b['seconds_per_step']:.1f} s/step "
                     f"({parts['(b) naive']['seconds']:.0f} s with loading)")

        e, trl_skipped = None, "--no-trl" if args.no_trl else trl_missing()
        if trl_skipped:
            finetune.log(f"(e) TRL skipped: {trl_skipped}")
        else:
            with part("(e) TRL", parts), tempfile.TemporaryDirectory(prefix="bench-trl-") as folder:
                e = run_trl_recipe(settings, default["base_path"], default["tokenizer"], default["rows"],
                                   default["example_order"], args.steps, folder)
            finetune.log(f"(e) TRL: {e['dataset_tokens_per_second']:.0f} dataset tok/s, {e['seconds_per_step']:.1f} s/step "
                         f"({parts['(e) TRL']['seconds']:.0f} s with loading)")

        processes = None
        if not args.no_processes:
            with part("(d) processes", parts):
                processes = run_process_comparison(8, 2 * settings["batch_size"], args.seed)
            finetune.log(f"(d) 2 processes / 1 process: {processes['ratio']:.2f}x ({parts['(d) processes']['seconds']:.0f} s)")

    cpu = cpu_description()
    target_set = "native bf16" if settings["device"] != "cpu" or cpu["native_bf16"] else "no native bf16"
    flops_per_token = FLOPS_PER_TOKEN[a["method"]] * default["base_parameters"]
    precision, achieved = matmul["ceiling_precision"], a["dataset_tokens_per_second"]
    results = {
        "default": a, "naive": b, "trl": e, "trl_skipped": trl_skipped, "matmul": matmul, "cpu": cpu,
        "device": settings["device"], "hardware": settings["hardware"],
        "base_model": default["base_model"], "base_parameters": default["base_parameters"],
        "ratios": {"naive": achieved / b["dataset_tokens_per_second"],
                   "trl": achieved / e["dataset_tokens_per_second"] if e else None},
        "ceilings": {
            "square": ceiling(matmul["gflops"][precision], precision, flops_per_token, achieved),
            "layer_shapes": dict(ceiling(matmul["layer_shapes"]["gflops"], precision, flops_per_token, achieved),
                                 tokens=matmul["layer_shapes"]["tokens"]),
        },
        "target_set": target_set, "targets": TARGETS[target_set],
        "processes": processes,
        "example_order": default["example_order"],
        "parts": parts, "command": shlex.join(sys.argv), "examples_file": args.examples,
    }
    print(format_report(results))
    if args.json:
        finetune.write_atomic(args.json, json.dumps(results, indent=2) + "\n", overwrite=True)
        finetune.log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    finetune.exit_without_teardown(finetune.run_command(main, verbose=True))  # a UserError is one line; anything else keeps its traceback

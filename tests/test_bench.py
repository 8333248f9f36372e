"""The GPU benchmark's CPU fallback: the same code a CUDA machine runs, on a random-weight model of a
named shape, one timed step (bench/gpu_train.py; its figures need a GPU, its paths do not)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_the_gpu_benchmark_builds_a_model_of_the_named_shape():
    import gpu_train

    assert set(gpu_train.SHAPES) == {"135m", "360m", "1.7b"}
    parameters = {}
    for shape, fields in gpu_train.SHAPES.items():  # the count from the shape alone: embeddings (tied) + layers
        h, i, layers = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]
        kv = h // fields["num_attention_heads"] * fields["num_key_value_heads"]
        parameters[shape] = 49152 * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert parameters["135m"] == pytest.approx(134.5e6, rel=0.01) and parameters["1.7b"] == pytest.approx(1.71e9, rel=0.01)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_the_default_recipe_on_the_cpu_and_reports_rate_mfu_and_memory(tmp_path):
    out = tmp_path / "gpu.json"  # rows of 64 tokens at most: the paths are tested, not the rate
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--shape", "135m", "--steps", "1",
                           "--batch-size", "2", "--recipes", "default", "--profile", "--set", "max_batch_tokens=0",
                           "--set", "max_length=64", "--json", out], cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "random-weight model of the 135m shape: 135M parameters" in done.stderr
    row = re.search(r"^\| default \| (\w+) \| 2 \| (\d+) \| ([\d.]+)% \| ([\d.]+) s \| - \| ([\d.]+) GB \|$", done.stdout, re.M)
    assert row, done.stdout
    assert int(row.group(2)) > 0 and 0 < float(row.group(3)) < 100 and float(row.group(5)) > 0.3
    warmup = json.loads(out.read_text())["results"]["default"]["warmup_seconds"]
    assert float(row.group(4)) == pytest.approx(warmup, abs=0.05) and 0 < warmup < 600
    assert "of this cpu's measured 2048x2048 matmul rate" in done.stdout and "CPU capability" in done.stdout
    results = json.loads(out.read_text())
    assert results["parameters"] == 134_515_008 and results["results"]["default"]["timed_steps"] == 1
    # --profile: a third step, after the warm-up and the timed one, profiled and left out of the rate
    assert re.search(r"^default: step 3 under torch.profiler \(not timed\), [\d.]+ s$", done.stdout, re.M), done.stdout
    assert re.search(r"^ +aten::mm +[\d.]+%", done.stdout, re.M) and "Self CPU time total" in done.stdout
    # whole batches, as on CUDA: the host reads back only the attention mask's padding (transformers, 1-2) and
    # the token count (Trainer), not the loss after every batch (Trainer's nan filter, 2 more)
    host = re.search(r"^host: (\d+) ops dispatched, (\d+) values read back \(outside the optimizer; on a GPU each is a sync\)$",
                     done.stdout, re.M)
    assert host and int(host.group(1)) > 1000 and 1 <= int(host.group(2)) <= 3, done.stdout
    assert len(results["results"]["default"]["step_seconds"]) == 1


def test_the_host_counts_are_those_of_torchs_own_event_tree():
    """host_work reads the profiler's raw events (14x faster on a 64-token answer); it must count what
    walking profiler.events(), torch's own tree of them, counts: top-level aten ops, and values read
    back outside the optimizer."""
    import torch
    from train_throughput import host_work

    layer = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with torch.profiler.profile() as profiler:
        loss = layer(torch.randn(4, 8)).square().mean()
        loss.backward()
        loss.item()  # a read outside the optimizer
        optimizer.step()
        with torch.profiler.record_function("Optimizer.step#Fake.step"):
            loss.item()  # one inside it: not counted
    events = profiler.events()
    ops = sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")) for e in events)

    def in_optimizer(event):
        while event is not None and not event.name.startswith("Optimizer.step"):
            event = event.cpu_parent
        return event is not None

    reads = sum(e.name == "aten::_local_scalar_dense" and not in_optimizer(e) for e in events)
    assert ops > 10 and reads == 1
    assert host_work(profiler) == {"ops": ops, "scalar_reads": reads}


def test_each_lever_is_a_setting_changed_and_its_row_says_its_ratio_to_the_default(capsys):
    import gpu_train

    args = gpu_train.parse_args(["--lever", "padding_free=true", "--lever", "batch_size=16", "--lever", "lr_scheduler=linear",
                                 "--lever", "compile=true,batch_size=32", "--lever", "lora_target_modules=q_proj,v_proj"])
    assert args.levers == {"padding_free=true": {"padding_free": True}, "batch_size=16": {"batch_size": 16},
                           "lr_scheduler=linear": {"lr_scheduler": "linear"},
                           "compile=true,batch_size=32": {"compile": True, "batch_size": 32},
                           "lora_target_modules=q_proj,v_proj": {"lora_target_modules": "q_proj,v_proj"}}
    for wrong in ("padding_fre=true", "compile=true,batch_sise=32"):
        with pytest.raises(SystemExit):
            gpu_train.parse_args(["--lever", wrong])
        assert "a setting of finetune.py" in capsys.readouterr().err
    for wrong, error in (("batch_size=0", "--lever batch_size must be a whole number of at least 1, or auto (got 0)"),
                         ("liger=maybe", "--lever liger must be auto, true or false (got maybe)")):  # config.json's rules
        with pytest.raises(SystemExit):
            gpu_train.parse_args(["--lever", wrong])
        assert error in capsys.readouterr().err
    assert gpu_train.parse_args(["--set", "precision=fp32", "--set", "max_batch_tokens=512"]).settings == {"precision": "fp32", "max_batch_tokens": 512}
    row = {"precision": "bf16", "batch_size": 8, "method": "lora", "timed_steps": 2, "device": "cuda", "warmup_seconds": 31.25,
           "peak": {"resident_gb": 1.0, "cuda_gb": 2.0}}
    profile = {"step": 3, "wall_seconds": 0.5, "device_busy_seconds": 0.1, "ops": 9000, "scalar_reads": 3, "kernels": 7000,
               "table": "the ops\n"}
    results = {"default": dict(row, dataset_tokens_per_second=1000.0),
               "padding_free=true": dict(row, dataset_tokens_per_second=1250.0, profile=profile)}
    report = gpu_train.format_report(results, 1_000_000, 1e15, "a datasheet", "1.7b")
    assert "padding_free=true: 1.25x the default's dataset tokens/s" in report and "| padding_free=true | bf16 | 8 | 1250 | 0.0% | 31.2 s | 2.00 GB | 1.00 GB |" in report
    assert report.endswith("padding_free=true: step 4 under torch.profiler (not timed), 0.500 s, the GPU computing 0.100 s of it (20%)\n"
                           "host: 9000 ops dispatched (7000 GPU kernels), 3 values read back (outside the optimizer; on a GPU each is a sync)\nthe ops")


@pytest.mark.slow
def test_the_generation_benchmark_measures_a_random_model_of_a_named_shape(tmp_path):
    """What a lent GPU runs for the generation targets (--prompt, chat, evaluation batches): no trained model there."""
    out = tmp_path / "gen.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "generation_speed.py"), "--shape", "135m", "--runs", "1",
                           "--max-new-tokens", "8", "--conversations", "3", "--json", out], cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "model: random bf16 weights of SmolLM2's 135m shape, 135M parameters" in done.stdout
    prompt = re.search(r"^\| \(i\) example_usage.py --prompt --precision auto, end to end, a (\d+)-token answer .* \| ([\d.]+) s \|$",
                       done.stdout, re.M)
    chat = re.search(r"^\| \(ii\) chat in process, 8-token answer \(\w+\) \| ([\d.]+) tok/s \|$", done.stdout, re.M)
    batched = re.search(r"^\| \(iii\) evaluation batches, (\d+) probes, batch \d+ \(\w+\) \| ([\d.]+) tok/s \|$", done.stdout, re.M)
    static = re.search(r"^\| \(ii\) chat in process, example_usage.py --static-cache, 8-token answer \(\w+; first answer [\d.]+ s\) "
                       r"\| ([\d.]+) tok/s \|$", done.stdout, re.M)
    assert prompt and chat and batched and static, done.stdout
    ops = re.search(r"^host ops dispatched per generated token: \(ii\) (\w+) (\d+), .*\(ii'\) --static-cache (\d+)$", done.stdout, re.M)
    assert ops and 30 * 20 < int(ops.group(2)) < 30 * 200, done.stdout  # 30 layers: tens of ops each, per token
    assert re.search(r"^chat tok/s, --static-cache / default cache: [\d.]+x \(not compiled off CUDA\)$", done.stdout, re.M)
    assert int(prompt.group(1)) > 0 and float(prompt.group(2)) > 0 and float(chat.group(1)) > 0
    assert int(batched.group(1)) > 1 and float(batched.group(2)) > 0
    assert re.search(r"^conversation turn 6, first token, kept / read again: [\d.]+x; the evaluation's conversations, "
                     r"kept / read again: [\d.]+x; the same answers: (yes|NO)$", done.stdout, re.M), done.stdout
    report = json.loads(out.read_text())
    assert report["shape"] == "135m" and report["conversations"]["conversations"] == 3  # --conversations 3
    turns = report["conversation"]["turns"]
    assert len(turns) == 6 and all(a["prompt_tokens"] + 8 < b["prompt_tokens"] for a, b in zip(turns, turns[1:]))  # each answer kept


def test_the_generation_benchmark_takes_a_model_or_a_shape(capsys):
    import generation_speed

    assert generation_speed.parse_args(["--shape", "1.7b", "--tokenizer", "tok"]).shape == "1.7b"
    for wrong in (["--shape", "135m", "--model", "echo-model/merged"], ["--tokenizer", "tok"]):
        with pytest.raises(SystemExit):
            generation_speed.parse_args(wrong)
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generation_speed.parse_args(["--conversations", "0"])


def test_the_generation_benchmark_takes_conversations_of_each_kind_in_turn():
    import finetune
    import generation_speed

    probes = finetune.load_probes(dict(finetune.DEFAULT_SETTINGS, eval_dataset=str(ROOT / "persona_eval.jsonl")))
    assert [p["kind"] for p in generation_speed.taken_in_turn(probes, 4)] == ["drift", "switch", "interview", "drift"]
    assert len(generation_speed.taken_in_turn(probes, None)) == 20  # every conversation the evaluation has


def test_the_offline_kit_packs_wheels_and_the_tokenizer_and_runs_a_script_with_them(tmp_path):
    """bench/offline_kit.sh: the benchmarks on a GPU machine that reaches no index. Packed here for this
    Python; there (here too) a script runs with the kit's packages ahead of the machine's."""
    kit = tmp_path / "kit"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = dict(os.environ, KIT=str(kit), PYTHON=sys.executable)
    missing = subprocess.run(["bash", "bench/offline_kit.sh", "run", "bench/gpu_train.py"], cwd=ROOT, env=env,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and "run 'bash bench/offline_kit.sh pack' where there is a package index" in missing.stderr
    packed = subprocess.run(["bash", "bench/offline_kit.sh", "pack", version], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert packed.returncode == 0, packed.stderr
    assert f"wheels for Python {version} and SmolLM2's tokenizer" in packed.stdout
    wheels = {path.name.split("-")[0] for path in (kit / "wheels").iterdir()}
    assert {"transformers", "datasets", "peft", "trl", "liger_kernel", "tokenizers"} <= wheels and not any("torch" in w for w in wheels)
    assert (kit / "tokenizer" / "tokenizer.json").is_file() and not (tmp_path / "kit.partial").exists()
    ran = subprocess.run(["bash", "bench/offline_kit.sh", "run", "-c", "import trl, transformers; print(trl.__file__, transformers.__version__)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stderr
    where, transformers = ran.stdout.split()
    assert where.startswith(str(kit / "site")) and f"transformers=={transformers}" in (ROOT / "requirements.txt").read_text()


def test_the_validation_benchmark_prints_each_size_with_its_ratio_and_no_warnings_for_a_shared_system_prompt():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "validation_scale.py"), "--sizes", "100,200"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^CPU capability \w+", done.stdout, re.M), done.stdout
    rows = re.findall(r"^ +(\d+) +([\d.]+)s +([\d.]*) +([\d.]+)s +([\d.]*) +(\d+)$", done.stdout, re.M)
    assert [row[0] for row in rows] == ["100", "200"] and rows[0][2] == "" and float(rows[1][2]) > 0, done.stdout
    assert [row[5] for row in rows] == ["0", "0"]  # distinct examples: the prompt they share is no near duplicate

"""Several processes through accelerate, on this CPU with the gloo backend: one training, one evaluation,
an interrupt that reaches every process, shards that cover the data, and the launch configs shipped.

In a module of their own: each test runs two processes of the real model, and as one scope of the
suite's two workers (--dist loadscope) they run beside test_finetune.py rather than after it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import finetune
from conftest import FEW_QUESTIONS, PY, ROOT


def accelerate_launch(*args, timeout=900, popen=False):
    # accelerate's --cpu launcher starts several processes only through MPI; --multi_gpu starts them with
    # torch.distributed.run, and with no GPU the tool trains on the CPU over gloo.
    launcher = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launcher, *map(str, args)]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_a_script_ends_as_the_interpreter_would_without_its_teardown(tmp_path):
    """exit_without_teardown: a thread pool's idle workers (which joining alone waits on forever), another
    thread still working, atexit's handlers and stdout's buffer are all seen through; the exit code kept."""
    program = (f"import sys, threading, time, atexit, concurrent.futures; sys.path.insert(0, {str(ROOT)!r}); import finetune\n"
               # kept, as a library keeps one; its print done before the main thread writes (print's two writes, text and
               # newline, would otherwise interleave with it on a loaded machine: "poolbuffered, no newline\n")
               "pool = concurrent.futures.ThreadPoolExecutor(1); pool.submit(print, 'pool', flush=True).result()\n"
               f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(tmp_path / 'thread')!r}, 'w').close())).start()\n"
               f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').close())\n"
               "sys.stdout.write('buffered, no newline')\n"
               "finetune.exit_without_teardown(3)\n")
    done = subprocess.run([PY, "-c", program], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 3 and done.stdout == "pool\nbuffered, no newline", (done.stdout, done.stderr)
    assert (tmp_path / "thread").exists() and (tmp_path / "atexit").exists()


def test_a_command_leaves_its_process_group_before_it_exits_whether_it_succeeds_or_fails(tmp_path, monkeypatch):
    """Left to the interpreter's exit, a gloo group can abort a finished process (see leave_process_group)."""
    import torch.distributed as dist

    monkeypatch.setattr(finetune, "text_models_only", lambda: None)  # run_command's other setting, for this process

    def fails():
        raise finetune.UserError("no")

    for n, (command, code) in enumerate([(lambda: 0, 0), (fails, 2)]):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{n}'}", rank=0, world_size=1)
        assert dist.is_initialized()
        assert finetune.run_command(command, verbose=True) == code
        assert not dist.is_initialized()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_the_resumed_run_trains_and_evaluates_once(
        tmp_path, base_path, small_probe_config):
    """One launch stopped by a signal to one rank, then resumed: two processes train once (one log), the
    main one evaluates (without the other hanging) and the model is where it should be, nothing beside it."""
    import psutil

    out = tmp_path / "runs" / "ddp"
    flags = ["--output-dir", out, "--config", small_probe_config, "--max-length", "48", "--max-steps", "6", "--batch-size", "2",
             "--save-steps", "10", *FEW_QUESTIONS, "--lora-r", "4"]
    launcher = accelerate_launch(ROOT / "finetune.py", *flags, popen=True)
    lines = []
    for line in launcher.stderr:
        lines.append(line)
        if line.startswith("step 2/6  loss"):
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "finetune.py" in " ".join(p.cmdline())]
            rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
            rank1[0].send_signal(signal.SIGTERM)  # one process only: the other must learn of it
    launcher.wait(timeout=300)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, "".join(lines)[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < 6 and not (out / "training_summary.json").exists()
    assert "identity adoption" not in launcher.stdout.read()  # stopped: not evaluated
    resumed = accelerate_launch(ROOT / "finetune.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.listdir(tmp_path / "runs") == ["ddp"]
    assert resumed.stderr.count("step 6/6  loss") == 1 and resumed.stderr.count("device cpu") == 1
    assert resumed.stdout.count("identity adoption") == 1  # evaluated once, on the main process, without hanging
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["processes"] == 2 and "evaluation" in summary


SHARD_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import finetune
settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, output_dir={out!r}, max_steps=0, epochs=1,
                                          batch_size=2, validation_split=0, device="cpu", precision="fp32"))
tuner = finetune.HuggingFaceFineTuner(settings)
tokenizer = tuner.load_tokenizer()
examples = [{{"messages": [{{"role": "user", "content": f"question {{i}}"}},
                          {{"role": "assistant", "content": "answer " + "x" * i}}]}} for i in range({n})]
from datasets import Dataset
train = Dataset.from_list(tuner.rows(examples, tokenizer))
trainer = tuner.make_trainer(tuner.load_model(), tokenizer, train, None, __import__("pathlib").Path({out!r}) / "ck")
seen = []
for batch in trainer.get_train_dataloader():
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        seen.append(tokenizer.decode([t for t, l in zip(ids.tolist(), labels.tolist()) if l != -100]))
with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as handle:
    json.dump(seen, handle)
"""


def test_per_rank_shards_are_disjoint_and_cover_the_training_set(tmp_path, base_path):
    n = 11  # 2 ranks x batch 2: accelerate repeats 1 sample to even out the last batch
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT.format(root=str(ROOT), out=str(tmp_path), n=n))
    result = accelerate_launch(script)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = ranks[0] + ranks[1]
    expected = {"answer " + "x" * i + "<|im_end|>" for i in range(n)}
    assert set(everything) == expected
    repeats = len(everything) - n
    assert repeats == -n % 4
    assert len(set(ranks[0]) & set(ranks[1])) <= repeats


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(ROOT / "launch" / f"{name}.yaml")).distributed_type.value
             for name in ("multi_gpu", "deepspeed_zero2", "fsdp")}
    assert kinds == {"multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}


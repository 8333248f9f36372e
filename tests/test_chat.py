"""example_usage.py: one --prompt, the interactive chat, and their errors, on a tiny fine-tune."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import finetune
from conftest import PY, ROOT, cached_reads, cli, offline_hub, side_by_side, without_torch


def test_prompt_prints_only_the_answer_the_model_gives(tiny_model, small_probe_config):
    out, _ = tiny_model
    common = ["--model", out, "--config", small_probe_config]
    result, again, static, refused = side_by_side(
        dict(args=[*common, "--prompt", "Who are you?"], script="example_usage.py"),
        dict(args=[*common, "--prompt", "-"], input="Who are you?", script="example_usage.py"),
        dict(args=[*common, "--prompt", "Who are you?", "--static-cache"], script="example_usage.py"),  # on CUDA what transformers compiles
        dict(args=[*common, "--serve", "--static-cache"], script="example_usage.py"))
    assert result.returncode == 0, result.stderr
    model, tokenizer, _ = finetune.load_for_inference(str(out))
    settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS), training=False)
    model = finetune.answering(model.merge_and_unload(), settings)  # as the chat loads it: merged, in the chosen precision
    [expected] = finetune.generate_answers(model, tokenizer, [[{"role": "user", "content": "Who are you?"}]], settings,
                                           decoding="shipped", max_new_tokens=model.generation_config.max_new_tokens)
    assert result.stdout == expected + "\n"  # the folder's decoding defaults, and nothing else on stdout
    assert again.stdout == result.stdout  # the question read from stdin
    assert static.returncode == 0, static.stderr
    assert static.stdout == result.stdout  # a static cache of the whole context answers alike
    import example_usage

    chat = example_usage.LocalChat(dict(finetune.DEFAULT_SETTINGS), str(out), 512, {"static_cache": True})
    assert chat.decoding == {"cache_implementation": "static", "max_cache_len": 512}  # what generate() is given
    assert refused.returncode != 0 and "--static-cache is for a local model" in refused.stderr


def stand_ins_for_pillow_and_torchvision(folder):
    """Pillow and torchvision as a GPU machine has them, for transformers' checks: a torchvision whose
    import leaves a mark (and then fails, as no real one is needed)."""
    (folder / "PIL").mkdir(parents=True)
    (folder / "PIL" / "__init__.py").write_text('__version__ = "99.0"\n')
    (folder / "PIL" / "ImageOps.py").write_text("")
    (folder / "PIL" / "Image.py").write_text(
        "import enum\nclass Resampling(enum.IntEnum):\n    NEAREST = 0; LANCZOS = 1; BILINEAR = 2; BICUBIC = 3; BOX = 4; HAMMING = 5\n"
        "class Image: pass\n")
    (folder / "torchvision").mkdir()
    (folder / "torchvision" / "__init__.py").write_text(
        "import os\nopen(os.environ['TORCHVISION_MARK'], 'w').close()\nraise ImportError('a stand-in')\n")
    return {"PYTHONPATH": str(folder), "TORCHVISION_MARK": str(folder / "imported")}


def test_prompt_imports_no_torchvision_where_transformers_would(tiny_model, small_probe_config, tmp_path):
    out, _ = tiny_model
    env = stand_ins_for_pillow_and_torchvision(tmp_path / "site")
    plain = subprocess.run([PY, "-c", "import transformers.modeling_utils"], cwd=ROOT, env=dict(os.environ, **env),
                           capture_output=True, text=True)
    assert Path(env["TORCHVISION_MARK"]).exists(), plain.stderr  # transformers itself imports it
    Path(env["TORCHVISION_MARK"]).unlink()
    result = cli("--model", out, "--prompt", "Who are you?", "--config", small_probe_config, script="example_usage.py", env=env)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert not Path(env["TORCHVISION_MARK"]).exists()


def test_chat_history_is_trimmed_from_the_oldest_exchange(tiny_model):
    import example_usage

    out, _ = tiny_model
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32")
    chat = example_usage.LocalChat(settings, str(out), max_context=160, decoding={"max_new_tokens": 16})
    history = [{"role": "system", "content": "Be brief."}]
    for turn in range(4):
        history += [{"role": "user", "content": f"Question {turn}: " + "tell me about tides " * 6},
                    {"role": "assistant", "content": f"Answer {turn}: " + "the moon pulls the sea " * 6}]
    history.append({"role": "user", "content": "And the last question?"})
    ids = chat.fit(history)
    assert len(ids) <= 160 - 16
    assert history[0]["content"] == "Be brief." and history[-1]["content"] == "And the last question?"
    assert "Question 0" not in str(history) and len(history) < 10  # the oldest exchanges went first
    assert ids == finetune.render(chat.tokenizer, history, add_generation_prompt=True)["input_ids"]
    chat.max_context = 16  # no room beside the answer's 16 tokens: said, not an empty prompt handed to the model
    with pytest.raises(finetune.UserError, match="--max-context 16 leaves no room for the conversation beside an answer of up to 16"):
        chat.fit(history)
    chat.max_context = 40  # a question that does not fit alone: said (cut, it lost its start and the template's header)
    with pytest.raises(finetune.UserError, match=r"the question is (at least )?\d+ tokens \(with the chat template and the system prompt\); "
                                                 "at most 24 fit beside an answer of up to 16 tokens in a context of 40"):
        chat.fit([history[0], {"role": "user", "content": "tides " * 40}])
    earlier = [history[0], *history[1:3], {"role": "user", "content": "tides " * 40}]
    with pytest.raises(finetune.UserError, match="the question is"):  # the conversation before it is kept, not trimmed away
        chat.fit(earlier)
    assert earlier[:3] == [history[0], *history[1:3]] and len(earlier) == 4
    with pytest.raises(finetune.UserError, match=r"the question is at least \d+ tokens"):  # 3 MB: its start says so, not all of it
        chat.fit([{"role": "user", "content": "tides " * 500_000}])
    with pytest.raises(finetune.UserError, match="--max-context 9,000 is past the model's context of 8,192 tokens"):
        example_usage.LocalChat(settings, str(out), max_context=9000)


def test_the_chat_reads_only_the_new_question_and_answers_as_a_fresh_read(tiny_model, monkeypatch):
    import example_usage

    out, _ = tiny_model
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32")
    chat = example_usage.LocalChat(settings, str(out), None, {"max_new_tokens": 12, "greedy": True})
    history = [{"role": "user", "content": "Who are you?"}]
    history += [{"role": "assistant", "content": chat.reply(history, lambda piece: None)}, {"role": "user", "content": "And what do you do?"}]
    built = cached_reads(monkeypatch)
    kept = chat.kept.ids  # the first turn's prompt and its answer (but the last token sampled, never read)
    second = chat.reply(history, lambda piece: None)
    assert len(kept) > len(finetune.render(chat.tokenizer, history[:1], add_generation_prompt=True)["input_ids"])
    assert built[0] == len(kept)  # all of it used: the second turn read only the new question
    chat.kept = None  # nothing kept: the whole history read again
    assert chat.reply(history, lambda piece: None) == second
    assert built[-1] is None


def test_a_model_whose_config_sets_no_answer_length_answers_at_the_length_the_history_left_room_for(tiny_model, monkeypatch):
    """The embedded base's generation_config.json (like many on the hub) sets no max_new_tokens: generate()
    alone would stop every chat answer at its model-agnostic 20 tokens, where the history was trimmed for 256."""
    import example_usage

    out, _ = tiny_model
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32")
    chat = example_usage.LocalChat(settings, str(out), None, {"greedy": True})
    chat.model.generation_config.max_new_tokens = None
    asked, generate = [], chat.model.generate

    def spied(*args, **kwargs):  # what the chat asks for is recorded; the answer is cut to 5 tokens, the test's time
        asked.append(kwargs["max_new_tokens"])
        return generate(*args, **dict(kwargs, max_new_tokens=min(kwargs["max_new_tokens"], 5)))

    monkeypatch.setattr(chat.model, "generate", spied)
    chat.reply([{"role": "user", "content": "Who are you?"}], lambda piece: None)
    assert asked == [256] == [chat.answer_tokens()]
    chat.decoding["max_new_tokens"] = 3  # --max-new-tokens wins
    chat.reply([{"role": "user", "content": "Who are you?"}], lambda piece: None)
    assert asked[-1] == 3


def test_a_server_chats_estimate_does_not_undercount_other_scripts_than_english(tokenizer):
    """The --base-url chat trims its history by an estimate, calibrated on the server's count of an English
    prompt (0.22 tokens a character); by characters at that rate an emoji prompt, 2.8 tokens a character,
    was estimated at a twelfth of its tokens and the server answered 400."""
    import example_usage

    chat = example_usage.ServerChat("http://127.0.0.1:9/v1", "served", 2048)  # no request is made

    def tokens(messages):  # what the server counts: the template's tokens too
        return len(finetune.render(tokenizer, messages, add_generation_prompt=True)["input_ids"])

    english = [{"role": "user", "content": "Tell me about the tides and the moon. " * 12},
               {"role": "assistant", "content": "The moon pulls the sea toward it, twice a day. " * 10},
               {"role": "user", "content": "And the sun?"}]
    chat.calibrate(english, tokens(english))
    assert 0.15 < chat.tokens_per_char < 0.3 and abs(chat.estimate(english) - tokens(english)) < 0.1 * tokens(english)
    # Not French or German: their letters are ASCII and count at English's rate, though SmolLM2 makes 0.56
    # tokens a character of French. There the server's 400 is said, and the chat asks for the next question.
    for text in ("🌳🌊🔥✨🤖" * 40, "深度树回声是一个自适应的人工智能" * 10, "Привет, как дела? " * 20):
        asked = [{"role": "user", "content": text}]
        assert tokens(asked) <= chat.estimate(asked) <= 2 * tokens(asked), (text[:20], tokens(asked), chat.estimate(asked))


def test_chat_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter").mkdir()  # a copied adapter, no summary: its base is a hub id, not downloaded
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "someone/base"}')
    for args, error in ((["--max-context", "0"], "--max-context must be a whole number of at least 1 (got 0)"),
                        (["--model", tmp_path / "nope/"], "there is no folder"), (["--model", tmp_path / "empty"], "holds no model"),
                        (["--output-dir", tmp_path / "none"], "no model in"), (["--model", tmp_path / "empty", "--serve", "--port", "0"], "holds no model"),
                        (["--model", "someone/echo"], "the model someone/echo is not in this machine's Hugging Face cache, and the hub cannot"),
                        (["--model", tmp_path / "adapter"], "adapter is an adapter on the base model someone/base, which loads first: the model "
                                                            "someone/base is not in this machine's Hugging Face cache")):
        code, stderr, torch = without_torch(*args, *[] if "--serve" in args else ["--prompt", "hi"], script="example_usage.py",
                                            env=offline_hub(tmp_path))
        assert code == 2 and stderr.count("\n") == 1 and error in stderr, stderr
        assert not torch, args  # said at once, before torch's seconds of imports
    nokey = cli("--provider", "openai", "--prompt", "hi", env={"OPENAI_API_KEY": ""}, script="example_usage.py")
    assert nokey.returncode == 2 and "OPENAI_API_KEY" in nokey.stderr
    assert "--api-key" in nokey.stderr and "--api-key" in cli("--help", script="example_usage.py").stdout  # the flag it names exists
    for args, error in ((["--prompt", "  "], "the prompt is empty"),  # before the model loads, not after
                        (["--serve", "--request-timeout", "nan"], "--request-timeout must be a number of seconds above 0"),
                        (["--temperature", "inf", "--prompt", "hi"], "--temperature must be a number above 0 (got Infinity)"),
                        (["--base-url", "http://user:hunter2@127.0.0.1:9/v1", "--prompt", "hi"], "http://user:***@127.0.0.1:9/v1")):
        code, stderr, torch = without_torch(*args, script="example_usage.py")
        assert code in (1, 2) and stderr.count("\n") == 1 and error in stderr and "hunter2" not in stderr, stderr
        assert not torch, args
    for flag in ("--prompt -", "--interactive"):  # started with stdin closed: was an AttributeError, or a RuntimeError after loading
        closed = subprocess.run(f"{PY} {ROOT / 'example_usage.py'} {flag} <&-", shell=True, executable="/bin/bash", cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert closed.returncode == 2 and closed.stderr.startswith(f"error: {flag} reads standard input, and it is closed"), closed.stderr


def test_text_that_is_not_utf8_is_read_and_a_closed_stdout_is_quiet(tiny_model, small_probe_config):
    """Bytes that are not UTF-8 (read as lone surrogates) were a TypeError from the tokenizer, and the interactive
    chat ended on them; a reader of stdout that left (| head) was an error line and exit 1."""
    out, _ = tiny_model
    common = ["--model", out, "--config", small_probe_config, "--max-new-tokens", "4"]
    one = subprocess.run([PY, str(ROOT / "example_usage.py"), *map(str, common), "--prompt", "-"], cwd=ROOT, input=b"caf\xe9?\n",
                         capture_output=True, timeout=300)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr
    chat = subprocess.run([PY, str(ROOT / "example_usage.py"), *map(str, common), "--interactive"], cwd=ROOT,
                          input=b"caf\xe9?\nAnd you?\n", capture_output=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.count(b"echo> ") == 2 and "caf\ufffd?".encode() in chat.stdout, chat.stderr
    closed = subprocess.run(f"{PY} {ROOT / 'example_usage.py'} {' '.join(map(str, common))} --prompt hi | (exec 0<&-)",
                            shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "error" not in closed.stderr and "Broken pipe" not in closed.stderr, closed.stderr


def test_a_question_too_long_is_said_and_the_chat_goes_on(tiny_model, small_probe_config):
    out, _ = tiny_model
    common = ["--model", out, "--config", small_probe_config, "--max-new-tokens", "4", "--max-context", "64"]
    alone = cli(*common, "--prompt", "tides " * 100, script="example_usage.py")
    assert alone.returncode == 2 and "at most 60 fit" in alone.stderr and not alone.stdout, alone.stderr
    chat = cli(*common, "--interactive", input="tides " * 100 + "\nWho are you?\n", script="example_usage.py")
    assert chat.returncode == 0 and "at most 60 fit" in chat.stderr, chat.stderr
    assert len([line for line in chat.stdout.splitlines() if line.startswith("echo> ") and line[6:].strip()]) == 1, chat.stdout


def test_interactive_chat_keeps_history_resets_and_ends_on_ctrl_d(tiny_model, small_probe_config):
    import pexpect

    out, _ = tiny_model
    child = pexpect.spawn(PY, [str(ROOT / "example_usage.py"), "--model", str(out), "--interactive", "--greedy",
                               "--config", str(small_probe_config)], cwd=str(ROOT), encoding="utf-8", timeout=180)

    def ask(text):
        child.expect_exact("you> ")
        child.sendline(text)
        child.expect(r"echo> (.*?)\r\n")
        return child.match.group(1)

    def reset():
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation forgotten)")

    first = ask("Please say the word banana, nothing else.")
    follow_up = ask("Say it again.")
    reset()
    assert ask("Please say the word banana, nothing else.") == first  # greedy, and the history was cleared
    assert ask("Say it again.") == follow_up  # the same history gives the same answer
    reset()
    assert ask("Say it again.") != follow_up  # without the first turn the second answer changes
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_in_chat_stops_the_answer_not_the_program(tiny_model, small_probe_config):
    import pexpect

    out, _ = tiny_model
    child = pexpect.spawn(PY, [str(ROOT / "example_usage.py"), "--model", str(out), "--interactive", "--greedy",
                               "--max-new-tokens", "2000", "--config", str(small_probe_config)],
                          cwd=str(ROOT), encoding="utf-8", timeout=180)
    child.expect_exact("you> ")
    child.sendline("Write a very long story about the sea.")
    child.expect_exact("echo> ")
    time.sleep(1.5)
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact("you> ")  # still running, ready for the next question
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    one = subprocess.Popen([PY, str(ROOT / "example_usage.py"), "--model", str(out), "--greedy", "--max-new-tokens", "2000",
                            "--config", str(small_probe_config), "--prompt", "Write a very long story about the sea."],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "device" not in (line := one.stderr.readline()) and time.monotonic() < deadline:
        pass
    time.sleep(3)
    one.send_signal(signal.SIGINT)  # --prompt: a cut answer is no answer to a script; the exit says so
    answer, stderr = one.communicate(timeout=60)
    assert one.returncode == 130 and "stopped by Ctrl-C: the answer above is cut short" in stderr, stderr


def test_int8_weights_are_for_answering_on_a_cpu_with_native_bf16(tiny_model, small_probe_config):
    import torch

    out, _ = tiny_model
    training = cli("--output-dir", out.parent / "int8", "--precision", "int8", "--no-eval")
    assert training.returncode == 2 and "--precision int8 is for answering" in training.stderr
    # Refused on a device without its kernel before the model is loaded (or merged): one line, at once.
    elsewhere = cli("--model", out, "--prompt", "hi", "--precision", "int8", "--device", "mps", script="example_usage.py")
    assert elsewhere.returncode == 2 and elsewhere.stderr.count("\n") == 1, elsewhere.stderr
    assert "there is no Apple GPU (MPS) here" in elsewhere.stderr  # no such device here: said first
    with pytest.raises(finetune.UserError, match="needs a CPU that computes bf16 natively"):
        finetune.check_int8("mps")  # where there is one, int8 is refused there
    answer = cli("--model", out, "--prompt", "Who are you?", "--precision", "int8", "--config", small_probe_config,
                 script="example_usage.py")
    if not finetune.cpu_has_native_bf16():
        assert answer.returncode == 2 and "needs a CPU that computes bf16 natively" in answer.stderr
        pytest.skip("this CPU has no native bf16: int8 weights are refused, as checked")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    assert "precision int8" in answer.stderr
    model, _, _ = finetune.load_for_inference(str(out))
    settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, precision="int8"), training=False)
    model = finetune.answering(model.merge_and_unload(), settings)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    merged = (out / "merged" / "config.json").stat().st_mtime_ns
    evaluation = cli("--evaluate", "--model", out, "--config", small_probe_config, "--precision", "int8")
    assert evaluation.returncode == 0 and "(d) other languages" in evaluation.stdout, evaluation.stderr
    again = cli("--model", out, "--prompt", "Who are you?", "--precision", "int8", "--config", small_probe_config,
                script="example_usage.py")
    assert again.stdout == answer.stdout and "using the merged model" in again.stderr  # evaluation.json changed, the model did not
    assert (out / "merged" / "config.json").stat().st_mtime_ns == merged
    layer = model.model.layers[0].mlp.down_proj
    weight = layer.weight_int8.to(torch.bfloat16) * layer.scale[:, None]
    for rows in (1, 5):  # one token (the int8 kernel) and a prompt (the weights dequantized): the same weights
        x = torch.randn(rows, weight.shape[1], dtype=torch.bfloat16)
        expected = (x.float() @ weight.float().T)
        assert torch.allclose(layer(x).float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())

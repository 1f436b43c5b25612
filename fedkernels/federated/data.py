"""Client data: partitioners (IID, Dirichlet, pathological), tokenisation, held-out split, batches.

Partitioners are our own (seeded numpy) so the core never needs flwr-datasets; they follow the usual
definitions: Dirichlet label skew as in Hsu et al. 2019 ("Measuring the effects of non-identical data
distribution"), pathological k-classes-per-client as in McMahan et al. 2017 / Fed-HeLLo's pat_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedkernels.errors import ConfigError

__all__ = [
    "partition_iid",
    "partition_dirichlet",
    "partition_pathological",
    "partition",
    "load_dataset",
    "TokenizedData",
    "tokenize",
    "rng_for",
]


def rng_for(*keys: int) -> np.random.Generator:
    """A numpy generator derived from integer keys (seed, round, client, ...): resumable by construction."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def partition_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, *, min_size: int = 2,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Per class, split its examples over clients with proportions ~ Dirichlet(alpha); redraw until every
    client holds at least ``min_size`` examples (the common rejection scheme)."""
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"dirichlet partition with alpha={alpha} could not give each of {num_clients} clients {min_size} examples "
        f"from {len(labels)} in {max_tries} draws; raise alpha or lower num_clients"
    )


def partition_pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes; each class's examples are split evenly among the
    clients holding it. Classes are dealt round-robin over a shuffled order so every class is used."""
    classes = np.unique(labels)
    k = int(classes_per_client)
    if not 1 <= k <= len(classes):
        raise ConfigError(f"pathological partition needs 1 <= k <= {len(classes)} classes per client, got {k}")
    order = rng.permutation(np.tile(classes, (num_clients * k) // len(classes) + 1))
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    pos = 0
    for client in range(num_clients):
        chosen: set[int] = set()
        while len(chosen) < k:
            c = int(order[pos % len(order)])
            pos += 1
            if c not in chosen:
                chosen.add(c)
        for c in sorted(chosen):
            holders[c].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for owner, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[owner].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(labels: np.ndarray, num_clients: int, spec: tuple[str, float | None], seed: int) -> list[np.ndarray]:
    """Dispatch on a parsed partition spec (``FederatedConfig.partition_spec()``)."""
    kind, value = spec
    if num_clients > len(labels):
        # an iid split would leave clients with no data, and every round then divides by their zero examples
        raise ConfigError(
            f"{kind} partition: num_clients={num_clients} is more than the {len(labels)} training examples; "
            "lower num_clients or raise max_examples"
        )
    rng = rng_for(seed, 0xDA7A)
    if kind == "iid":
        return partition_iid(labels, num_clients, rng)
    if kind == "dirichlet":
        return partition_dirichlet(labels, num_clients, float(value), rng)
    return partition_pathological(labels, num_clients, int(value), rng)


def load_dataset(name: str):
    """``bbc-news`` (bundled, offline) or a local CSV/JSON/JSONL file with text and label columns."""
    if name in ("bbc-news", "bbc", "bbcnews"):
        from fedkernels.assets import load_bbc_news

        return load_bbc_news()
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"dataset {name!r} is neither 'bbc-news' nor a local .csv/.json/.jsonl file")
    import datasets

    kind = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix)
    if kind is None:
        raise ConfigError(f"dataset file {name!r} must be .csv, .json or .jsonl")
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise ConfigError(f"dataset {name!r} lacks columns {sorted(missing)} (has {ds.column_names})")
    if not isinstance(ds.features["label"], datasets.ClassLabel):
        ds = ds.class_encode_column("label")
    return ds


@dataclass
class TokenizedData:
    """A whole dataset tokenised once to fixed length (so every batch has the planned shape)."""

    input_ids: torch.Tensor  # [N, seq_len]
    attention_mask: torch.Tensor  # [N, seq_len]
    labels: torch.Tensor  # [N]
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "labels": self.labels[idx]}


def tokenize(dataset, tokenizer, seq_len: int, max_examples: int | None = None, seed: int = 0) -> TokenizedData:
    """Tokenise ``dataset`` (text, label) padded/truncated to ``seq_len``. ``max_examples`` keeps a seeded,
    class-stratified subset (for tests and quick runs)."""
    labels_all = np.asarray(dataset["label"])
    keep = np.arange(len(labels_all))
    if max_examples is not None and max_examples < len(keep):
        rng = rng_for(seed, 0x5EED)
        per_class = [rng.permutation(np.flatnonzero(labels_all == c)) for c in np.unique(labels_all)]
        take = []
        i = 0
        while len(take) < max_examples:  # round-robin over classes keeps the label balance
            for p in per_class:
                if i < len(p) and len(take) < max_examples:
                    take.append(p[i])
            i += 1
        keep = np.sort(np.asarray(take))
    texts = [dataset[int(i)]["text"] for i in keep]
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    feature = dataset.features["label"]
    names = list(getattr(feature, "names", [str(c) for c in np.unique(labels_all)]))
    return TokenizedData(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels_all[keep]), len(names), names)

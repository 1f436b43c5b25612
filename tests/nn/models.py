"""Tiny random-init transformers models built from configs (no download)."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_bert(num_labels=3, layers=2):
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(layers=2):
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=40, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers=2):
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def batch(n=4, seq=9, vocab=100):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, vocab, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long)}

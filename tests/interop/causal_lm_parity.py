"""Batches and logits shared by the causal-LM parity tests (GPT-2, Llama/Mistral, Mixtral).

A plain module, not a conftest: pytest puts this folder on sys.path, so the tests import it by name.
"""

import numpy as np
import torch


def padded_batch(vocab, lengths, seed=0):
    """Token ids right-padded with 0 to max(lengths), and the attention mask (1 = real token)."""
    width = max(lengths)
    ids = np.random.default_rng(seed).integers(1, vocab, (len(lengths), width))
    mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
    return np.where(mask, ids, 0).astype(np.int32), mask


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))
    return out.logits.numpy()


def our_logits(model, variables, ids, **features):
    return np.asarray(model.compute_logits(variables, {"decoder_input_tokens": ids, **features}))

"""Greedy and beam-search decoding of imported random-weight Llama and T5 models equal
transformers' `generate` with the same settings (do_sample=False), token for token."""

import functools

import numpy as np
import pytest

import torch
import transformers

from t5x_like.inference import decoding
from t5x_like.interop import hf

NEW = 10


@functools.lru_cache(maxsize=None)
def llama(tmp_root):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    for p in ref.parameters():  # wider weights than the 0.02 init, so greedy paths vary
        torch.nn.init.normal_(p, 0.0, 0.2) if p.ndim > 1 else None
    ref.save_pretrained(f"{tmp_root}/llama", safe_serialization=True)
    return ref, *hf.load(f"{tmp_root}/llama")


@functools.lru_cache(maxsize=None)
def t5(tmp_root):
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                num_decoder_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                relative_attention_max_distance=20, tie_word_embeddings=False,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    for p in ref.parameters():  # T5's init is too peaked at this size: every step repeats one token
        torch.nn.init.normal_(p, 0.0, 0.3) if p.ndim > 1 else None
    ref.save_pretrained(f"{tmp_root}/t5", safe_serialization=True)
    return ref, *hf.load(f"{tmp_root}/t5")


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_generate"))


def hf_generate(ref, ids, eos, strip, mask=None, **kw):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                           attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
                           max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    out = out.numpy()[:, strip:]
    out = np.pad(out, ((0, 0), (0, NEW - out.shape[1])))
    # Beam search fills finished rows with EOS (its pad_token_id=0 is falsy there); ours pads with 0.
    is_eos = out == eos
    return np.where(np.cumsum(is_eos, axis=1) - is_eos > 0, 0, out)


def pick_eos(model, variables, prompts, **kw):
    """A token greedy decoding emits mid-way, so EOS handling is exercised."""
    free = decoding.generate(model, variables, prompts, max_new_tokens=NEW, eos_id=-1, **kw)
    return int(free.tokens[0, NEW // 2])


SETTINGS = [dict(method="greedy"),
            dict(method="beam", num_beams=4, length_penalty=0.6, early_stopping=True),
            pytest.param(dict(method="beam", num_beams=3, length_penalty=1.0, early_stopping=False),
                         marks=pytest.mark.slow),
            pytest.param(dict(method="beam", num_beams=3, length_penalty=2.0, early_stopping="never"),
                         marks=pytest.mark.slow)]


def setting_id(s):
    return "-".join(str(v) for v in s.values())


def hf_kwargs(s):
    if s["method"] == "greedy":
        return dict(num_beams=1)
    return dict(num_beams=s["num_beams"], length_penalty=s["length_penalty"], early_stopping=s["early_stopping"])


@pytest.mark.parametrize("setting", [SETTINGS[0], pytest.param(SETTINGS[1], marks=pytest.mark.slow), *SETTINGS[2:]],
                         ids=setting_id)
def test_llama_generate_matches(setting, tmp_root):
    ref, model, variables = llama(tmp_root)
    prompts = np.random.default_rng(1).integers(3, 96, (3, 5)).astype(np.int32)
    eos = pick_eos(model, variables, prompts, **setting)
    ours = decoding.generate(model, variables, prompts, max_new_tokens=NEW, eos_id=eos, **setting)
    theirs = hf_generate(ref, prompts, eos, prompts.shape[1], **hf_kwargs(setting))
    np.testing.assert_array_equal(ours.tokens, theirs)
    if setting.get("early_stopping") != "never":
        assert (ours.tokens == eos).any()


@pytest.mark.parametrize("setting", [pytest.param(SETTINGS[0], marks=pytest.mark.slow), *SETTINGS[1:]],
                         ids=setting_id)
def test_t5_generate_matches(setting, tmp_root):
    ref, model, variables = t5(tmp_root)
    prompts = np.random.default_rng(2).integers(2, 96, (3, 12)).astype(np.int32)
    prompts[1, 7:] = 0
    prompts[2, 4:] = 0
    eos = pick_eos(model, variables, prompts, **setting)
    ours = decoding.generate(model, variables, prompts, max_new_tokens=NEW, eos_id=eos, **setting)
    theirs = hf_generate(ref, prompts, eos, 1, mask=prompts > 0, decoder_start_token_id=0, **hf_kwargs(setting))
    np.testing.assert_array_equal(ours.tokens, theirs)
    if setting.get("early_stopping") != "never":
        assert (ours.tokens == eos).any()

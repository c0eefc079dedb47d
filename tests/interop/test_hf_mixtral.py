"""Mixtral import/export: logit parity with `transformers` when capacity drops nothing (no download)."""

import json
import shutil

import jax
import numpy as np
import pytest

import torch
import transformers

from t5x_like.interop import hf

from causal_lm_parity import hf_logits, padded_batch  # noqa: E402

LENGTH = 12
LENGTHS = (LENGTH, 9, 4)  # one full row, two padded
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            tie_word_embeddings=False)


def build(**overrides):
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**BASE, **overrides})).eval()


def our_logits(model, variables, ids):
    logits, aux = jax.jit(model.compute_logits_and_aux)(variables, {"decoder_input_tokens": ids})
    return np.asarray(logits), {k: float(v) for k, v in aux.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    ref = build()
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    ref.save_pretrained(str(path), safe_serialization=True)
    return ref, str(path)


def test_logits_match_without_dropping(checkpoint, assert_logits_match, relative_error):
    ref_model, path = checkpoint
    model, variables = hf.load(path)
    c = model.config
    assert (c.num_experts, c.moe_top_k, c.moe_capacity_factor, c.moe_every_n_layers) == (4, 2, None, 1)
    assert c.moe_impl == "dropless"
    assert "router" in variables["params"]["decoder"]["layers_1"]["mlp"]
    ids, mask = padded_batch(c.vocab_size, LENGTHS)
    ours, aux = our_logits(model, variables, ids)
    ref = hf_logits(ref_model, ids, mask)
    print(f"mixtral: max relative error {relative_error(ours, ref, mask):.3g}")
    assert aux["moe_dropped_fraction"] == 0.0
    assert_logits_match(ours, ref, mask)

    # A small capacity drops tokens (reported), and only then departs from HF.
    small, small_vars = hf.load(path, moe_impl="capacity", moe_capacity_factor=0.5)
    dropped_logits, dropped_aux = our_logits(small, small_vars, ids)
    assert dropped_aux["moe_dropped_fraction"] > 0.0
    assert relative_error(dropped_logits, ref, mask) > 1e-3


def test_round_trip_through_transformers(checkpoint, tmp_path):
    ref_model, path = checkpoint
    model, variables = hf.load(path)
    out = tmp_path / "export"
    hf.save(model, variables, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is transformers.MixtralForCausalLM
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS)
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(ref_model, ids, mask))


def test_fused_expert_layout_is_read(checkpoint, tmp_path, assert_logits_match):
    """transformers 5 keeps experts fused in memory (`mlp.experts.gate_up_proj`); such files load too."""
    from safetensors.torch import save_file

    ref_model, path = checkpoint
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(f"{path}/config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    model, variables = hf.load(fused)
    base_model, base_vars = hf.load(path)
    ids, _ = padded_batch(model.config.vocab_size, LENGTHS)
    assert_logits_match(our_logits(model, variables, ids)[0], our_logits(base_model, base_vars, ids)[0], rtol=1e-6)


def test_single_expert_routing_is_refused(checkpoint, tmp_path):
    _, path = checkpoint
    edited = tmp_path / "k1"
    shutil.copytree(path, edited)
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 1}))
    with pytest.raises(hf.HFInteropError, match="num_experts_per_tok=1"):
        hf.load(edited)

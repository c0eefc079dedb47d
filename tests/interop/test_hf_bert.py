"""Parity of t5x_like's encoder-only model with Hugging Face BertForMaskedLM (random weights, no download)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t5x_like.interop import hf  # noqa: E402

LENGTH = 16
ROW_LENGTHS = (16, 11, 5)  # right padding with id 0 after these
CONFIGS = {
    "h2_gelu_types2": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, hidden_act="gelu",
                           num_hidden_layers=2, type_vocab_size=2, vocab_size=120),
    "h4_gelu_new_types1": dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, hidden_act="gelu_new",
                               num_hidden_layers=3, type_vocab_size=1, vocab_size=200),
    "h8_relu_untied": dict(hidden_size=64, num_attention_heads=8, intermediate_size=128, hidden_act="relu",
                           num_hidden_layers=2, type_vocab_size=2, vocab_size=300, tie_word_embeddings=False),
}


def make_hf(arch="BertForMaskedLM", **overrides):
    """A random BERT whose norms and biases are perturbed, so a mis-mapped one cannot hide as 1 or 0."""
    kwargs = dict(max_position_embeddings=32, layer_norm_eps=1e-12)
    kwargs.update(overrides)
    model = getattr(transformers, arch)(transformers.BertConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def make_batch(vocab_size, type_vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (len(ROW_LENGTHS), LENGTH)).astype(np.int32)
    types = np.zeros_like(ids)
    for row, n in enumerate(ROW_LENGTHS):
        ids[row, n:] = 0
        if type_vocab_size > 1:
            types[row, n // 2:n] = 1  # a "sentence B" in the second half
    return ids, types


def hf_logits(model, ids, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != 0),
                    token_type_ids=torch.tensor(types, dtype=torch.long))
    return out.logits.numpy()


def our_logits(model, variables, ids, types):
    return np.asarray(model.compute_logits(variables, {"encoder_input_tokens": ids, "encoder_token_types": types}))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(HF config kwargs, checkpoint folder, batch, HF logits), built once per config."""
    kwargs = CONFIGS[request.param]
    torch.manual_seed(len(request.param))
    model = make_hf(**kwargs)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path, safe_serialization=True)
    ids, types = make_batch(kwargs["vocab_size"], kwargs["type_vocab_size"])
    return kwargs, path, (ids, types), hf_logits(model, ids, types)


def test_import_matches_hf(case, assert_logits_match, relative_error):
    kwargs, path, (ids, types), ref = case
    model, variables = hf.load(path)
    cfg = model.config
    assert (cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.num_layers) == (
        kwargs["num_attention_heads"], kwargs["hidden_size"] // kwargs["num_attention_heads"],
        kwargs["intermediate_size"], kwargs["num_hidden_layers"])
    assert cfg.tie_embeddings == kwargs.get("tie_word_embeddings", True)
    ours = our_logits(model, variables, ids, types)
    mask = ids != 0
    print(f"relative error {relative_error(ours, ref, mask):.3g}")
    assert_logits_match(ours, ref, mask)


def test_scanned_import_matches_unscanned(case):
    _, path, (ids, types), _ = case
    model, variables = hf.load(path)
    scanned, scanned_vars = hf.load(path, scan_layers=True)
    assert "layers" in scanned_vars["params"]["encoder"]
    np.testing.assert_allclose(our_logits(scanned, scanned_vars, ids, types),
                               our_logits(model, variables, ids, types), rtol=1e-5, atol=1e-6)


def test_export_round_trip(case, tmp_path, assert_logits_match):
    _, path, (ids, types), ref = case
    model, variables = hf.load(path)
    first = our_logits(model, variables, ids, types)
    out = str(tmp_path / "exported")
    hf.save(model, variables, out)

    reloaded = transformers.BertForMaskedLM.from_pretrained(out).eval()
    assert_logits_match(hf_logits(reloaded, ids, types), ref, ids != 0)
    model2, variables2 = hf.load(out)
    assert model2.config == model.config
    np.testing.assert_array_equal(our_logits(model2, variables2, ids, types), first)


def test_scanned_model_exports(tmp_path, save_hf, assert_logits_match):
    ref_model = make_hf(**CONFIGS["h2_gelu_types2"])
    model, variables = hf.load(save_hf(ref_model, tmp_path / "src"), scan_layers=True)
    hf.save(model, variables, str(tmp_path / "out"))
    ids, types = make_batch(120, 2)
    reloaded = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "out")).eval()
    assert_logits_match(hf_logits(reloaded, ids, types), hf_logits(ref_model, ids, types), ids != 0)


def test_pretraining_checkpoint_ignores_nsp_head(tmp_path, save_hf, assert_logits_match):
    kwargs = CONFIGS["h2_gelu_types2"]
    pretrain = make_hf("BertForPreTraining", **kwargs)
    path = save_hf(pretrain, tmp_path / "pretrain")
    model, variables = hf.load(path)
    ids, types = make_batch(kwargs["vocab_size"], 2)
    with torch.no_grad():
        ref = pretrain(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(ids != 0),
                       token_type_ids=torch.tensor(types, dtype=torch.long)).prediction_logits.numpy()
    assert_logits_match(our_logits(model, variables, ids, types), ref, ids != 0)


def test_encoder_without_mlm_head_is_refused(tmp_path, save_hf):
    path = save_hf(transformers.BertModel(transformers.BertConfig(**CONFIGS["h2_gelu_types2"])), tmp_path / "m")
    with pytest.raises(hf.HFInteropError, match="unsupported Hugging Face architecture"):
        hf.load(path)
    # Without `architectures` the model type picks BERT, and the missing head is named.
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    del config["architectures"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.HFInteropError, match="missing weight"):
        hf.load(path)


def test_relative_positions_are_refused(tmp_path, save_hf):
    path = save_hf(make_hf(**CONFIGS["h2_gelu_types2"]), tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["position_embedding_type"] = "relative_key"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.HFInteropError, match="position_embedding_type='relative_key'"):
        hf.load(path)


def test_non_bert_encoder_export_is_refused(tmp_path):
    from t5x_like.models import EncoderOnlyConfig, model_for_config
    import jax

    cfg = EncoderOnlyConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, mlp_dim=32, num_layers=1,
                            norm_type="rms", use_bias=False)
    model = model_for_config(cfg)
    with pytest.raises(hf.HFInteropError, match="norm_type='rms'.*use_bias=False"):
        hf.save(model, model.init_variables(jax.random.key(0)), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

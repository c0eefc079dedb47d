"""T5 import/export against transformers' T5ForConditionalGeneration (random weights, float32, no download).

Sequences are longer than the exact relative-position buckets so the logarithmic buckets and the
max-distance clamp are exercised, and batches hold padded encoder and target rows.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from t5x_like.interop import hf  # noqa: E402
from t5x_like.interop.hf_t5 import config_from_hf, config_to_hf  # noqa: E402
from t5x_like.models import EncoderDecoderConfig, model_for_config  # noqa: E402

# name -> (T5Config fields, how the output head is stored, expected (tie_embeddings, scale_tied_logits))
CASES = {
    # T5 v1.0: ReLU, head tied to the embedding and scaled by d_model**-0.5.
    "v1_0": (dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                  feed_forward_proj="relu", relative_attention_num_buckets=32,
                  relative_attention_max_distance=128), "tied", (True, True)),
    # v1.1 as transformers 5 builds it from tie_word_embeddings=False: tied but unscaled.
    "v1_1_tied": (dict(d_model=48, d_kv=8, num_heads=6, d_ff=96, num_layers=2, num_decoder_layers=3,
                       feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
                       relative_attention_max_distance=64, tie_word_embeddings=False), "tied", (True, False)),
    # v1.1 with its own lm_head as transformers 5 saves it (config.json still says tied).
    "v1_1_untied": (dict(d_model=32, d_kv=12, num_heads=2, d_ff=48, num_layers=3, num_decoder_layers=2,
                         feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                         relative_attention_max_distance=20, tie_word_embeddings=False), "untied", (False, False)),
    # As transformers 4 saved v1.1 (tie_word_embeddings=false, separate lm_head), with SwiGLU.
    "v4_silu": (dict(d_model=40, d_kv=6, num_heads=5, d_ff=56, num_layers=1, num_decoder_layers=2,
                     feed_forward_proj="gated-silu", relative_attention_num_buckets=32,
                     relative_attention_max_distance=128), "v4_untied", (False, False)),
}
VOCAB = 160


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab, (3, 40))
    enc[1, 25:] = 0
    enc[2, 33:] = 0
    tgt = rng.integers(2, vocab, (3, 30))
    tgt[0, 18:] = 0
    tgt[2, 27:] = 0
    dec = np.pad(tgt[:, :-1], ((0, 0), (1, 0)))
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt}


def _logits(model, variables, batch):
    return np.asarray(jax.jit(model.compute_logits)(variables, batch))  # jit: compiles faster than eager runs


def _hf_logits(model, batch):
    t = {k: torch.tensor(v) for k, v in batch.items()}
    # Input position i is real exactly when target i is: the 0 BOS at position 0 is real, so the
    # decoder mask comes from the targets, not from the inputs.
    with torch.no_grad():
        return model(input_ids=t["encoder_input_tokens"], attention_mask=t["encoder_input_tokens"] != 0,
                     decoder_input_ids=t["decoder_input_tokens"],
                     decoder_attention_mask=t["decoder_target_tokens"] != 0).logits.numpy()


def _make_checkpoint(fields, head, path):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=VOCAB, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # initialised to ones, which would hide a mix-up of norms
                p.uniform_(0.5, 1.5)
        if head == "untied":
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.save_pretrained(str(path), safe_serialization=True)
    if head == "v4_untied":
        weights = load_file(os.path.join(path, "model.safetensors"))
        weights["lm_head.weight"] = np.random.default_rng(1).normal(size=(VOCAB, fields["d_model"])).astype(np.float32)
        save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config.pop("scale_decoder_outputs")
        config["tie_word_embeddings"] = False
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    # The reference is what transformers itself reads back from disk.
    return transformers.T5ForConditionalGeneration.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    fields, head, expected = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf_model = _make_checkpoint(fields, head, path)
    batch = _batch(VOCAB)
    model, variables = hf.load(path)
    return dict(name=request.param, path=str(path), hf_model=hf_model, batch=batch, ref=_hf_logits(hf_model, batch),
                model=model, variables=variables, ours=_logits(model, variables, batch),
                mask=batch["decoder_target_tokens"] != 0, expected=expected, fields=fields)


def test_config(case):
    cfg, f = case["model"].config, case["fields"]
    assert (cfg.tie_embeddings, cfg.scale_tied_logits) == case["expected"]
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (f["num_layers"], f["num_decoder_layers"])
    assert (cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (f["num_heads"], f["d_kv"], f["d_ff"])
    assert (cfg.relative_num_buckets, cfg.relative_max_distance) == (
        f["relative_attention_num_buckets"], f["relative_attention_max_distance"])
    assert not cfg.scale_attention_scores and cfg.position_embedding == "relative"


def test_logits_match(case, assert_logits_match):
    assert_logits_match(case["ours"], case["ref"], case["mask"])


def test_scan_layers_match(case, assert_logits_match):
    model, variables = hf.load(case["path"], scan_layers=True)
    assert "layers" in variables["params"]["encoder"]
    assert_logits_match(_logits(model, variables, case["batch"]), case["ours"], case["mask"], rtol=1e-5)


def test_round_trip(case, tmp_path, assert_logits_match):
    out = tmp_path / "exported"
    hf.save(case["model"], case["variables"], out)
    # The same weight names transformers writes itself, and nothing missing or unexpected on load.
    assert set(load_file(out / "model.safetensors")) == set(load_file(os.path.join(case["path"], "model.safetensors")))
    hf_model, info = transformers.T5ForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert_logits_match(_hf_logits(hf_model.eval(), case["batch"]), case["ref"], case["mask"])

    model, variables = hf.load(out)
    assert model.config == case["model"].config
    np.testing.assert_array_equal(_logits(model, variables, case["batch"]), case["ours"])


@pytest.mark.parametrize("fields", [
    # A t5x_like-native model: scores scaled by 1/sqrt(head_dim) (folded into q on export), a tied
    # unscaled head, exact-GELU gating, and scanned layers.
    dict(mlp_activations=("gelu", "linear"), scale_attention_scores=True, tie_embeddings=True,
         scale_tied_logits=False, scan_layers=True),
    dict(mlp_activations=("relu",), scale_attention_scores=False, tie_embeddings=False,
         relative_num_buckets=16, relative_max_distance=40),
], ids=["native_tied", "native_untied"])
def test_export_native_model(fields, tmp_path, assert_logits_match):
    cfg = EncoderDecoderConfig(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=16, mlp_dim=64,
                               num_encoder_layers=2, num_decoder_layers=1, **fields)
    model = model_for_config(cfg)
    batch = _batch(VOCAB, seed=1)
    variables = model.init_variables(jax.random.key(1), batch)
    hf.save(model, variables, tmp_path)
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    mask = batch["decoder_target_tokens"] != 0
    assert_logits_match(_hf_logits(hf_model, batch), _logits(model, variables, batch), mask)


@pytest.mark.parametrize("proj,acts", [
    ("relu", ("relu",)), ("gelu", ("gelu",)), ("gelu_new", ("gelu_tanh",)), ("gated-gelu", ("gelu_tanh", "linear")),
    ("gated-gelu_python", ("gelu", "linear")), ("gated-silu", ("silu", "linear")), ("gated-relu", ("relu", "linear")),
])
def test_feed_forward_proj(proj, acts):
    assert config_from_hf({"feed_forward_proj": proj}).mlp_activations == acts
    exported = config_to_hf(config_from_hf({"feed_forward_proj": proj}))
    assert config_from_hf(exported).mlp_activations == acts
    transformers.T5Config(**{k: v for k, v in exported.items() if k != "architectures"})  # transformers accepts it

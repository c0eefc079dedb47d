"""peft LoRA adapters <-> ours (interop/peft.py), against real `peft` on tiny random HF models (no download):
peft's adapters imported give peft's logits, ours exported load in peft with our logits, and adapters
of another base model are refused."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from t5x_like.errors import UserError, user_message  # noqa: E402
from t5x_like.interop import hf  # noqa: E402
from t5x_like.interop.peft import load_adapters, save_adapters  # noqa: E402
from t5x_like.layers.lora import LoraConfig  # noqa: E402

from causal_lm_parity import hf_logits, padded_batch  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T5 = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1, num_decoder_layers=1,
          feed_forward_proj="relu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
          decoder_start_token_id=0)
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def _peft_folders(hf_model, targets, tmp_path, task_type):
    """Save the base model, wrap it with random (non-zero) peft adapters and save those.
    Returns (base dir, adapter dir, peft model)."""
    base_dir = str(tmp_path / "base")
    hf_model.save_pretrained(base_dir, safe_serialization=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type=task_type)
    peft_model = peft.get_peft_model(hf_model, config).eval()
    adapter_dir = str(tmp_path / "adapters")
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model


def _perturb(params, seed=3):
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: np.asarray(v) + (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                                         if k[-1] in ("lora_a", "lora_b") else v for k, v in flat.items()})


def _check_round_trip(model, lora_model, params, lora_config, tmp_path):
    """Exported then imported adapters are the same leaves (and the same config)."""
    again, again_config = load_adapters(tmp_path, model, params)
    assert again_config.rank == lora_config.rank and again_config.scale == lora_config.scale
    flat, want = traverse_util.flatten_dict(again), traverse_util.flatten_dict(params)
    assert flat.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(flat[k], want[k], rtol=1e-6, atol=1e-7, err_msg="/".join(k))


def test_llama_import_and_export(tmp_path, assert_logits_match, relative_error):
    base_hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    base_dir, adapter_dir, peft_model = _peft_folders(base_hf, LLAMA_TARGETS, tmp_path, "CAUSAL_LM")
    ids, mask = padded_batch(LLAMA["vocab_size"], (12, 7))

    # (a) peft's adapters on our import of the base model give peft's logits.
    model, variables = hf.load(base_dir)
    params, lora_config = load_adapters(adapter_dir, model, variables["params"])
    assert (lora_config.rank, lora_config.scale, lora_config.targets) == (4, 2.0, "all-linear")
    lora_model = type(model)(model.config, lora=lora_config)
    logits = jax.jit(lora_model.compute_logits)
    ours = np.asarray(logits({"params": params}, {"decoder_input_tokens": ids}))
    assert_logits_match(ours, hf_logits(peft_model, ids, mask), mask)
    with peft_model.disable_adapter():
        assert relative_error(ours, hf_logits(peft_model, ids, mask), mask) > 1e-2  # the adapters matter

    # (b) our (changed) adapters exported load in peft with our logits.
    changed = _perturb(params)
    out = tmp_path / "exported"
    save_adapters(out, lora_model, changed, lora_config, base_model_name_or_path=base_dir)
    with open(out / "adapter_config.json") as f:
        written = json.load(f)
    assert written["task_type"] == "CAUSAL_LM" and sorted(written["target_modules"]) == sorted(LLAMA_TARGETS)
    reloaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
    ours = np.asarray(logits({"params": changed}, {"decoder_input_tokens": ids}))
    assert_logits_match(ours, hf_logits(reloaded, ids, mask), mask)
    _check_round_trip(model, lora_model, changed, lora_config, out)

    # Scanned layers: the same adapters, stacked.
    scanned, scanned_vars = hf.load(base_dir, scan_layers=True)
    stacked, _ = load_adapters(out, scanned, scanned_vars)
    assert stacked["params"]["decoder"]["layers"]["mlp"]["wo"]["lora_b"].shape == (2, 4, 32)
    np.testing.assert_allclose(np.asarray(stacked["params"]["decoder"]["layers"]["mlp"]["wo"]["lora_b"][1]),
                               changed["decoder"]["layers_1"]["mlp"]["wo"]["lora_b"], rtol=1e-6)


def _t5_batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab, (2, 12))
    enc[1, 8:] = 0
    tgt = rng.integers(2, vocab, (2, 10))
    tgt[1, 6:] = 0
    return {"encoder_input_tokens": enc, "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
            "decoder_target_tokens": tgt}


def _t5_hf_logits(model, batch):
    t = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        return model(input_ids=t["encoder_input_tokens"], attention_mask=t["encoder_input_tokens"] != 0,
                     decoder_input_ids=t["decoder_input_tokens"],
                     decoder_attention_mask=t["decoder_target_tokens"] != 0).logits.numpy()


def test_t5_import_and_export(tmp_path, assert_logits_match):
    base_hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)).eval()
    base_dir, adapter_dir, peft_model = _peft_folders(base_hf, T5_TARGETS, tmp_path, "SEQ_2_SEQ_LM")
    batch = _t5_batch(T5["vocab_size"])
    mask = batch["decoder_target_tokens"] != 0

    model, variables = hf.load(base_dir)
    assert not model.config.scale_attention_scores  # HF T5 folds the score scale into q's init
    params, lora_config = load_adapters(adapter_dir, model, variables)
    lora_model = type(model)(model.config, lora=lora_config)
    assert set(params["params"]["decoder"]["layers_0"]["cross_attention"]["query"]) == {"kernel", "lora_a", "lora_b"}
    logits = jax.jit(lora_model.compute_logits)
    assert_logits_match(np.asarray(logits(params, batch)), _t5_hf_logits(peft_model, batch), mask)

    changed = {"params": _perturb(params["params"])}
    out = tmp_path / "exported"
    save_adapters(out, lora_model, changed, lora_config)
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["task_type"] == "SEQ_2_SEQ_LM"
    reloaded = peft.PeftModel.from_pretrained(
        transformers.T5ForConditionalGeneration.from_pretrained(base_dir), str(out)).eval()
    assert_logits_match(np.asarray(logits(changed, batch)), _t5_hf_logits(reloaded, batch), mask)
    _check_round_trip(model, lora_model, changed["params"], lora_config, out)


def test_adapters_of_another_base_model_are_refused(tmp_path):
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    small.save_pretrained(str(tmp_path / "small"), safe_serialization=True)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "hidden_size": 48}))
    _, adapter_dir, _ = _peft_folders(wide, ["q_proj", "v_proj"], tmp_path, "CAUSAL_LM")
    model, variables = hf.load(str(tmp_path / "small"))
    with pytest.raises(UserError) as e:
        load_adapters(adapter_dir, model, variables)
    msg = user_message(e.value)
    assert "(4, 48)" in msg and "(4, 32)" in msg and "q_proj.lora_A.weight" in msg and "another base model" in msg
    assert "\n" not in str(e.value)


def test_bad_folders_and_unmappable_kernels(tmp_path):
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    _, adapter_dir, _ = _peft_folders(base, ["q_proj"], tmp_path, "CAUSAL_LM")
    model, variables = hf.load(str(tmp_path / "base"))
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapters(tmp_path / "base", model, variables)
    config_file = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_file) as f:
        config = json.load(f)
    for change, message in (({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "only LoRA"),
                            ({"rank_pattern": {"q_proj": 2}}, "rank_pattern")):
        with open(config_file, "w") as f:
            json.dump({**config, **change}, f)
        with pytest.raises(UserError, match=message):
            load_adapters(adapter_dir, model, variables)
    with open(config_file, "w") as f:
        json.dump({**config, "use_rslora": True}, f)
    _, rs_config = load_adapters(adapter_dir, model, variables)
    assert rs_config.scale == pytest.approx(config["lora_alpha"] / 2.0)  # rsLoRA: alpha / sqrt(r), r = 4
    assert rs_config.targets == r"^(decoder/layers(_\d+)?/self_attention/query)$"

    # GPT-2 fuses q, k and v into one Conv1D weight: our query kernel has no peft module of its own.
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                n_positions=16))
    gpt2.save_pretrained(str(tmp_path / "gpt2"), safe_serialization=True)
    model, variables = hf.load(str(tmp_path / "gpt2"))
    lora_config = LoraConfig(rank=2, targets="query")
    lora_model = type(model)(model.config, lora=lora_config)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), lora_model.param_shapes())
    with pytest.raises(UserError, match="decoder/layers_0/self_attention/query") as e:
        save_adapters(tmp_path / "gpt2_adapters", lora_model, params, lora_config)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no LoRA adapters"):
        save_adapters(tmp_path / "none", model, variables, lora_config)


def test_t5_with_scaled_scores_folds_the_scale_into_b(tmp_path):
    """T5 export folds 1/sqrt(head_dim) into q (HF T5 scales no scores), so q's B is exported scaled."""
    from t5x_like.models import EncoderDecoderConfig, model_for_config
    cfg = EncoderDecoderConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=16, mlp_dim=48, num_encoder_layers=1,
                               num_decoder_layers=1, relative_num_buckets=8, relative_max_distance=16,
                               scale_attention_scores=True)
    lora_config = LoraConfig(rank=2, alpha=4.0, targets="self_attention/(query|value)$")
    lora_model = model_for_config(cfg).__class__(cfg, lora=lora_config)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                    lora_model.param_shapes())
    save_adapters(tmp_path, lora_model, params, lora_config)
    from safetensors.numpy import load_file
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    q_b = weights["base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"]
    ours = params["encoder"]["layers_0"]["self_attention"]["query"]["lora_b"]
    np.testing.assert_allclose(q_b, ours.reshape(2, 64).T * 0.25, rtol=1e-6)
    with open(tmp_path / "adapter_config.json") as f:
        # "q" / "v" would also select the cross-attention's EncDecAttention.q / .v: full module names instead.
        assert sorted(json.load(f)["target_modules"]) == [f"{s}.block.0.layer.0.SelfAttention.{m}"
                                                          for s in ("decoder", "encoder") for m in "qv"]
    _check_round_trip(model_for_config(cfg), lora_model, params, lora_config, tmp_path)


@pytest.mark.slow
def test_cli_import_with_peft_dir_then_export_peft_round_trips(tmp_path):
    """`import_hf --peft_dir` writes a LoRA checkpoint whose model.gin rebuilds the adapters, and
    `export_peft` of that folder writes the same adapter tensors back (what a user runs)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    base_dir, adapter_dir, _ = _peft_folders(hf_model, ["q_proj", "v_proj"], tmp_path, "CAUSAL_LM")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out, back = str(tmp_path / "imported"), str(tmp_path / "exported")
    for args in (["import_hf", f"--hf_dir={base_dir}", f"--peft_dir={adapter_dir}", f"--output_dir={out}"],
                 ["export_peft", f"--run_dir={out}", f"--output_dir={back}"]):
        proc = subprocess.run([sys.executable, "-m", "t5x_like.main", *args], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoraConfig.rank = 4" in open(os.path.join(out, "model.gin")).read()
    want, got = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (adapter_dir, back))
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    config = json.load(open(os.path.join(back, "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

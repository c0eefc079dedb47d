"""DPOLoss (objectives/preference.py): parity with TRL's DPOTrainer formulas on transformers'
log-probabilities, LoRA-DPO with the adapters-off reference, and its one-line errors.

The torch side is TRL's `_compute_loss` arithmetic written out (TRL has no trainer-free loss
function to call): per-row completion log-probs from the shifted logits and completion mask, the
log-ratio difference, the loss per type, rewards = beta x log-ratio, mean over pairs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from t5x_like.models import DecoderOnlyConfig, model_for_config
from t5x_like.objectives.metrics import summarize
from t5x_like.objectives.preference import DPOLoss, PreferenceError, reference_logps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

VOCAB = 128
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
# (prompt length, chosen length, rejected length) of each pair: all different.
PAIRS = [(4, 3, 5), (2, 6, 2), (5, 1, 4)]


def _rows(seed=0):
    """Token ids [2N, W] (right-padded with 0) and the completion mask of TRL's layout."""
    rng = np.random.default_rng(seed)
    seqs, masks = [], []
    for p, c, r in PAIRS:
        prompt = list(rng.integers(1, VOCAB, p))
        for n in (c, r):
            seqs.append(prompt + list(rng.integers(1, VOCAB, n)))
            masks.append([0] * p + [1] * n)
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int64)
    completion = np.zeros((len(seqs), width), np.int64)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)], completion[i, :len(m)] = s, m
    return ids, completion


def _our_batch(ids, completion):
    """The same rows as a decoder batch: targets are the next tokens, weighted on the completion."""
    shift = lambda x: np.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731
    return {"decoder_input_tokens": ids.astype(np.int32), "decoder_target_tokens": shift(ids).astype(np.int32),
            "decoder_loss_weights": shift(completion).astype(np.float32)}


def _torch_logps(model, ids, completion):
    """TRL: log_softmax of the shifted logits at the next tokens, summed over the completion."""
    ids_t = torch.as_tensor(ids)
    attention = torch.as_tensor((ids > 0) | (np.arange(ids.shape[1]) == 0), dtype=torch.long)
    logits = model(input_ids=ids_t, attention_mask=attention).logits[:, :-1]
    per_token = torch.gather(logits.log_softmax(-1), 2, ids_t[:, 1:, None])[..., 0]
    return (per_token * torch.as_tensor(completion[:, 1:], dtype=per_token.dtype)).sum(1)


def _trl_loss(logps, ref_logps, completion, beta, loss_type, label_smoothing, rpo_alpha=0.0):
    chosen_ratio, rejected_ratio = logps[0::2] - ref_logps[0::2], logps[1::2] - ref_logps[1::2]
    z = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    elif loss_type == "ipo":
        lengths = torch.as_tensor(completion.sum(1), dtype=logps.dtype).clamp(min=1.0)
        delta = chosen_ratio / lengths[0::2] - rejected_ratio / lengths[1::2]
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        per_pair = torch.relu(1 - beta * z)
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    extra = {}
    if rpo_alpha:  # TRL's rpo_alpha x the chosen completions' token-mean NLL (per pair: lengths differ here)
        nll = -logps[0::2] / torch.as_tensor(completion[0::2, 1:].sum(1), dtype=logps.dtype)
        per_pair = per_pair + rpo_alpha * nll
        extra["nll_loss"] = nll.detach().mean()
    return per_pair.mean(), {**extra,
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[0::2].detach().mean(), "logps/rejected": logps[1::2].detach().mean()}


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(policy imported into t5x_like: model, params; the torch policy; reference log-probs)."""
    from t5x_like.interop import hf

    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).float().eval()
    torch.manual_seed(1)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).float().eval()
    path = tmp_path_factory.mktemp("hf") / "policy"
    policy.save_pretrained(str(path), safe_serialization=True)
    model, variables = hf.load(str(path))
    ids, completion = _rows()
    with torch.no_grad():
        ref_logps = _torch_logps(reference, ids, completion)
    return model, variables["params"], policy, ref_logps


@pytest.mark.parametrize("loss_type,label_smoothing,rpo_alpha", [
    ("sigmoid", 0.0, 0.0), ("sigmoid", 0.2, 0.0), ("ipo", 0.0, 0.0), ("hinge", 0.0, 0.0), ("sigmoid", 0.0, 1.0)])
def test_matches_trl_formula_on_transformers_logps(hf_pair, loss_type, label_smoothing, rpo_alpha):
    model, params, policy, ref_logps = hf_pair
    beta = 0.5 if loss_type == "hinge" else 0.1  # hinge: beta z well inside (-inf, 1) so the gradient is not zero
    ids, completion = _rows()
    policy.zero_grad()
    expected, metrics = _trl_loss(_torch_logps(policy, ids, completion), ref_logps, completion, beta, loss_type,
                                  label_smoothing, rpo_alpha)
    expected.backward()
    torch_grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in policy.parameters()
                                           if p.grad is not None)))

    batch = {**_our_batch(ids, completion), "reference_logps": ref_logps.numpy().astype(np.float32)}
    loss = DPOLoss(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reference="features",
                   rpo_alpha=rpo_alpha)

    def mean_loss(p):
        sums = loss(model, p, batch)
        return sums["loss"] / sums["tokens"], sums

    grads, sums = jax.grad(mean_loss, has_aux=True)(params)
    assert float(sums["tokens"]) == len(PAIRS)
    ours = summarize(jax.device_get(sums))
    np.testing.assert_allclose(ours["loss"], float(expected.detach()), rtol=1e-4, atol=1e-4)
    for key, value in metrics.items():
        np.testing.assert_allclose(ours[key], float(value), rtol=1e-4, atol=1e-4, err_msg=key)
    assert torch_grad_norm > 1e-3
    np.testing.assert_allclose(float(optax.global_norm(grads)), torch_grad_norm, rtol=1e-4, atol=1e-4)


def test_zero_padding_rows_contribute_nothing(hf_pair):
    model, params, _, ref_logps = hf_pair
    ids, completion = _rows()
    batch = {**_our_batch(ids, completion), "reference_logps": ref_logps.numpy().astype(np.float32)}
    padded = {k: np.concatenate([v, np.zeros((2,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    loss = DPOLoss(reference="features")
    a, b = jax.device_get(loss(model, params, batch)), jax.device_get(loss(model, params, padded))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # the helper gives the same row log-probs as the loss's own policy pass
    ours = reference_logps(model, params, batch)
    np.testing.assert_allclose(float(a["logps/chosen"]), float(jnp.sum(ours[0::2])), rtol=1e-6)


VOCAB_TINY = 64


def _tiny(lora):
    from t5x_like.layers.lora import LoraConfig

    config = DecoderOnlyConfig(vocab_size=VOCAB_TINY, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1,
                               tie_embeddings=False)
    model = model_for_config(config)
    return type(model)(config, lora=LoraConfig(rank=4, targets="all-linear")) if lora else model


def _tiny_batch():
    ids, completion = _rows(seed=3)
    return _our_batch(np.where(ids > 0, ids % (VOCAB_TINY - 1) + 1, 0), completion)


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_lora_dpo_starts_at_log2_and_trains_only_adapters():
    from t5x_like.training import optimizers
    from t5x_like.training.steps import train_step
    from t5x_like.training.train_state import TrainState
    from t5x_like.training.trainable import trainable_subset

    model, batch = _tiny(lora=True), _tiny_batch()
    loss = DPOLoss(beta=0.1)  # reference="adapters_off"
    adam = optimizers.Optimizer(optax.adam(1e-2), optax.constant_schedule(1e-2))
    opt = trainable_subset(adam, model.trainable_params_regex())
    state = TrainState.create(model, opt, jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})
    step = jax.jit(functools.partial(train_step, model, opt, loss=loss, dropout=False))
    new, metrics = step(state, batch)
    assert float(metrics["tokens"]) == len(PAIRS)
    # lora_b = 0 at the start: policy == reference, so the loss is log 2 and every reward 0
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["grad_norm"]) > 0
    b, a = _flat(state.params), _flat(new.params)
    changed = [p for p in b if not np.array_equal(a[p], b[p])]
    assert changed and all(p.endswith("/lora_b") for p in changed)  # lora_b first: its gradient is A's
    _, after = step(new, batch)
    assert float(after["loss"]) < np.log(2.0)  # the step moved the policy toward the chosen rows


def test_adapters_off_without_lora_is_a_one_line_error():
    model, batch = _tiny(lora=False), _tiny_batch()
    params = model.param_shapes()  # abstract: the errors come while tracing, before any forward pass
    with pytest.raises(PreferenceError, match="needs a model with LoRA adapters") as info:
        jax.eval_shape(lambda p: DPOLoss()(model, p, batch), params)
    assert "\n" not in str(info.value) and "reference='features'" in str(info.value)
    with pytest.raises(PreferenceError, match="reference_logps"):
        jax.eval_shape(lambda p: DPOLoss(reference="features")(model, p, batch), params)
    with pytest.raises(PreferenceError, match="loss_type"):
        DPOLoss(loss_type="kto")


def test_microbatches_keep_pairs_whole():
    """With gradient accumulation the step splits rows into microbatches; a pair's two rows must
    land in the same one (DPOLoss.rows_per_example), so 2 microbatches give 1's sums and update."""
    from t5x_like.training import optimizers
    from t5x_like.training.steps import train_step
    from t5x_like.training.train_state import TrainState
    from t5x_like.training.trainable import trainable_subset

    model, batch = _tiny(lora=True), _tiny_batch()
    batch = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in batch.items()}  # + a padding pair: 8 rows
    sgd = trainable_subset(optimizers.Optimizer(optax.sgd(0.5), optax.constant_schedule(0.5)),
                           model.trainable_params_regex())
    state = TrainState.create(model, sgd, jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})
    state, _ = jax.jit(functools.partial(train_step, model, sgd, loss=DPOLoss(), dropout=False))(state, batch)
    out = {}
    for k in (1, 2):
        step = jax.jit(functools.partial(train_step, model, sgd, loss=DPOLoss(), dropout=False, num_microbatches=k))
        out[k] = step(state, batch)
    (one, m1), (two, m2) = out[1], out[2]
    for key in ("loss", "tokens", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    for path, value in _flat(one.params).items():
        np.testing.assert_allclose(_flat(two.params)[path], value, rtol=1e-5, atol=1e-7, err_msg=path)

"""objectives/rl.py against a direct float64 numpy computation on a fixed rollout: GRPO's group
advantages, PPO's reward shaping, GAE, whitening, the clipped policy and value losses, the k1 / k3
KL estimators and the entropy.

The rollout is fixed arrays (logits, targets, masks with different completion lengths, rewards,
old / reference log-probs, values); the loss classes read them through a stub model that returns
those logits (or hidden states and an output head, for PPO's value head)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.objectives import rl
from t5x_like.objectives.fused_cross_entropy import OutputHead

jax.config.update("jax_enable_x64", False)
ROWS, LEN, VOCAB, EMBED, G = 6, 7, 11, 5, 3
# Each row: (first completion position, completion length); prompt positions and padding have weight 0.
SPANS = [(2, 4), (1, 6), (3, 1), (2, 5), (0, 3), (4, 3)]
TOL = dict(rtol=2e-5, atol=2e-6)


def _mask():
    m = np.zeros((ROWS, LEN))
    for i, (s, n) in enumerate(SPANS):
        m[i, s:s + n] = 1
    return m


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(ROWS, LEN, EMBED))
    weight = rng.normal(size=(EMBED, VOCAB))
    logits = hidden @ weight
    targets = rng.integers(1, VOCAB, (ROWS, LEN))
    logp = _np_logp(logits, targets, 1.0)
    return dict(hidden=hidden, weight=weight, logits=logits, targets=targets, mask=_mask(),
                rewards=np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0]),
                old_logp=logp + rng.normal(scale=0.3, size=logp.shape),
                ref_logp=logp + rng.normal(scale=0.5, size=logp.shape),
                values=rng.normal(size=(ROWS, LEN)), returns=rng.normal(size=(ROWS, LEN)),
                advantages_tok=rng.normal(size=(ROWS, LEN)),
                head_kernel=rng.normal(size=(EMBED, 1)), head_bias=rng.normal(size=(1,)))


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_logp(logits, targets, temperature):
    lp = _np_log_softmax(logits / temperature)
    return np.take_along_axis(lp, targets[..., None], -1)[..., 0]


def _np_entropy(logits, temperature):
    lp = _np_log_softmax(logits / temperature)
    return -(np.exp(lp) * lp).sum(-1)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------- per-token pieces


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_and_entropy_match_numpy(rollout, temperature):
    logp, ent = rl.token_logps_and_entropy(_f32(rollout["logits"]), jnp.asarray(rollout["targets"]), temperature)
    np.testing.assert_allclose(logp, _np_logp(rollout["logits"], rollout["targets"], temperature), **TOL)
    np.testing.assert_allclose(ent, _np_entropy(rollout["logits"], temperature), **TOL)


def test_kl_estimators(rollout):
    lp, ref = rollout["old_logp"], rollout["ref_logp"]
    np.testing.assert_allclose(rl.kl_estimate(_f32(lp), _f32(ref), "k1"), lp - ref, **TOL)
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    np.testing.assert_allclose(rl.kl_estimate(_f32(lp), _f32(ref), "k3"), k3, **TOL)
    assert (k3 >= 0).all()
    with pytest.raises(rl.RLConfigError, match="k2"):
        rl.kl_estimate(_f32(lp), _f32(ref), "k2")


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages(rollout, scale):
    r = rollout["rewards"]
    want = []
    for g in r.reshape(-1, G):
        centred = g - g.mean()
        want.extend(centred / (np.std(g, ddof=1) + 1e-4) if scale else centred)  # torch's .std() is unbiased
    np.testing.assert_allclose(rl.grpo_advantages(_f32(r), G, scale), want, **TOL)
    # A group of equal rewards has no signal: advantage 0, not a division by zero.
    assert np.all(np.asarray(rl.grpo_advantages(_f32([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), G, scale))[:3] == 0)
    want_std = np.mean([np.std(g, ddof=1) for g in r.reshape(-1, G)])
    np.testing.assert_allclose(rl.group_reward_std(_f32(r), G), want_std, **TOL)


def _np_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE over each row's completion tokens only (the value after the last one is 0)."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        pos = np.flatnonzero(mask[i])
        last = 0.0
        for j in reversed(range(len(pos))):
            t = pos[j]
            next_v = values[i, pos[j + 1]] if j + 1 < len(pos) else 0.0
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
        ret[i, pos] = adv[i, pos] + values[i, pos]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae(rollout, gamma, lam):
    m = rollout["mask"]
    tok_rewards = rollout["advantages_tok"] * m
    adv, ret = rl.gae(_f32(tok_rewards), _f32(rollout["values"]), _f32(m), gamma, lam)
    want_adv, want_ret = _np_gae(tok_rewards, rollout["values"], m, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_reward_shaping_and_advantages(rollout, estimator):
    m, lp, ref, scores = rollout["mask"], rollout["old_logp"], rollout["ref_logp"], rollout["rewards"]
    kl = (lp - ref) if estimator == "k1" else np.exp(ref - lp) - (ref - lp) - 1
    want = -0.05 * kl * m
    for i, (s, n) in enumerate(SPANS):
        want[i, s + n - 1] += scores[i]  # the score at the last completion token
    got = rl.ppo_token_rewards(_f32(scores), _f32(lp), _f32(ref), _f32(m), 0.05, estimator)
    np.testing.assert_allclose(got, want, **TOL)

    loss = rl.PPOLoss(kl_coef=0.05, kl_estimator=estimator, gamma=0.99, lam=0.9)
    adv, ret, _ = loss.advantages_and_returns(_f32(scores), _f32(lp), _f32(ref), _f32(rollout["values"]), _f32(m))
    raw, want_ret = _np_gae(want, rollout["values"] * m, m, 0.99, 0.9)
    sel = raw[m > 0]
    want_adv = (raw - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8) * m  # TRL's masked_whiten
    np.testing.assert_allclose(adv, want_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the losses through a stub model


class StubModel:
    """Returns the rollout's fixed logits (or hidden states and their output head)."""

    def __init__(self, r):
        self.r = r

    def targets_and_weights(self, batch):
        return jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"], jnp.float32)

    def forward(self, params, batch, dropout_rng=None, return_hidden=False):
        return (_f32(self.r["hidden"]) if return_hidden else _f32(self.r["logits"])), {}

    def output_head(self, params):
        return OutputHead(weight=_f32(self.r["weight"]))

    def fold_aux_losses(self, sums, aux):
        return sums


def _np_surrogate(logp, old, adv, lo, hi):
    ratio = np.exp(logp - old)
    a, b = ratio * adv, np.clip(ratio, 1 - lo, 1 + hi) * adv
    return -np.minimum(a, b), (b < a).astype(float)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high", [(0.04, 0.2), (0.0, 0.28)])
def test_grpo_loss(rollout, loss_type, beta, eps_high):
    r, m = rollout, rollout["mask"]
    adv = np.asarray(rl.grpo_advantages(_f32(r["rewards"]), G))
    batch = {"targets": r["targets"], "weights": m, "old_logps": r["old_logp"], "ref_logps": r["ref_logp"],
             "advantages": adv}
    loss = rl.GRPOLoss(beta=beta, epsilon_high=eps_high, loss_type=loss_type, temperature=0.9)
    sums = loss(StubModel(r), {rl.POLICY: {}}, batch)

    logp = _np_logp(r["logits"], r["targets"], 0.9)
    per_token, clipped = _np_surrogate(logp, r["old_logp"], adv[:, None], 0.2, eps_high)
    k3 = np.exp(r["ref_logp"] - logp) - (r["ref_logp"] - logp) - 1
    per_token = per_token + beta * k3
    if loss_type == "grpo":
        want_loss, want_tokens = ((per_token * m).sum(1) / m.sum(1)).sum(), ROWS
    elif loss_type == "bnpo":
        want_loss, want_tokens = (per_token * m).sum(), m.sum()
    else:
        want_loss, want_tokens = (per_token * m).sum() / LEN, ROWS
    np.testing.assert_allclose(sums["loss"], want_loss, **TOL)
    np.testing.assert_allclose(sums["tokens"], want_tokens)
    np.testing.assert_allclose(sums["completion_tokens"], m.sum())
    np.testing.assert_allclose(sums["kl"], (k3 * m).sum(), **TOL)
    np.testing.assert_allclose(sums["entropy"], (_np_entropy(r["logits"], 0.9) * m).sum(), **TOL)
    np.testing.assert_allclose(sums["clipped"], (clipped * m).sum())
    assert 0 < float(sums["clipped"]) < m.sum()  # the fixture exercises both sides of the clip


def test_grpo_loss_gradient_matches_numpy(rollout):
    """d loss / d logits of the "bnpo" loss against central differences of the numpy loss."""
    r, m = rollout, rollout["mask"]
    adv = np.asarray(rl.grpo_advantages(_f32(r["rewards"]), G))
    batch = {"targets": r["targets"], "weights": m, "old_logps": r["old_logp"], "ref_logps": r["ref_logp"],
             "advantages": adv}
    loss = rl.GRPOLoss(beta=0.04, loss_type="bnpo")

    class LogitsModel(StubModel):
        def forward(self, params, batch, dropout_rng=None, return_hidden=False):
            return params["logits"], {}

    grad = jax.grad(lambda lg: loss(LogitsModel(r), {rl.POLICY: {"logits": lg}}, batch)["loss"])(_f32(r["logits"]))

    def np_loss(logits):
        logp = _np_logp(logits, r["targets"], 1.0)
        pt, _ = _np_surrogate(logp, r["old_logp"], adv[:, None], 0.2, 0.2)
        pt = pt + 0.04 * (np.exp(r["ref_logp"] - logp) - (r["ref_logp"] - logp) - 1)
        return (pt * m).sum()

    rng = np.random.default_rng(1)
    for _ in range(6):
        i, j, k = rng.integers(0, ROWS), rng.integers(0, LEN), rng.integers(0, VOCAB)
        e = np.zeros_like(r["logits"])
        e[i, j, k] = 1e-5
        numeric = (np_loss(r["logits"] + e) - np_loss(r["logits"] - e)) / 2e-5
        np.testing.assert_allclose(grad[i, j, k], numeric, rtol=1e-3, atol=1e-5)


def test_ppo_loss(rollout):
    r, m = rollout, rollout["mask"]
    batch = {"targets": r["targets"], "weights": m, "old_logps": r["old_logp"], "ref_logps": r["ref_logp"],
             "advantages": r["advantages_tok"], "values": r["values"], "returns": r["returns"]}
    params = {rl.POLICY: {}, rl.VALUE_HEAD: {"dense": {"kernel": _f32(r["head_kernel"]), "bias": _f32(r["head_bias"])}}}
    loss = rl.PPOLoss(cliprange=0.2, cliprange_value=0.3, vf_coef=0.1, kl_estimator="k1")
    sums = loss(StubModel(r), params, batch)

    logp = _np_logp(r["logits"], r["targets"], 1.0)
    pg, clipped = _np_surrogate(logp, r["old_logp"], r["advantages_tok"], 0.2, 0.2)
    v = (r["hidden"] @ r["head_kernel"])[..., 0] + r["head_bias"][0]
    v_clip = np.clip(v, r["values"] - 0.3, r["values"] + 0.3)
    a, b = (v - r["returns"]) ** 2, (v_clip - r["returns"]) ** 2
    vf = 0.5 * np.maximum(a, b)
    total = lambda x: (x * m).sum()  # noqa: E731
    np.testing.assert_allclose(sums["loss"], total(pg + 0.1 * vf), **TOL)
    np.testing.assert_allclose(sums["tokens"], m.sum())
    np.testing.assert_allclose(sums["policy_loss"], total(pg), **TOL)
    np.testing.assert_allclose(sums["value_loss"], total(vf), **TOL)
    np.testing.assert_allclose(sums["value_clipped"], total((b > a).astype(float)))
    np.testing.assert_allclose(sums["clipped"], total(clipped))
    np.testing.assert_allclose(sums["approx_kl"], total(0.5 * (logp - r["old_logp"]) ** 2), **TOL)
    np.testing.assert_allclose(sums["kl"], total(logp - r["ref_logp"]), **TOL)
    np.testing.assert_allclose(sums["entropy"], total(_np_entropy(r["logits"], 1.0)), **TOL)
    np.testing.assert_allclose(sums["ratio"], total(np.exp(logp - r["old_logp"])), **TOL)
    assert 0 < float(sums["value_clipped"]) < m.sum() and 0 < float(sums["clipped"]) < m.sum()


def test_logits_from_hidden_matches_the_model_forward():
    """PPO reads logits through the output head on the hidden states (one forward pass for both
    the policy and the value head): the same logits as the model's own forward."""
    from t5x_like.models import DecoderOnlyConfig, model_for_config

    for tie in (False, True):
        cfg = DecoderOnlyConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, mlp_dim=32, num_layers=1,
                                tie_embeddings=tie)
        model = model_for_config(cfg)
        params = model.init_variables(jax.random.key(0))["params"]
        batch = {"decoder_input_tokens": np.arange(12, dtype=np.int32).reshape(2, 6) + 1}
        forward = jax.jit(lambda p, b, h: model.forward(p, b, return_hidden=h)[0], static_argnums=2)
        logits, hidden = forward(params, batch, False), forward(params, batch, True)
        np.testing.assert_allclose(rl.logits_from_hidden(model.output_head(params), hidden), logits,
                                   rtol=1e-5, atol=1e-5)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(rl.RLConfigError, match="loss_type"):
        rl.GRPOLoss(loss_type="sum")
    with pytest.raises(rl.RLConfigError, match="kl_estimator"):
        rl.PPOLoss(kl_estimator="k2")
    with pytest.raises(rl.RLConfigError, match="gamma"):
        rl.PPOLoss(gamma=1.5)

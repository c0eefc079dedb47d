"""Perplexity of a text file named at run time (no hand registration) equals transformers' on the
same tokens; a uniform model has perplexity = vocab size; (input, target) scoring equals transformers'."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t5x_like import evaluation, partitioning  # noqa: E402
from t5x_like.data import iterators  # noqa: E402
from t5x_like.interop import hf  # noqa: E402
from t5x_like.models import DecoderOnlyConfig, model_for_config  # noqa: E402

LENGTHS = {"targets": 48}
TEXT = ["The quick brown fox jumps over the lazy dog.", "Perplexity is exp of the mean NLL.",
        "short", "A longer line of text that will be split across more than one packed row, surely."] * 6


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_text") / "valid.txt"
    path.write_text("\n".join(TEXT) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1) if p.ndim > 1 else None
    path = str(tmp_path_factory.mktemp("llama"))
    ref.save_pretrained(path, safe_serialization=True)
    return (ref, *hf.load(path))


def hf_sums(ref, task):
    """NLL sum and token count with transformers, segment by segment of the packed batches (all of
    them: the last one padded with empty rows, as the Evaluator reads them)."""
    ds = iterators.get_dataset(task, LENGTHS, split="validation", batch_size=8, shuffle=False, seed=0,
                               num_epochs=1, objective="lm", drop_remainder=False)
    nll, tokens = 0.0, 0
    for batch in ds.as_numpy_iterator():
        for i in range(batch["decoder_input_tokens"].shape[0]):
            seg = batch["decoder_segment_ids"][i]
            for s in np.unique(seg[seg > 0]):
                m = seg == s
                ids = torch.as_tensor(batch["decoder_input_tokens"][i][m][None], dtype=torch.long)
                with torch.no_grad():
                    logp = torch.log_softmax(ref(input_ids=ids).logits.double(), -1)[0].numpy()
                tgt, w = batch["decoder_target_tokens"][i][m], batch["decoder_loss_weights"][i][m]
                nll -= float(np.sum(logp[np.arange(len(tgt)), tgt] * w))
                tokens += int(w.sum())
    return nll, tokens


def test_text_file_perplexity_matches_transformers(llama, text_file):
    ref, model, variables = llama
    task = evaluation.text_file_task(text_file, vocabulary="byte")
    evaluator = evaluation.Evaluator(model, task, LENGTHS, batch_size=8, mesh=partitioning.create_mesh(),
                                     max_batches=None)
    ours = evaluator.evaluate(variables["params"])[task]
    nll, tokens = hf_sums(ref, task)
    assert ours["tokens"] == tokens > 0.5 * sum(len(t.encode()) for t in TEXT)
    theirs = float(np.exp(nll / tokens))
    assert abs(ours["perplexity"] - theirs) / theirs < 1e-4, (ours["perplexity"], theirs)


def test_uniform_model_perplexity_is_vocab_size(text_file):
    cfg = DecoderOnlyConfig(vocab_size=384, d_model=16, num_heads=2, head_dim=8, mlp_dim=32, num_layers=1,
                            position_embedding="rotary")
    model = model_for_config(cfg)
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # zero logits
    task = evaluation.text_file_task(text_file, vocabulary="byte")
    evaluator = evaluation.Evaluator(model, task, LENGTHS, batch_size=8, mesh=partitioning.create_mesh(),
                                     max_batches=None)
    ours = evaluator.evaluate(variables["params"])[task]
    assert ours["perplexity"] == pytest.approx(384, rel=1e-5)


def test_missing_text_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.text_file_task(str(tmp_path / "nope.txt"))


def test_score_pairs_match_transformers(llama):
    ref, model, variables = llama
    inputs = [[5, 9, 13], [40], [7, 8, 9, 10, 11]]
    targets = [[20, 21], [30, 31, 32, 33], [50]]
    ours = evaluation.score_pairs(model, variables, inputs, targets, batch_size=2)
    for x, t, got in zip(inputs, targets, ours):
        ids = torch.as_tensor([x + t], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=ids).logits.double(), -1)[0].numpy()
        want = sum(logp[len(x) - 1 + j, tok] for j, tok in enumerate(t))
        assert got == pytest.approx(want, rel=1e-4)


def test_hf_checkpoint_evaluates_with_its_own_sentencepiece_model(llama, text_file, tmp_path):
    """import_hf copies the checkpoint's tokenizer.model; evaluating a text file with it tokenizes
    exactly as that SentencePiece model does, and the perplexity still equals transformers'."""
    import sentencepiece as spm

    from t5x_like import main

    ref, _, _ = llama
    corpus = tmp_path / "spm_train.txt"
    corpus.write_text("\n".join(TEXT * 4) + "\n")
    hf_dir = tmp_path / "hf"
    ref.save_pretrained(str(hf_dir), safe_serialization=True)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(hf_dir / "tokenizer"), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   num_threads=1, minloglevel=2)
    out = tmp_path / "imported"
    assert main.main(["import_hf", f"--hf_dir={hf_dir}", f"--output_dir={out}"]) == 0
    shipped = out / "tokenizer.model"
    assert shipped.read_bytes() == (hf_dir / "tokenizer.model").read_bytes()

    model, variables = hf.load(str(hf_dir))
    task = evaluation.text_file_task(text_file, vocabulary=str(shipped))
    ds = iterators.get_dataset(task, LENGTHS, split="validation", batch_size=8, shuffle=False, seed=0,
                               num_epochs=1, objective="lm", pack=False, drop_remainder=False)
    stream = np.concatenate([row[row > 0] for b in ds.as_numpy_iterator() for row in b["decoder_target_tokens"]])
    sp = spm.SentencePieceProcessor(model_file=str(shipped))
    expected = np.concatenate([sp.encode(line) + [1] for line in TEXT])
    np.testing.assert_array_equal(stream, expected)  # every token, the last partial batch included

    evaluator = evaluation.Evaluator(model, task, LENGTHS, batch_size=8, mesh=partitioning.create_mesh(),
                                     max_batches=None)
    ours = evaluator.evaluate(variables["params"])[task]
    nll, tokens = hf_sums(ref, task)
    assert ours["tokens"] == tokens > 0
    theirs = float(np.exp(nll / tokens))
    assert abs(ours["perplexity"] - theirs) / theirs < 1e-4, (ours["perplexity"], theirs)

"""Imported checkpoints use their own tokenizers: a LLaMA-layout SentencePiece model (unk 0, bos 1,
eos 2, no pad) and a GPT-2 byte-level BPE tokenizer.json encode and decode exactly as transformers'
tokenizers; a text file's perplexity under an imported Llama, each line read as [BOS] + tokens,
equals transformers' `exp(model(ids, labels=ids).loss)`; bad tokenizer paths are one-line errors.
Everything is trained on the fly (nothing is downloaded)."""

import json
import pickle
import random

import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import sentencepiece as spm  # noqa: E402

from t5x_like import evaluation, main, partitioning  # noqa: E402
from t5x_like.data import hf_tokenizer, iterators  # noqa: E402
from t5x_like.data import vocabularies as vocab_lib  # noqa: E402
from t5x_like.errors import UserError, user_message  # noqa: E402
from t5x_like.inference import modes  # noqa: E402
from t5x_like.interop import hf  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog model token perplexity score value return layer weight "
         "text line naïve café").split()
SAMPLE = "The quick fox jumps #over the lazy dog! ZZ model  €€ token\tx, naïve café; 42!!"
LENGTHS = {"targets": 48}


def _lines(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))).capitalize() + rng.choice(".!?,")
            for _ in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama checkpoint folder as Llama ships: tokenizer.model (BPE, byte fallback, identity
    normalisation, unk 0 / bos 1 / eos 2 / no pad), tokenizer_config.json, tokenizer.json, weights."""
    root = tmp_path_factory.mktemp("llama_tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_lines(400)) + "\n")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(hf_dir / "tokenizer"), vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    (hf_dir / "tokenizer.vocab").unlink()
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "tokenizer_class": "LlamaTokenizer"}))
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))  # converted from tokenizer.model
    ref_tok.backend_tokenizer.save(str(hf_dir / "tokenizer.json"))
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1) if p.ndim > 1 else None
    ref.save_pretrained(str(hf_dir), safe_serialization=True)
    return hf_dir, ref_tok, ref


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer.json: "!" is id 0 (a real token), <|endoftext|> last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("gpt2_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_lines(400, seed=1), trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "add_prefix_space": False, "tokenizer_class": "GPT2Tokenizer"}))
    ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"),
                                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert tok.token_to_id("!") == 0 and ref_tok.eos_token_id == tok.get_vocab_size() - 1
    return root, ref_tok


def test_llama_layout_sentencepiece_matches_transformers(llama_dir):
    hf_dir, ref_tok, _ = llama_dir
    vocab = vocab_lib.vocabulary_from_file(str(hf_dir / "tokenizer.model"))
    assert isinstance(vocab, hf_tokenizer.SentencePieceModelVocabulary)
    assert (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.tokenizer_pad_id, vocab.pad_id) == (0, 1, 2, None, 0)
    assert vocab.add_bos and not vocab.add_eos and not vocab.zero_is_padding
    assert vocab.vocab_size == 400 and vocab.extra_ids == 0  # the model's own ids, no sentinels
    ids = list(vocab.encode(SAMPLE))
    assert ids == ref_tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ref_tok(SAMPLE)["input_ids"] == [1] + ids  # transformers prepends BOS 1, adds no EOS
    assert vocab.decode(ids) == ref_tok.decode(ids) == SAMPLE
    assert list(vocab.encode_tf(tf.constant(SAMPLE)).numpy()) == ids
    # seqio appends the model's own EOS (2), and decode stops there.
    assert vocab.decode(ids + [2, 77, 78]) == SAMPLE
    assert vocab_lib.leading_bos_id(vocab) == 1 and modes.resolve_bos_id(vocab) == 1 and modes.eos_id_of(vocab) == 2

    # The folder resolves to its tokenizer.json (what AutoTokenizer loads), with the same ids and BOS.
    name = vocab_lib.vocabulary_name(str(hf_dir))
    folder_vocab = vocab_lib.get_vocabulary(name)
    assert isinstance(folder_vocab, hf_tokenizer.HFTokenizerVocabulary)
    assert folder_vocab.path == str(hf_dir / "tokenizer.json") and vocab_lib.get_vocabulary(str(hf_dir)) is folder_vocab
    assert list(folder_vocab.encode(SAMPLE)) == ids and (folder_vocab.bos_id, folder_vocab.eos_id) == (1, 2)
    assert folder_vocab.add_bos and folder_vocab.unk_id == 0


def test_gpt2_tokenizer_json_matches_transformers_in_python_and_tf(gpt2_dir):
    root, ref_tok = gpt2_dir
    vocab = vocab_lib.get_vocabulary(str(root / "tokenizer.json"))
    eot = ref_tok.eos_token_id
    assert isinstance(vocab, hf_tokenizer.HFTokenizerVocabulary)
    assert (vocab.eos_id, vocab.bos_id, vocab.unk_id, vocab.tokenizer_pad_id) == (eot, eot, eot, None)
    assert vocab.vocab_size == eot + 1 and not vocab.add_bos and not vocab.zero_is_padding
    assert vocab_lib.leading_bos_id(vocab) is None and modes.resolve_bos_id(vocab) is None  # as GPT-2 prompts
    texts = [SAMPLE, "Hello world!", "  leading and trailing spaces  ", "x <|endoftext|> y", ""]
    for text in texts:
        ids = list(vocab.encode(text))
        assert ids == ref_tok(text, add_special_tokens=False)["input_ids"] == ref_tok(text)["input_ids"]
        assert list(vocab.encode_tf(tf.constant(text)).numpy()) == ids
        upto_eos = ids[:ids.index(eot)] if eot in ids else ids  # seqio's decode stops at EOS
        assert vocab.decode(ids) == ref_tok.decode(upto_eos)
    ids = list(vocab.encode(SAMPLE))
    assert 0 in ids and vocab.decode(ids) == SAMPLE  # "!" is id 0: text, not padding
    assert vocab.decode_tf(tf.constant(ids + [eot, 5, 6])).numpy().decode() == SAMPLE  # stops at EOS
    batch = vocab.encode_tf(tf.constant(texts[:2]))
    assert batch.to_list() == [list(vocab.encode(t)) for t in texts[:2]]
    copy = pickle.loads(pickle.dumps(vocab))  # seqio / gin may copy a vocabulary
    assert copy == vocab and list(copy.encode(SAMPLE)) == ids and copy.eos_id == eot

    # The tf path inside a tf.data graph, as seqio's tokenize preprocessor runs it.
    ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
    assert [list(x) for x in ds.as_numpy_iterator()] == [list(vocab.encode(t)) for t in texts]


def test_text_file_rows_keep_token_zero(gpt2_dir, tmp_path):
    """Without a BOS (GPT-2) the file is one EOS-separated stream, as before, but token 0 ("!") keeps
    its loss weight: weights come from the rows' lengths, not from `targets != 0`."""
    root, _ = gpt2_dir
    text = tmp_path / "bangs.txt"
    text.write_text("Wow! Such text!\nAnother line!!\n")
    task = evaluation.text_file_task(str(text), vocabulary=str(root))
    assert "_lm_bos" not in task
    for pack in (True, False):
        batches = list(iterators.get_dataset(task, {"targets": 8}, split="validation", batch_size=2, shuffle=False,
                                             num_epochs=1, pack=pack, drop_remainder=False).as_numpy_iterator())
        targets = np.concatenate([b["decoder_target_tokens"].ravel() for b in batches])
        weights = np.concatenate([b["decoder_loss_weights"].ravel() for b in batches])
        vocab = vocab_lib.get_vocabulary(str(root))
        want = [t for line in ("Wow! Such text!", "Another line!!") for t in list(vocab.encode(line)) + [vocab.eos_id]]
        np.testing.assert_array_equal(targets[weights > 0], want)
        assert np.sum(targets[weights > 0] == 0) == 4


def _transformers_nll(ref, ref_tok, lines):
    """Pooled over lines: sum of model(ids, labels=ids).loss * (len(ids) - 1), and the token count."""
    nll, tokens = 0.0, 0
    for line in lines:
        ids = torch.as_tensor([ref_tok(line)["input_ids"]], dtype=torch.long)
        with torch.no_grad():
            loss = ref(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    return nll, tokens


def test_imported_llama_text_perplexity_matches_transformers_with_bos(llama_dir, tmp_path, capsys):
    hf_dir, ref_tok, ref = llama_dir
    out = tmp_path / "imported"
    assert main.main(["import_hf", f"--hf_dir={hf_dir}", f"--output_dir={out}"]) == 0
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    assert f"--gin.VOCABULARY=\"'{out}'\"" in capsys.readouterr().out

    lines = _lines(12, seed=7) + ["Token " * 9 + "model!"]
    text = tmp_path / "valid.txt"
    text.write_text("\n".join(lines) + "\n")
    task = evaluation.text_file_task(str(text), vocabulary=str(out / "tokenizer.model"))
    assert "_lm_bos1_" in task
    # Rows as transformers reads them: inputs [BOS] + tokens[:-1], targets the tokens, no EOS.
    ds = iterators.get_dataset(task, LENGTHS, split="validation", batch_size=4, shuffle=False, num_epochs=1,
                               pack=False, drop_remainder=False)
    rows = [(i[w > 0].tolist(), t[w > 0].tolist()) for b in ds.as_numpy_iterator()
            for i, t, w in zip(b["decoder_input_tokens"], b["decoder_target_tokens"], b["decoder_loss_weights"])
            if w.any()]
    want = [ref_tok(line)["input_ids"] for line in lines]
    assert rows == [(ids[:-1], ids[1:]) for ids in want]

    model, variables = hf.load(str(hf_dir))
    evaluator = evaluation.Evaluator(model, task, LENGTHS, batch_size=8, mesh=partitioning.create_mesh(),
                                     max_batches=None)
    ours = evaluator.evaluate(variables["params"])[task]
    nll, tokens = _transformers_nll(ref, ref_tok, lines)
    assert ours["tokens"] == tokens
    theirs = float(np.exp(nll / tokens))
    assert abs(ours["perplexity"] - theirs) / theirs < 1e-4, (ours["perplexity"], theirs)

    # score mode: the input starts from BOS 1, the target ends with Llama's EOS 2.
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("The quick fox\tjumps over the lazy dog.\n")
    scored = tmp_path / "scores.jsonl"
    modes.score(str(pairs), str(scored), model=model, checkpoint_dir=str(out), vocabulary=str(out),
                variables=variables)
    record = json.loads(scored.read_text())
    prompt = ref_tok("The quick fox")["input_ids"]
    target = ref_tok("jumps over the lazy dog.", add_special_tokens=False)["input_ids"] + [2]
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=torch.as_tensor([prompt + target])).logits.double(), -1)[0]
    want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target))
    assert record["target_tokens"] == len(target)
    assert record["log_likelihood"] == pytest.approx(want, rel=1e-4)


def test_bad_tokenizer_paths_are_one_line_user_errors(tmp_path, write_file, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(tmp_path / "missing" / "tokenizer.json"): "does not exist",
        str(tmp_path / "missing.model"): "does not exist",
        str(empty): "holds no tokenizer.json",
        write_file("junk/tokenizer.json", b"{not json"): "not a tokenizer.json",
        write_file("junk.model", b"not a model"): "not a SentencePiece model",
    }
    for path, expected in cases.items():
        with pytest.raises(UserError, match=expected) as info:
            vocab_lib.get_vocabulary(path)
        assert "\n" not in user_message(info.value)  # what the CLI prints (without gin's call context)
    with pytest.raises(UserError, match="does not exist"):
        hf_tokenizer.HFTokenizerVocabulary(str(tmp_path / "nope.json"))
    prompts = write_file("prompts.txt", b"hello\n")
    model_gin = write_file("model.gin", b"include 'models/llama_tiny.gin'\n")
    assert main.main(["infer", f"--gin_file={model_gin}", "--gin_file=runs/infer.gin",
                      f"--gin.CHECKPOINT_DIR='{tmp_path}'", f"--gin.VOCABULARY='{tmp_path}/no/tokenizer.json'",
                      f"--input={prompts}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "does not exist" in err, err

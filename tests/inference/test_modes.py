"""The infer, score and text-file eval modes end to end: an imported HF checkpoint, the byte
vocabulary, prompts from a file, JSONL out; results agree with the library calls."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t5x_like import evaluation, main  # noqa: E402
from t5x_like.inference import decoding  # noqa: E402
from t5x_like.interop import hf  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1) if p.ndim > 1 else None
    root = tmp_path_factory.mktemp("cli")
    ref.save_pretrained(str(root / "hf"), safe_serialization=True)
    assert main.main(["import_hf", f"--hf_dir={root / 'hf'}", f"--output_dir={root / 'ckpt'}"]) == 0
    return root, *hf.load(str(root / "hf"))


def gin_args(root, mode):
    return [f"--gin_file={root / 'ckpt' / 'model.gin'}", f"--gin_file=runs/{mode}.gin",
            f"--gin.CHECKPOINT_DIR='{root / 'ckpt'}'", "--gin.VOCABULARY='byte'"]


def test_infer_writes_jsonl_equal_to_generate(imported):
    root, model, variables = imported
    prompts = root / "prompts.txt"
    prompts.write_text("hello world\n{\"input\": \"a json prompt\"}\nx\n")
    out = root / "out.jsonl"
    assert main.main(["infer", *gin_args(root, "infer"), "--gin.infer.max_new_tokens=5",
                      f"--input={prompts}", f"--output={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == ["hello world", "a json prompt", "x"]
    prompt = np.array([[0] + [b + 3 for b in "hello world".encode()]])  # BOS 0, byte ids = byte + 3
    direct = decoding.generate(model, variables, prompt, max_new_tokens=5)
    assert rows[0]["tokens"] == [int(t) for t in direct.tokens[0][:direct.lengths[0]] if t != 1]
    assert rows[0]["finish_reason"] in ("stop", "length")


def test_infer_bad_request_is_one_error_line(imported, capsys):
    root, _, _ = imported
    prompts = root / "bad.jsonl"
    prompts.write_text('{"input": "ok"}\n{"input": "b", "max_new_tokens": -2}\n')
    assert main.main(["infer", *gin_args(root, "infer"), f"--input={prompts}"]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: max_new_tokens=-2 must be a positive integer" in err


def test_score_writes_log_likelihoods(imported):
    root, model, variables = imported
    pairs = root / "pairs.jsonl"
    pairs.write_text(json.dumps({"input": "ab", "target": "cd"}) + "\nxyz\tw\n")
    out = root / "scores.jsonl"
    assert main.main(["score", *gin_args(root, "score"), f"--input={pairs}", f"--output={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # byte vocabulary: id = byte + 3; inputs start with BOS 0, targets end with EOS 1
    want = evaluation.score_pairs(model, variables, [[0, 100, 101], [0, 123, 124, 125]],
                                  [[102, 103, 1], [122, 1]])
    np.testing.assert_allclose([r["log_likelihood"] for r in rows], want, rtol=1e-5)
    assert rows[1]["target_tokens"] == 2


def test_score_bad_record_is_one_error_line(imported, capsys):
    root, _, _ = imported
    pairs = root / "bad.txt"
    pairs.write_text("no tab here\n")
    assert main.main(["score", *gin_args(root, "score"), f"--input={pairs}"]) == 2
    assert "input<TAB>target" in capsys.readouterr().err


def test_eval_text_file_from_the_command_line(imported, capsys):
    root, model, variables = imported
    text = root / "valid.txt"
    text.write_text("\n".join(f"line {i} of some plain validation text." for i in range(40)) + "\n")
    assert main.main(["eval", f"--gin_file={root / 'ckpt' / 'model.gin'}", "--gin_file=runs/eval_text.gin",
                      f"--gin.CHECKPOINT_DIR='{root / 'ckpt'}'", f"--gin.EVAL_TEXT_FILE='{text}'",
                      "--gin.EVAL_VOCABULARY='byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
                      "--gin.BATCH_SIZE=8"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity=" in printed

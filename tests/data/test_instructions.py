"""Instruction tasks: JSONL prompt/response and chat records -> exact (inputs, targets) text and ids,
one example per assistant turn, Hugging Face chat templates as transformers renders them, and one
line naming path:LINE for every kind of bad input."""

import json

import gin
import pytest
import seqio

from t5x_like import errors
from t5x_like.data import chat_templates, instructions
from t5x_like.data.instructions import InstructionError, register_instruction_task

EOS = 1
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# transformers' {% generation %} tag, loop controls, tojson and namespace
TAGGED = ("{%- set ns = namespace(n=0) -%}{% for m in messages %}{% if m.role == 'system' %}"
          "{{ m.content | tojson }}{{ '\\n' }}{% continue %}{% endif %}{% if m.role == 'user' %}"
          "{% set ns.n = ns.n + 1 %}{{ '<user ' ~ ns.n ~ '>\\n' }}{{ m.content }}{{ '\\n' }}{% else %}"
          "{{ '<assistant>\\n' }}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<assistant>\\n' }}{% endif %}")


def _jsonl(write_file, name, records):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    return write_file(name, ("\n".join(lines) + "\n").encode("utf-8"))


def _examples(name, lengths=None, split="train", **kwargs):
    task = seqio.get_mixture_or_task(name)
    lengths = lengths or {"inputs": 256, "targets": 64}
    return list(task.get_dataset(lengths, split, shuffle=False, **kwargs).as_numpy_iterator())


def _text(ex):
    return ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()


def _byte_ids(text):
    return [b + 3 for b in text.encode("utf-8")]


def test_prompt_response_records_give_exact_text_and_token_ids(write_file):
    path = _jsonl(write_file, "pr.jsonl", [{"prompt": "Add 2 and 3.", "response": "5"},
                                           {"prompt": "Café?", "response": "Oui, café.", "id": 7}])
    name = register_instruction_task("pr_plain", {"train": [path]}, vocabulary="byte")
    assert name == "pr_plain"
    examples = _examples(name)
    assert [_text(ex) for ex in examples] == [("<|user|>\nAdd 2 and 3.\n<|assistant|>\n", "5"),
                                              ("<|user|>\nCafé?\n<|assistant|>\n", "Oui, café.")]
    for ex in examples:  # both features end with EOS (the module's documented convention)
        inputs, targets = _text(ex)
        assert ex["inputs"].tolist() == _byte_ids(inputs) + [EOS]
        assert ex["targets"].tolist() == _byte_ids(targets) + [EOS]
    # inputs_eos=False leaves the prompt as a decoder-only model continues it; Alpaca template.
    name = register_instruction_task("pr_alpaca", path, vocabulary="byte", template="alpaca", inputs_eos=False)
    ex = _examples(name)[0]
    assert _text(ex) == (f"{chat_templates.ALPACA_PREAMBLE}\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n", "5")
    assert ex["inputs"].tolist() == _byte_ids(_text(ex)[0]) and ex["targets"].tolist() == _byte_ids("5") + [EOS]
    # Other field names.
    path = _jsonl(write_file, "alpaca.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    name = register_instruction_task("pr_fields", path, vocabulary="byte", format="prompt_response",
                                     prompt_field="instruction", response_field="output")
    assert [_text(ex) for ex in _examples(name)] == [("<|user|>\nSay hi\n<|assistant|>\n", "hi")]


def test_chat_gives_one_example_per_assistant_turn(write_file):
    train = _jsonl(write_file, "chat.jsonl", [{"messages": CHAT}, {"prompt": "p", "response": "r"}])
    dev = _jsonl(write_file, "dev/chat.jsonl", [{"messages": CHAT[1:3]}])
    name = register_instruction_task("chat_plain", {"train": [train], "validation": dev}, vocabulary="byte")
    first = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert [_text(ex) for ex in _examples(name)] == [
        (first, "Hello!"),
        (first + "Hello!\n<|user|>\n2+2?\n<|assistant|>\n", "4"),
        ("<|user|>\np\n<|assistant|>\n", "r")]
    assert [_text(ex) for ex in _examples(name, split="validation")] == [("<|user|>\nHi\n<|assistant|>\n", "Hello!")]
    task = seqio.get_mixture_or_task(name)
    assert set(task.splits) == {"train", "validation"}
    # Shuffled: a seeded permutation of the whole split, another one each epoch.
    epochs = [_text(ex) for ex in task.get_dataset({"inputs": 256, "targets": 64}, "train", shuffle=True, seed=3,
                                                   num_epochs=40, shuffle_buffer_size=1).as_numpy_iterator()]
    again = [_text(ex) for ex in task.get_dataset({"inputs": 256, "targets": 64}, "train", shuffle=True, seed=3,
                                                  num_epochs=40, shuffle_buffer_size=1).as_numpy_iterator()]
    assert epochs == again and sorted(epochs[:3]) == sorted(_text(ex) for ex in _examples(name))
    assert len({tuple(epochs[i:i + 3]) for i in range(0, 120, 3)}) > 1
    # A long prompt keeps its end: the latest turn and the assistant header, then EOS.
    (short, *_) = _examples(name, {"inputs": 12, "targets": 4})
    assert short["inputs"].tolist() == _byte_ids("assistant|>\n")[-11:] + [EOS]
    assert short["targets"].tolist() == _byte_ids("Hel") + [EOS]
    # Hosts read disjoint shards that together are the split.
    shards = [[_text(ex) for ex in _examples(name, shard_info=seqio.ShardInfo(i, 2))] for i in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(_text(ex) for ex in _examples(name))
    assert len(shards[0]) == 2 and len(shards[1]) == 1


def test_registering_again_is_free_until_a_file_changes(write_file, monkeypatch):
    path = _jsonl(write_file, "again.jsonl", [{"prompt": "a", "response": "b"}])
    calls = []
    original = instructions.examples_from_file
    monkeypatch.setattr(instructions, "examples_from_file", lambda *a: calls.append(a) or original(*a))
    name = register_instruction_task(files=[path], vocabulary="byte")
    assert name.startswith("instructions_") and register_instruction_task(files=[path], vocabulary="byte") == name
    assert len(calls) == 1
    _jsonl(write_file, "again.jsonl", [{"prompt": "a", "response": "changed!"}])
    assert register_instruction_task(files=[path], vocabulary="byte") == name and len(calls) == 2
    assert [_text(ex) for ex in _examples(name)] == [("<|user|>\na\n<|assistant|>\n", "changed!")]


def _hf_tokenizer(template, bos="<|begin_of_text|>", eos="<|eot_id|>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, bos: 1, eos: 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="[UNK]",
                                   chat_template=template)


@pytest.mark.parametrize("template", [LLAMA3, CHATML, TAGGED], ids=["llama3", "chatml", "generation_tag"])
def test_hf_chat_template_renders_as_transformers_apply_chat_template(template, tmp_path, write_file):
    from transformers import AutoTokenizer

    tokenizer = _hf_tokenizer(template)
    saved = tmp_path / "saved"  # what save_pretrained writes (transformers 5: chat_template.jinja)
    tokenizer.save_pretrained(str(saved))
    # An older layout: the template inside tokenizer_config.json, bos as an AddedToken dict.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": {"content": "<|begin_of_text|>", "__type": "AddedToken"},
        "eos_token": "<|eot_id|>", "unk_token": "[UNK]", "tokenizer_class": "PreTrainedTokenizerFast"}))
    path = _jsonl(write_file, "hf.jsonl", [{"messages": CHAT}, {"prompt": "Why?", "response": " Because. "}])
    conversations = [CHAT, [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": " Because. "}]]
    for folder in (saved, legacy):
        hf = AutoTokenizer.from_pretrained(str(folder))
        expected = []
        for messages in conversations:
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    inputs = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                    full = hf.apply_chat_template(messages[:i + 1], tokenize=False)
                    assert full.startswith(inputs)
                    expected.append((inputs, full[len(inputs):]))
        ours = chat_templates.get_template(f"hf:{folder}")
        for messages in conversations:
            for n in range(1, len(messages) + 1):
                for gen in (False, True):
                    assert ours.render(messages[:n], gen) == hf.apply_chat_template(
                        messages[:n], tokenize=False, add_generation_prompt=gen)
        name = register_instruction_task(f"hf_{folder.name}", path, vocabulary="byte", template=f"hf:{folder}")
        examples = _examples(name, {"inputs": 512, "targets": 64})
        assert [_text(ex) for ex in examples] == expected
        assert examples[0]["targets"].tolist() == _byte_ids(expected[0][1]) + [EOS]
    if template == LLAMA3:
        assert expected[0][0].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
        assert expected[0][1] == "Hello!<|eot_id|>" and expected[2][1] == "Because.<|eot_id|>"


def _error(fn):
    with pytest.raises(InstructionError) as info:
        fn()
    exc = errors.unwrap_gin(info.value)  # gin re-raises a configurable's error with its call appended
    assert isinstance(exc, errors.UserError) and "\n" not in str(exc) and errors.user_message(info.value) == str(exc)
    return str(exc)


BAD_RECORDS = [
    ("no_response", [{"prompt": "p", "response": "r"}, {"prompt": "p"}], {},
     ":2: record has no 'response' field", "response_field="),
    ("no_prompt_nor_messages", [{"text": "t"}], {}, ":1: record has no 'prompt' field (nor a 'messages' list)", ""),
    ("invalid_json", [{"prompt": "p", "response": "r"}, "", '{"prompt": "p", "response": }'], {},
     ":3: not valid JSON (Expecting value at column 29)", "one JSON object"),
    ("unknown_role", [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}], {},
     ":1: message 2 has role 'bot'; roles are system, user, assistant", ""),
    ("no_assistant", [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}], {},
     ":1: conversation has no assistant message", "add the assistant's reply"),
    ("content_not_text", [{"messages": [{"role": "user", "content": ["a"]}]}], {},
     ":1: message 1 has content of type list", '"content" string'),
    ("not_an_object", ['["prompt", "response"]'], {}, ":1: a record must be a JSON object, got a list", ""),
    ("chat_format_on_prompts", [{"prompt": "p", "response": "r"}], {"format": "chat"},
     ":1: record has no 'messages' field", "messages_field="),
    ("not_prefix_stable", [{"messages": CHAT[1:3]}],
     {"template": "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"},
     ":1: the given Jinja chat template is not prefix-stable", "template='plain'"),
    ("assistant_first", [{"messages": CHAT[2:]}], {"template": LLAMA3},
     ":1: the conversation starts with the assistant's message", "start it with a user"),
    ("template_refuses", [{"messages": CHAT[1:3]}, {"messages": CHAT[1:2] + CHAT[1:3]}],
     {"template": "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                  "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m.content }}{% endfor %}"},
     ":2: the given Jinja chat template refused the conversation (roles must alternate user/assistant)", ""),
]


@pytest.mark.parametrize("records, kwargs, says, fix", [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_records_are_one_line_errors_naming_file_and_line(records, kwargs, says, fix, write_file):
    path = _jsonl(write_file, "bad.jsonl", records)
    message = _error(lambda: register_instruction_task("bad", {"train": [path]}, vocabulary="byte", **kwargs))
    assert message.startswith(path + says) and fix in message, message


def test_bad_files_and_settings_are_one_line_errors(write_file, tmp_path):
    path = _jsonl(write_file, "ok.jsonl", [{"prompt": "p", "response": "r"}])
    glob = str(tmp_path / "missing" / "*.jsonl")
    message = _error(lambda: register_instruction_task("x", {"train": [path], "validation": [glob]}))
    assert f"{glob!r} (split 'validation') matches no file" in message
    blank = write_file("blank.jsonl", b"\n\n")
    assert "hold no records" in _error(lambda: register_instruction_task("x", [blank], vocabulary="byte"))
    latin1 = write_file("latin1.jsonl", '{"prompt": "caf\xe9", "response": "r"}\n'.encode("latin-1"))
    assert _error(lambda: register_instruction_task("x", [latin1])).startswith(f"{latin1}:1: not valid UTF-8")
    assert "unknown template 'chatml'" in _error(lambda: register_instruction_task("x", [path], template="chatml"))
    no_template = tmp_path / "no_template"
    no_template.mkdir()
    (no_template / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    message = _error(lambda: register_instruction_task("x", [path], template=f"hf:{no_template}"))
    assert "tokenizer_config.json has no chat_template" in message
    assert "not a valid Jinja template" in _error(lambda: register_instruction_task("x", [path], template="{% for %}"))
    assert "format='nope'" in _error(lambda: register_instruction_task("x", [path], format="nope"))
    message = _error(lambda: register_instruction_task("embedded_lm_spm", [path], vocabulary="byte"))
    assert "already registered (not by register_instruction_task)" in message


def test_gin_run_file_registers_the_task_as_the_task_macro(write_file):
    from t5x_like import gin_config

    path = _jsonl(write_file, "gin.jsonl", [{"messages": CHAT}])
    gin_config.parse(["models/llama_tiny.gin", "runs/instruction_tuning.gin"], ["MODEL_DIR = '/tmp/unused'"])
    with pytest.raises(gin_config.GinConfigError, match="INSTRUCTION_FILES"):
        gin_config.check_required_macros()

    @gin.configurable("instruction_probe")
    def probe(name=gin.REQUIRED):
        return name

    gin_config.parse(["models/llama_tiny.gin", "runs/instruction_tuning.gin"], [
        f"INSTRUCTION_FILES = {{'train': ['{path}']}}", "VOCABULARY = 'byte'", "INSTRUCTION_INPUTS_EOS = False",
        "instruction_probe.name = %MIXTURE_OR_TASK_NAME"])
    name = probe()
    assert name.startswith("instructions_") and probe() == name
    assert [_text(ex) for ex in _examples(name)][1][1] == "4"
    assert _examples(name)[0]["inputs"][-1] != EOS

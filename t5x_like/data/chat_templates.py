"""Chat templates for instruction data: render a conversation as text, and split it at
assistant turns into (inputs, targets) pairs (data/instructions.py builds seqio tasks from them).

Built-ins "plain" and "alpaca"; "hf:<dir>" reads a Hugging Face tokenizer folder's Jinja template
and renders it as transformers' `apply_chat_template` does; any string with "{{" or "{%" is a
Jinja template itself. See data/instructions.py for the formats and the exact texts.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Mapping, Optional, Sequence, Union

from t5x_like.errors import UserError, one_line

ROLES = ("system", "user", "assistant")
TEMPLATES = ("plain", "alpaca")  # built-ins; also "hf:<dir>" and a Jinja string
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class InstructionError(UserError):
    """Instruction data or settings that cannot be used; the message names file:line and the fix."""



class ChatTemplate:
    """Renders a conversation (a list of {"role", "content"} dicts) as text."""

    name = "template"

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return self.name


class PlainTemplate(ChatTemplate):
    """`<|role|>\\n{content}` blocks joined by "\\n"; generation prompt "\\n<|assistant|>\\n"."""

    name = "plain"

    def render(self, messages, add_generation_prompt=False):
        blocks = [f"<|{m['role']}|>\n{m['content']}" for m in messages]
        if add_generation_prompt:
            blocks.append("<|assistant|>\n")
        return "\n".join(blocks)


class AlpacaTemplate(ChatTemplate):
    """The Alpaca prompt: preamble (or the system message), "### Instruction:" and "### Response:"
    blocks joined by blank lines."""

    name = "alpaca"

    def render(self, messages, add_generation_prompt=False):
        messages = list(messages)
        if messages and messages[0]["role"] == "system":
            blocks, messages = [messages[0]["content"]], messages[1:]
        else:
            blocks = [ALPACA_PREAMBLE]
        heads = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
        blocks += [heads[m["role"]] + m["content"] for m in messages]
        if add_generation_prompt:
            blocks.append(heads["assistant"])
        return "\n\n".join(blocks)


class JinjaTemplate(ChatTemplate):
    """A Hugging Face chat template, rendered the way transformers' `apply_chat_template` does:
    an immutable sandboxed Jinja environment with trim_blocks, lstrip_blocks, loop controls, the
    `{% generation %}` tag, `raise_exception`, `strftime_now` and a non-escaping `tojson`, given
    `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the special tokens."""

    def __init__(self, source: str, special_tokens: Optional[Mapping[str, str]] = None,
                 origin: str = "the chat template"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.name = origin
        self._template = _compile_jinja(source, origin)

    def render(self, messages, add_generation_prompt=False):
        return self._template.render(messages=[_alias_reasoning(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def fingerprint(self) -> str:
        return json.dumps([self.source, self.special_tokens], sort_keys=True)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: Mapping) -> dict:
    """A message's reasoning under every name templates read it by (as transformers passes it)."""
    message = dict(message)
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


@functools.lru_cache(maxsize=16)
def _compile_jinja(source: str, origin: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InstructionError(f"{origin} is a Jinja template and jinja2 is not installed; pip install "
                               "'jinja2>=3.1.6', or use template='plain'") from None

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it):
        renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise InstructionError(f"{origin} is not a valid Jinja template ({one_line(e.message)}, template line "
                               f"{e.lineno}); fix it or use template='plain'") from None


def _special_token(value) -> Optional[str]:
    if isinstance(value, Mapping):  # an AddedToken as transformers saves it
        value = value.get("content")
    return value if isinstance(value, str) else None


def hf_template(folder: str) -> JinjaTemplate:
    """The chat template of a Hugging Face tokenizer folder (what `save_pretrained` writes):
    `chat_template.jinja` if present (transformers prefers it), else `tokenizer_config.json`'s
    `chat_template` (a string, or named templates of which "default" is used); special tokens from
    `tokenizer_config.json`, overridden by `special_tokens_map.json`."""
    folder = os.path.expanduser(folder)
    if os.path.basename(folder) == "tokenizer_config.json":
        folder = os.path.dirname(folder) or "."
    config_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isdir(folder):
        raise InstructionError(f"template 'hf:{folder}': {folder} is not a folder; give a Hugging Face model or "
                               "tokenizer folder holding tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InstructionError(f"{config_path} is not valid JSON ({e}); fix the file") from None
    tokens, special_map = {}, {}
    map_path = os.path.join(folder, "special_tokens_map.json")
    if os.path.isfile(map_path):
        try:
            with open(map_path, encoding="utf-8") as f:
                special_map = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            special_map = {}
    for values in (config, special_map):  # the map wins, as transformers merges it
        for key in SPECIAL_TOKENS:
            token = _special_token(values.get(key)) if isinstance(values, Mapping) else None
            if token is not None:
                tokens[key] = token
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return JinjaTemplate(f.read(), tokens, f"the chat template {jinja_path}")
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
        source = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
    if isinstance(source, Mapping):
        source = source.get("default")
    if not isinstance(source, str):
        where = config_path if os.path.isfile(config_path) else folder
        raise InstructionError(f"template 'hf:{folder}': {where} has no chat_template (nor is there a "
                               "chat_template.jinja); use a chat model's tokenizer folder, or template='plain'")
    return JinjaTemplate(source, tokens, f"the chat template of {config_path}")


def get_template(template: Union[str, ChatTemplate]) -> ChatTemplate:
    """A template from its name: "plain", "alpaca", "hf:<dir>" or a Jinja string."""
    if isinstance(template, ChatTemplate):
        return template
    if not isinstance(template, str):
        raise InstructionError(f"template={template!r} must be 'plain', 'alpaca', 'hf:<tokenizer folder>' or a "
                               "Jinja chat template string")
    if template == "plain":
        return PlainTemplate()
    if template == "alpaca":
        return AlpacaTemplate()
    if template.startswith("hf:"):
        return hf_template(template[3:])
    if "{{" in template or "{%" in template:
        return JinjaTemplate(template, origin="the given Jinja chat template")
    raise InstructionError(f"unknown template {template!r}; use 'plain', 'alpaca', 'hf:<tokenizer folder>' "
                           "(a Hugging Face chat template) or a Jinja chat template string")


def split_conversation(template: ChatTemplate, messages: Sequence[Mapping],
                       where: str = "conversation") -> list[tuple[str, str]]:
    """(inputs, targets) for each assistant message: inputs = messages before it rendered with the
    generation prompt, targets = what rendering through it adds (reply + end-of-turn text)."""
    pairs = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0 and isinstance(template, JinjaTemplate):  # transformers renders no empty conversation
            raise InstructionError(f"{where}: the conversation starts with the assistant's message, so "
                                   f"{template.name} has no prompt to render for it; start it with a user "
                                   "(or system) message")
        inputs = _render(template, messages[:i], True, where)
        full = _render(template, messages[:i + 1], False, where)
        if not full.startswith(inputs):
            raise InstructionError(
                f"{where}: {template.name} is not prefix-stable: the conversation through message {i + 1} does "
                f"not start with the text of messages 1..{i} rendered with add_generation_prompt=True, so it "
                "cannot be split into (inputs, targets) at assistant turns; use a template that renders earlier "
                "turns the same way (e.g. template='plain')")
        pairs.append((inputs, full[len(inputs):]))
    return pairs


def _render(template: ChatTemplate, messages, add_generation_prompt: bool, where: str) -> str:
    if not isinstance(template, JinjaTemplate):
        return template.render(messages, add_generation_prompt)
    import jinja2

    try:
        return template.render(messages, add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        raise InstructionError(f"{where}: {template.name} refused the conversation ({one_line(e.message or e)}); "
                               "fix the record or choose another template") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InstructionError(f"{where}: {template.name} failed on the conversation ({type(e).__name__}: "
                               f"{one_line(e)}); fix the record or choose another template") from None

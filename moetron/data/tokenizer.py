"""Tokenizers: one `Tokenizer` wrapper over Hugging Face `tokenizers`, trained (byte-level BPE) or
loaded (a tokenizer.json, a model directory, or GPT-4's cl100k_base).

What it saves is an ordinary Hugging Face tokenizer directory: `AutoTokenizer.from_pretrained`
loads it, encodes identically and renders the same chat prompts (the chat template is one Jinja
string, rendered here with the same Jinja settings `transformers` uses).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import models, pre_tokenizers, trainers

from moetron.data import cl100k
from moetron.data.byte_level import byte_level_tokenizer, char_to_byte
from moetron.data.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS.values(), END_OF_TURN)

# Tool calling in Hermes / Qwen2.5's format, which many open models are trained on: the tool list
# closes the system turn, a call is JSON between <tool_call> tags in an assistant turn, a result
# comes back between <tool_response> tags in a user turn (serve/tool_calls.py parses the calls).
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# <|role|>\ncontent<|end|>\n per message. For tokenizers without these tokens (cl100k_base) the
# markers are ordinary text, which still gives an unambiguous format. With `tools`, the tool list
# joins the first system message (or opens one); consecutive tool results share one user turn.
# Arguments given as a string (OpenAI's JSON text) render verbatim, a mapping as JSON.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] ~ '\n\n' }}{% endif %}"
    "{{ " + json.dumps(TOOLS_PREAMBLE) + " }}"
    "{% for tool in tools %}{{ '\n' ~ (tool | tojson) }}{% endfor %}"
    "{{ " + json.dumps(TOOLS_INSTRUCTIONS) + " ~ '<|end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"  # rendered with the tools
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|user|>\n' if loop.first or messages[loop.index0 - 1]['role'] != 'tool' else '\n' }}"
    "{{ '<tool_response>\n' ~ message['content'] ~ '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|end|>\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|assistant|>\n' }}{% if message['content'] %}{{ message['content'] ~ '\n' }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '' if loop.first else '\n' }}"
    "{{ '<tool_call>\n{\"name\": ' ~ (fn['name'] | tojson) ~ ', \"arguments\": ' }}"
    "{{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>\n' }}"
    "{% else %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user, assistant or tool') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A chat turn's end in other models' templates (ChatML, Llama 3, Gemma): a reply stops there too.
_END_OF_TURN_NAMES = (END_OF_TURN, "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end_of_turn|>")
# Names other tokenizers use, for a tokenizer.json that comes without a tokenizer_config.json.
_EOS_NAMES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
_BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<bos>")
_PAD_NAMES = (PAD, "<pad>", "<|finetune_right_pad_id|>")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: Jinja's own escapes HTML characters and sorts keys.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class Tokenizer:
    """Text <-> token ids, plus the special tokens and chat format a model is trained with."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        chat_template: str = CHAT_TEMPLATE,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id, self.eos_id, self.pad_id = (self._id_of(t) for t in (bos_token, eos_token, pad_token))
        self.chat_template = chat_template
        # Max id + 1, not the entry count: cl100k_base leaves ids unused (100256, 100261-100275).
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def _id_of(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise DataError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @cached_property
    def _ordinary(self) -> tokenizers.Tokenizer:
        """A copy that reads special-token text ("<|eos|>") as plain text, for training documents:
        a document must not be able to forge a boundary. (A copy rather than toggling the flag keeps
        `encode` thread-safe.)"""
        copy = tokenizers.Tokenizer.from_str(self.backend.to_str())
        copy.encode_special_tokens = True
        return copy

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids, no BOS/EOS added. Special-token text maps to its id (as in `transformers`)
        unless allow_special=False."""
        backend = self.backend if allow_special else self._ordinary
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """Many documents at once, in parallel (Rust threads); plain-text semantics by default."""
        backend = self.backend if allow_special else self._ordinary
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    @cached_property
    def token_byte_lengths(self) -> list[int]:
        """Raw text bytes each id stands for (0 for special tokens and unused ids): the bytes a model
        predicts per token, so that loss per byte compares models with different tokenizers."""
        lengths = [0] * self.vocab_size
        special = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        to_byte = char_to_byte()
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if all(char in to_byte for char in token):  # byte-level BPE: one character per byte
                lengths[token_id] = len(token)
            else:
                lengths[token_id] = len(self.backend.decode([token_id]).encode("utf-8"))
        return lengths

    @cached_property
    def _chat_template(self) -> jinja2.Template:
        # The environment transformers renders chat templates in, so our prompts equal theirs.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template)

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The special token that closes an assistant turn in the chat format, when it is not EOS
        (the bundled template's <|end|>): a chat reply ends there, as vLLM ends one on any of
        generation_config's EOS ids."""
        added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}
        found = next((added[name] for name in _END_OF_TURN_NAMES if name in added), None)
        return None if found == self.eos_id else found

    @cached_property
    def chat_template_knows_tools(self) -> bool:
        """Whether the chat template reads `tools` (else tool calls must be rendered as text first)."""
        parsed = self._chat_template.environment.parse(self.chat_template)
        return "tools" in jinja2.meta.find_undeclared_variables(parsed)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}], assistant messages may
        carry `tool_calls`) and OpenAI-style `tools`, as transformers renders it."""
        return self._chat_template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
        )

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json: a directory AutoTokenizer loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE on `texts` with our special tokens (ids 0-6) and all 256 bytes, so any text
    encodes. Deterministic: the same texts in the same order give the same tokenizer.json. The
    vocabulary is smaller than vocab_size only if the texts run out of pairs to merge."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)"
        )
    backend = byte_level_tokenizer(models.BPE(ignore_merges=True))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """ "cl100k_base", a tokenizer.json, or a directory holding one (with tokenizer_config.json and
    chat_template.jinja read when present, as in a Hugging Face model directory)."""
    if str(spec) == "cl100k_base":
        return cl100k_base()
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"tokenizer {str(spec)!r}: no tokenizer.json at {file}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{file}: not a valid tokenizer.json ({e})") from None
    config = _read_config(file.parent / "tokenizer_config.json")
    if (file.parent / "chat_template.jinja").is_file():
        config.setdefault("chat_template", (file.parent / "chat_template.jinja").read_text())
    vocab = backend.get_vocab(with_added_tokens=True)
    eos = config.get("eos_token") or next((t for t in _EOS_NAMES if t in vocab), None)
    if eos is None:
        raise DataError(
            f"{file}: cannot tell the end-of-text token; add a tokenizer_config.json with eos_token"
        )
    bos = config.get("bos_token") or next((t for t in _BOS_NAMES if t in vocab), eos)
    pad = config.get("pad_token") or next((t for t in _PAD_NAMES if t in vocab), eos)
    template = config.get("chat_template")
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=template if isinstance(template, str) else CHAT_TEMPLATE,
    )


def cl100k_base() -> Tokenizer:
    """GPT-4's tokenizer: 100,277 ids; <|endoftext|> serves as BOS, EOS and padding (it has no others)."""
    end = cl100k.ENDOFTEXT
    return Tokenizer(cl100k.backend(), bos_token=end, eos_token=end, pad_token=end)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        if isinstance(config.get(key), dict):  # transformers may serialise an AddedToken
            config[key] = config[key].get("content")
    return config

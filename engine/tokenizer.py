"""Text <-> token ids and chat-template rendering for one model (HF tokenizer dirs and GGUF metadata).

Owns tokenizers/jinja2 only: no model weights, no sampling, and templates never run outside jinja2's sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, overload

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, pre_tokenizers, processors

Message = Mapping[str, Any]  # {"role": str, "content": str | list of {"type": "text", "text": str} | None, ...}
Tool = Mapping[str, Any]  # an OpenAI tool definition, handed to the template as `tools`

# Used only when a model ships no chat template: plain ChatML turns, whatever the vocabulary.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that close a chat turn in common templates; one that the template emits also stops generation.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type) that mark special tokens.
_GGUF_TOKEN_TYPE_CONTROL = 3
_GGUF_TOKEN_TYPE_USER_DEFINED = 4

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizerFamily:
    regex: str  # split pattern, applied before byte-level mapping
    split_digits: bool  # every digit its own piece before the regex (StarCoder/SmolLM training)
    ignore_merges: bool  # a piece already in the vocab is taken whole (Llama 3's tokenizer.json)


_GPT2 = _PreTokenizerFamily(_GPT2_REGEX, split_digits=False, ignore_merges=False)
_SMOLLM = _PreTokenizerFamily(_GPT2_REGEX, split_digits=True, ignore_merges=False)
_LLAMA3 = _PreTokenizerFamily(_LLAMA3_REGEX, split_digits=False, ignore_merges=True)
_QWEN2 = _PreTokenizerFamily(_QWEN2_REGEX, split_digits=False, ignore_merges=False)

# tokenizer.ggml.pre names (as llama.cpp's converter writes them) -> how the original HF tokenizer pre-tokenized.
# A file without the key gets plain GPT-2 splitting, as transformers' GGUF converter does.
_PRE_TOKENIZERS: dict[str, _PreTokenizerFamily] = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "gpt2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "phi-2": _GPT2,
    "roberta-bpe": _GPT2,
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "refact": _SMOLLM,
    "codeshell": _SMOLLM,
    "command-r": _SMOLLM,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "stablelm2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special tokens and chat template.

    With no chat template in the model, `apply_chat_template` uses FALLBACK_CHAT_TEMPLATE (plain ChatML turns).
    Thread-safe for encode/decode/apply_chat_template: nothing here mutates after construction.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        source: str,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """special_tokens maps template variable names (bos_token, eos_token, ...) to token strings."""
        self._backend = backend
        self.source = source
        self.special_tokens = {name: text for name, text in special_tokens.items() if text is not None}
        self._special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.bos_token_id = self._token_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._token_id(self.special_tokens.get("eos_token"))
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else FALLBACK_CHAT_TEMPLATE
        self._template = _compile_template(self.chat_template, source)
        eos_ids = [self.eos_token_id, *extra_eos_token_ids]
        eos_ids += [self._token_id(tok) for tok in _END_OF_TURN_TOKENS if tok in self.chat_template]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and, if present, chat_template.jinja, generation_config.json."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{directory}: no tokenizer.json (a Hugging Face tokenizer directory needs one)")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / "tokenizer_config.json")
        special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            template: str | None = template_file.read_text(encoding="utf-8")
        else:
            template = _select_template(config.get("chat_template"), str(directory))
        eos_config = _read_json(directory / "generation_config.json").get("eos_token_id")
        extra_eos = [eos_config] if isinstance(eos_config, int) else list(eos_config or ())
        return cls(backend, source=str(directory), special_tokens=special, chat_template=template,
                   extra_eos_token_ids=extra_eos)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
        """Build a byte-level BPE from GGUF `tokenizer.ggml.*` metadata (as GGUFReader field.contents() returns it)."""
        model_type = metadata.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise ValueError(
                f"{source}: tokenizer.ggml.model {model_type!r} is not supported; supported: 'gpt2' (byte-level BPE)"
            )
        pre = str(metadata.get("tokenizer.ggml.pre", "default"))
        family = _PRE_TOKENIZERS.get(pre)
        if family is None:
            supported = ", ".join(sorted(_PRE_TOKENIZERS))
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {supported}")
        tokens = [str(t) for t in metadata["tokenizer.ggml.tokens"]]
        token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))]
        if len(token_types) != len(tokens):
            raise ValueError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
        vocab: dict[str, int] = {}
        for token_id, text in enumerate(tokens):
            vocab.setdefault(text, token_id)  # a duplicated string keeps its first id
        merges = [_split_merge(m, source) for m in metadata.get("tokenizer.ggml.merges", [])]
        model = tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                      ignore_merges=family.ignore_merges)
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = _build_pre_tokenizer(family)
        backend.decoder = decoders.ByteLevel()
        special_types = (_GGUF_TOKEN_TYPE_CONTROL, _GGUF_TOKEN_TYPE_USER_DEFINED)
        backend.add_special_tokens([
            tokenizers.AddedToken(text, special=True, normalized=False)
            for text, kind in zip(tokens, token_types, strict=True) if kind in special_types
        ])

        def token_at(key: str) -> str | None:
            index = metadata.get(key)
            return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

        special = {f"{name}_token": token_at(f"tokenizer.ggml.{key}_token_id")
                   for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
        backend.post_processor = _build_post_processor(
            special["bos_token"] if metadata.get("tokenizer.ggml.add_bos_token", False) else None,
            special["eos_token"] if metadata.get("tokenizer.ggml.add_eos_token", False) else None,
            vocab,
        )
        extra_eos = [int(metadata[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                     if k in metadata]
        return cls(backend, source=source, special_tokens=special,
                   chat_template=_gguf_chat_template(metadata), extra_eos_token_ids=extra_eos)

    # ---- ids ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token strings in `text` become their ids; add_special_tokens adds the model's BOS/EOS if it asks."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """An incomplete UTF-8 sequence at the end decodes as U+FFFD (see detokenizer.IncrementalDetokenizer)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ---- chat template --------------------------------------------------------------------------------------

    @overload
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = ...,
                            tokenize: Literal[False] = ..., tools: Sequence[Tool] | None = ...) -> str: ...

    @overload
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = ...,
                            *, tokenize: Literal[True], tools: Sequence[Tool] | None = ...) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Tool] | None = None,
    ) -> str | list[int]:
        """Render messages ({"role", "content"} dicts) as the model's prompt text, or its ids with tokenize=True.

        A list content is OpenAI's parts form: its text parts are joined with "\\n" (as vLLM does) before rendering.
        The rendered text already holds whatever special tokens the template writes, so ids are encoded without adding
        BOS/EOS again. A failing template raises ValueError.
        """
        context = {
            **self.special_tokens,
            "messages": [_normalize_message(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "tools": None if tools is None else [dict(t) for t in tools],
        }
        try:
            text = self._template.render(context)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as exc:
            raise ValueError(f"chat template of {self.source} failed: {type(exc).__name__}: {exc}") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text


# ---- chat template helpers ----------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): rendered as its plain body."""

    tags = {"generation"}  # noqa: RUF012  (jinja2 reads this class attribute)

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's variant: jinja2's own tojson HTML-escapes, which changes what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _compile_template(source_text: str, source: str) -> jinja2.Template:
    # The immutable sandbox refuses underscore attributes and mutating methods, so a template from a model file
    # cannot reach Python internals, run code or touch files; there is no loader, so no include/import either.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source_text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template of {source} does not parse (line {exc.lineno}): {exc.message}") from exc


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"a chat message must be a mapping with a 'role', got {message!r}")
    content = message.get("content")
    if content is None:
        content = ""  # assistant turns with only tool calls; templates concatenate content as a string
    elif isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part!r}")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")
    return {**message, "content": content}


def _select_template(value: Any, source: str) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} (use "default", else the first)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, Mapping) and "template" in t for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"])
    raise ValueError(f"{source}: chat_template must be a string or a list of named templates")


def _gguf_chat_template(metadata: Mapping[str, Any]) -> str | None:
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        return str(template)
    names = [str(n) for n in metadata.get("tokenizer.chat_templates", [])]
    return next((str(metadata[f"tokenizer.chat_template.{n}"]) for n in names
                 if f"tokenizer.chat_template.{n}" in metadata), None)


# ---- construction helpers -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _split_merge(merge: str, source: str) -> tuple[str, str]:
    # Byte-level tokens never contain a literal space (it is mapped to "Ġ"), so one space separates the pair.
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ValueError(f"{source}: malformed merge {merge!r} in tokenizer.ggml.merges (expected 'left right')")
    return left, right


def _build_pre_tokenizer(family: _PreTokenizerFamily) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if family.split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.Split(tokenizers.Regex(family.regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _build_post_processor(bos: str | None, eos: str | None, vocab: Mapping[str, int]) -> processors.PostProcessor:
    prefix = [bos] if bos is not None else []
    suffix = [eos] if eos is not None else []
    # Only single sequences are ever encoded here, so no pair template.
    return processors.TemplateProcessing(
        single=" ".join([*prefix, "$A", *suffix]),
        special_tokens=[(tok, vocab[tok]) for tok in dict.fromkeys(prefix + suffix)],
    )

"""engine.tokenizer: GGUF and HF tokenizers against the SmolLM2 fixtures, pre-tokenizer families, chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from engine.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer

# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "smollm2"


@pytest.fixture(scope="module")
def gguf_metadata(default_model_path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(default_model_path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(smollm2_dir / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer_cases(smollm2_dir: Path) -> list[dict[str, Any]]:
    return json.loads((smollm2_dir / "tokenizer_cases.json").read_text(encoding="utf-8"))


def _byte_level_vocab() -> list[str]:
    """The 256 byte-level symbols, in a fixed order."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _tiny_metadata(**overrides: Any) -> dict[str, Any]:
    """A small gpt2-style GGUF tokenizer: 3 control tokens, 256 byte symbols and a few merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["12", "34", "123", "45", "He", "ll", "Hell", "Hello"]
    tokens = specials + _byte_level_vocab() + merged
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": ["1 2", "3 4", "12 3", "4 5", "H e", "l l", "He ll", "Hell o"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    metadata.update(overrides)
    return metadata


def _tiny(template: str | None = None, **overrides: Any) -> Tokenizer:
    if template is not None:
        overrides["tokenizer.chat_template"] = template
    return Tokenizer.from_gguf_metadata(_tiny_metadata(**overrides), "tiny.gguf")


def _pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(text)]


# ---- the default model's GGUF tokenizer against transformers ----------------------------------------------------


def test_gguf_tokenizer_encodes_every_fixture_case(gguf_tokenizer: Tokenizer, tokenizer_cases: list[dict]) -> None:
    for case in tokenizer_cases:
        assert gguf_tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert gguf_tokenizer.encode(case["text"], add_special_tokens=True) == case["ids_add_special_tokens_default"]
        assert gguf_tokenizer.decode(case["ids"]) == case["decoded"], case["text"]
        assert (gguf_tokenizer.decode(case["ids"]) == case["text"]) == case["decode_roundtrip_exact"]


@pytest.mark.parametrize("prompt_index", [0, 1])
def test_gguf_chat_prompt_matches_fixture(gguf_tokenizer: Tokenizer, smollm2_dir: Path, prompt_index: int) -> None:
    case = json.loads((smollm2_dir / f"prompt{prompt_index}.json").read_text(encoding="utf-8"))
    assert gguf_tokenizer.apply_chat_template(case["messages"]) == case["prompt_text"]
    assert gguf_tokenizer.apply_chat_template(case["messages"], tokenize=True) == case["prompt_ids"]
    assert gguf_tokenizer.decode(case["greedy_ids"]) == case["greedy_text"]


def test_gguf_special_tokens(gguf_tokenizer: Tokenizer) -> None:
    assert gguf_tokenizer.vocab_size == 49152
    assert gguf_tokenizer.bos_token_id == 1
    assert gguf_tokenizer.eos_token_id == 2
    assert gguf_tokenizer.eos_token_ids == (2,)
    assert [i for i in range(40) if gguf_tokenizer.is_special(i)] == list(range(17))
    assert gguf_tokenizer.has_chat_template
    assert gguf_tokenizer.encode("<|im_start|>user") == [1, 4093]
    assert gguf_tokenizer.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_hf_dir_tokenizer_matches_fixture(hf_tokenizer: Tokenizer, tokenizer_cases: list[dict],
                                          smollm2_dir: Path) -> None:
    for case in tokenizer_cases:
        assert hf_tokenizer.encode(case["text"]) == case["ids"]
    case = json.loads((smollm2_dir / "prompt0.json").read_text(encoding="utf-8"))
    assert hf_tokenizer.apply_chat_template(case["messages"], tokenize=True) == case["prompt_ids"]
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_ids) == (1, (2,))
    assert hf_tokenizer.special_tokens["unk_token"] == "<|endoftext|>"


# "smollm" splits every digit first, like SmolLM2's own tokenizer.json (Digits + ByteLevel) and llama.cpp; the fixture
# tokenizer.json (transformers' GGUF conversion) dropped the Digits step. The vocabulary has no multi-character digit
# tokens, so the two only differ where whitespace meets a digit ("a  1") or on non-ASCII numerals.
_TEXT_WITH_DIGITS = st.text(alphabet=st.sampled_from([*"ab xyZ.,'\n\t-1234567890", "é", "中", "😀", "²", "٤", " "]),
                            max_size=40)
_TEXT_WITHOUT_DIGITS = st.text(alphabet=st.sampled_from([*"ab xyZ.,'\n\t-!?", "é", "中", "😀", "’", "\u3000"]),
                               max_size=40)


@given(text=_TEXT_WITH_DIGITS)
@settings(max_examples=150, deadline=None)
def test_smollm_pre_tokenizer_matches_original_smollm2(gguf_tokenizer: Tokenizer, smollm2_dir: Path,
                                                       text: str) -> None:
    original = _original_smollm2(smollm2_dir)
    assert gguf_tokenizer.encode(text) == original.encode(text, add_special_tokens=False).ids


@given(text=_TEXT_WITHOUT_DIGITS)
@settings(max_examples=150, deadline=None)
def test_matches_transformers_conversion_without_digits(gguf_tokenizer: Tokenizer, hf_tokenizer: Tokenizer,
                                                        text: str) -> None:
    assert gguf_tokenizer.encode(text) == hf_tokenizer.encode(text)


def test_digits_are_split_before_whitespace_runs(gguf_tokenizer: Tokenizer) -> None:
    # Digits first: "  " stays one piece (token "ĠĠ") before "4"; GPT-2's regex alone gives " " + " 4".
    assert _pieces(gguf_tokenizer, "a  4") == ["a", "  ", "4"]


_ORIGINAL: dict[Path, tokenizers.Tokenizer] = {}


def _original_smollm2(smollm2_dir: Path) -> tokenizers.Tokenizer:
    """The fixture tokenizer.json with SmolLM2's published pre-tokenizer (Digits, then GPT-2 ByteLevel) restored."""
    if smollm2_dir not in _ORIGINAL:
        original = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer" / "tokenizer.json"))
        original.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        _ORIGINAL[smollm2_dir] = original
    return _ORIGINAL[smollm2_dir]


# ---- GGUF metadata variants -------------------------------------------------------------------------------------


def test_pre_tokenizer_families_split_numbers_differently() -> None:
    assert _pieces(_tiny(), "12345") == ["12", "34", "5"]  # GPT-2: one number piece, merges by rank
    assert _pieces(_tiny(**{"tokenizer.ggml.pre": "llama-bpe"}), "12345") == ["123", "45"]  # groups of three digits
    assert _pieces(_tiny(**{"tokenizer.ggml.pre": "smollm"}), "12345") == ["1", "2", "3", "4", "5"]
    assert _pieces(_tiny(**{"tokenizer.ggml.pre": "qwen2"}), "12345") == ["1", "2", "3", "4", "5"]
    assert _pieces(_tiny(), "Hello") == ["Hello"]


def test_unsupported_tokenizer_model_is_named() -> None:
    with pytest.raises(ValueError, match=r"tiny\.gguf: tokenizer\.ggml\.model 'llama' .*supported: 'gpt2'"):
        _tiny(**{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model None"):
        Tokenizer.from_gguf_metadata({}, "empty.gguf")


def test_unsupported_pre_tokenizer_is_named() -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'no-such-pre' .*llama-bpe.*smollm"):
        _tiny(**{"tokenizer.ggml.pre": "no-such-pre"})


def test_malformed_merge_is_rejected() -> None:
    with pytest.raises(ValueError, match="malformed merge 'ab'"):
        _tiny(**{"tokenizer.ggml.merges": ["ab"]})


def test_add_bos_token_prepends_bos_only_when_asked() -> None:
    with_bos = _tiny(**{"tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("Hello", add_special_tokens=True) == [1, with_bos.token_to_id("Hello")]
    assert with_bos.encode("Hello") == [with_bos.token_to_id("Hello")]
    assert _tiny().encode("Hello", add_special_tokens=True) == [_tiny().token_to_id("Hello")]


def test_end_of_turn_tokens_join_eos_ids() -> None:
    template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    assert _tiny(template, **{"tokenizer.ggml.eos_token_id": 0}).eos_token_ids == (0, 2)
    assert _tiny(**{"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2}).eos_token_ids == (0, 2)
    # The fallback template ends turns with <|im_end|> too, so a template-less ChatML vocabulary still stops.
    assert _tiny(**{"tokenizer.ggml.eos_token_id": 0}).eos_token_ids == (0, 2)


# ---- chat templates ---------------------------------------------------------------------------------------------


def test_fallback_template_is_chatml() -> None:
    tokenizer = _tiny()
    assert not tokenizer.has_chat_template
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n")


def test_text_parts_are_joined() -> None:
    tokenizer = _tiny("{{ messages[0]['content'] }}|{{ messages[1]['content'] }}")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert tokenizer.apply_chat_template(messages) == "a\nb|"
    with pytest.raises(ValueError, match="only text content parts"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ValueError, match="'role'"):
        tokenizer.apply_chat_template([{"content": "x"}])


def test_template_variables_and_helpers() -> None:
    template = ("{{ bos_token }}{{ eos_token }}{{ messages | tojson }}{{ add_generation_prompt }}"
                "{{ tools | tojson }}{{ strftime_now('%Y') | length }}{% for m in messages %}{% if loop.first %}"
                "{% break %}{% endif %}{% endfor %}{% generation %}G{% endgeneration %}")
    text = _tiny(template).apply_chat_template([{"role": "user", "content": "é"}], tools=[{"type": "function"}])
    assert text == '<|im_start|><|im_end|>[{"role": "user", "content": "é"}]True[{"type": "function"}]4G'


def test_template_whitespace_control_matches_hf() -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it.
    template = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    assert _tiny(template).apply_chat_template([{"role": "user", "content": "x"}]) == "    x\n"


def test_raise_exception_becomes_value_error() -> None:
    tokenizer = _tiny("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ValueError, match=r"chat template of tiny\.gguf failed.*Conversation roles must alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_syntax_error_is_reported_at_load() -> None:
    with pytest.raises(ValueError, match=r"chat template of tiny\.gguf does not parse \(line 1\)"):
        _tiny("{% for m in messages %}")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ cycler.__init__.__globals__['os'].popen('echo pwned').read() }}",
    "{{ lipsum.__globals__['os'].listdir('/') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ open('/etc/passwd').read() }}",
    "{{ __import__('os').system('echo pwned') }}",
    "{{ range(10**9) | list | length }}",
])
def test_malicious_templates_cannot_escape_the_sandbox(template: str, capfd: pytest.CaptureFixture[str]) -> None:
    tokenizer = _tiny(template)
    with pytest.raises(ValueError, match=r"chat template of tiny\.gguf failed"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    assert "pwned" not in capfd.readouterr().out


# ---- HF directories ---------------------------------------------------------------------------------------------


def _write_tiny_hf_dir(directory: Path, config: dict[str, Any]) -> Path:
    """A tokenizer.json with _tiny_metadata's vocabulary (no pre-tokenizer needed here) plus the given config."""
    metadata = _tiny_metadata()
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in tokens[:3]])
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_hf_dir_named_templates_and_added_token_dicts(tmp_path: Path) -> None:
    directory = _write_tiny_hf_dir(tmp_path / "model", {
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
        "eos_token": "<|endoftext|>",
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}],
    })
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}), encoding="utf-8")
    tokenizer = Tokenizer.from_hf_dir(directory)
    assert tokenizer.apply_chat_template([]) == "DEFAULT"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (1, (0, 2))


def test_hf_dir_chat_template_file_wins(tmp_path: Path) -> None:
    directory = _write_tiny_hf_dir(tmp_path / "model", {"chat_template": "FROM CONFIG"})
    (directory / "chat_template.jinja").write_text("FROM FILE", encoding="utf-8")
    assert Tokenizer.from_hf_dir(directory).apply_chat_template([]) == "FROM FILE"


def test_hf_dir_errors_name_the_file(tmp_path: Path, smollm2_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    shutil.copy(smollm2_dir / "tokenizer" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)

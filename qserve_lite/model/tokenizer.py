"""Tokenizer: tokenizer.json through `tokenizers`, chat templates through jinja2, stop ids, and
incremental detokenization for streaming."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from qserve_lite.core.model_config import json_kind
from qserve_lite.errors import TokenizerError


def _read_json(path: Path) -> dict:
    """The JSON object in path ({} when there is no such file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {json_kind(data)}")
    return data


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer.json is missing from {model_dir}; "
                "qserve-lite needs a fast (tokenizers) tokenizer file"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{path}: cannot be loaded ({e})") from None
        tcfg = _read_json(model_dir / "tokenizer_config.json")
        gcfg = _read_json(model_dir / "generation_config.json")
        mcfg = _read_json(model_dir / "config.json")
        self.chat_template = tcfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_str(tcfg.get("bos_token"))
        self.eos_token = _token_str(tcfg.get("eos_token"))
        self.add_bos_token = bool(tcfg.get("add_bos_token", False))
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else mcfg.get("bos_token_id")

        eos_ids: list[int] = []
        for src in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id")):
            for e in src if isinstance(src, list) else [src]:
                if isinstance(e, int) and e not in eos_ids:
                    eos_ids.append(e)
        if self.eos_token is not None:
            e = self.token_to_id(self.eos_token)
            if e is not None and e not in eos_ids:
                eos_ids.append(e)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json's post-processor normally adds BOS; honour tokenizer_config's flag if it does not.
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation [{"role", "content"}, ...] with the model's chat template."""
        if not self.chat_template:
            raise TokenizerError(
                "this model has no chat template (tokenizer_config.json has no 'chat_template'); "
                "use plain prompts instead of chat mode"
            )
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"chat messages need 'role' and 'content' keys, got {m!r}")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt)
        # The template already holds BOS where the model wants it.
        return self._tok.encode(text, add_special_tokens=False).ids


_TEMPLATE_CACHE: dict[str, object] = {}


def _compile_template(source: str):
    if source not in _TEMPLATE_CACHE:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _TEMPLATE_CACHE[source] = env.from_string(source)
        except TemplateError as e:
            raise TokenizerError(f"the model's chat template does not compile: {e}") from None
    return _TEMPLATE_CACHE[source]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Each step decodes a short window, not the whole list: the ids of the last piece given out (context, so
    that a tokenizer's leading-space and byte-fallback rules see what they would in a full decode) plus
    those not given out yet; the new piece is what the window adds to the decode of its context. Decoding
    the whole list every token cost O(n) per token: 2.2 ms per step for 16 sequences of 1,024 tokens on one
    core (7,300 tokens/s), more than a GPU decode step at batch 128. Should the window's text not extend its
    context's (a tokenizer whose clean-up rules join across the boundary), the piece comes from the full
    decode instead, as before; the concatenated pieces always equal the full decode."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # the pieces given out so far, concatenated
        self._start = 0  # window: ids[_start:_read] went out with the last piece, ids[_read:] not yet
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens) if ids else ""

    def add(self, token_id: int) -> str:
        """Append one id; return the newly completed text (may be empty)."""
        self.ids.append(int(token_id))
        context = self._decode(self.ids[self._start:self._read])
        window = self._decode(self.ids[self._start:])
        if window.endswith("\ufffd"):
            return ""
        if window.startswith(context):
            new = window[len(context):]
        else:  # the window does not extend its context: take the piece from the full decode
            full = self._decode(self.ids)
            new = full[len(self.text):] if full.startswith(self.text) else ""
        if new:
            self._start, self._read = self._read, len(self.ids)
            self.text += new
        return new

"""The tokenizer of a GGUF file as a Hugging Face ``tokenizers.Tokenizer``, rebuilt from the GGUF vocabulary:
byte-level BPE ("gpt2" models, with the pre-tokenizer named by tokenizer.ggml.pre) or SentencePiece BPE
("llama" models, merges recovered from the token scores), plus the special tokens, the BOS/EOS template,
``tokenizer_config.json`` and the EOS ids of ``generation_config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qserve_lite.errors import GGUFImportError
from qserve_lite.io.gguf.reader import field_array, field_value

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regex used by Llama-3 style byte-level BPE vocabularies.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")

# Turn-end tokens that chat templates use in place of (or besides) the GGUF eos token.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce score-ordered SentencePiece BPE: every split of a normal token into
    two normal tokens is a merge, ranked by the merged token's score (descending), then piece ids."""
    ids: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if types[i] == _TT_NORMAL and tok not in ids:
            ids[tok] = i
    found = []
    for tok, i in ids.items():
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            ia, ib = ids.get(a), ids.get(b)
            if ia is not None and ib is not None:
                found.append((-scores[i], ia, ib, a, b))
    found.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(a, b) for _, _, _, a, b in found]


def _split_merge(m: str, key: str) -> tuple[str, str]:
    # Like llama.cpp: split at the first space that is not the first character.
    k = m.find(" ", 1)
    if k <= 0:
        raise GGUFImportError(f"GGUF field {key!r} has a malformed merge {m!r} (expected 'left right').")
    return m[:k], m[k + 1:]


def _read_vocab(reader, path: Path) -> tuple[str, list[str], list[int], str]:
    """(tokenizer.ggml.model, tokens, token types, tokenizer.ggml.pre) of the GGUF file."""
    tok_model = field_value(reader, "tokenizer.ggml.model")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if tok_model is None or tokens is None:
        raise GGUFImportError(
            f"GGUF file {path} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing); "
            "re-convert the model with its tokenizer."
        )
    n = len(tokens)
    types_arr = field_array(reader, "tokenizer.ggml.token_type", np.int64)
    types = [int(x) for x in types_arr] if types_arr is not None else [_TT_NORMAL] * n
    if len(types) != n:
        raise GGUFImportError(
            f"GGUF file {path}: tokenizer.ggml.token_type has {len(types)} entries but "
            f"tokenizer.ggml.tokens has {n}."
        )
    pre = field_value(reader, "tokenizer.ggml.pre") or "default"
    return tok_model, tokens, types, pre


def _token_id(reader, key: str, n: int, warnings_out: list[str]) -> int | None:
    """Token id field ``key``; None when absent or outside the vocabulary of ``n`` tokens (with a warning)."""
    v = field_value(reader, key)
    if v is None:
        return None
    v = int(v)
    if not 0 <= v < n:
        warnings_out.append(f"{key} = {v} is outside the vocabulary (size {n}); ignored.")
        return None
    return v


def _special_ids(reader, types: list[int], warnings_out: list[str]) -> dict[str, int | None]:
    """The bos, eos, unk and pad token ids; unk falls back to the first token of type UNKNOWN."""
    n = len(types)
    ids = {
        role: _token_id(reader, f"tokenizer.ggml.{key}_token_id", n, warnings_out)
        for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
    }
    if ids["unk"] is None:
        ids["unk"] = next((i for i in range(n) if types[i] == _TT_UNKNOWN), None)
    return ids


def _vocab_dict(tokens: list[str], warnings_out: list[str]) -> dict[str, int]:
    """token string -> id; a duplicate string keeps its first id (with a warning)."""
    vocab: dict[str, int] = {}
    dups = 0
    for i, t in enumerate(tokens):
        if t in vocab:
            dups += 1
            continue
        vocab[t] = i
    if dups:
        warnings_out.append(
            f"the GGUF vocabulary has {dups} duplicate token string(s); each keeps only its first id."
        )
    return vocab


def _byte_level_pre_tokenizer(pre: str, warnings_out: list[str]):
    """The pre-tokenizer of a byte-level BPE vocabulary, chosen by tokenizer.ggml.pre."""
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre not in ("default", "gpt-2", "gpt2"):
        warnings_out.append(
            f"tokenizer.ggml.pre = {pre!r} is not known; using the GPT-2 byte-level pre-tokenizer, "
            "so some texts may tokenize differently from llama.cpp."
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _byte_level_bpe(reader, path: Path, vocab: dict[str, int], pre: str,
                    warnings_out: list[str]) -> Tokenizer:
    """A "gpt2" (byte-level BPE) tokenizer from tokenizer.ggml.merges."""
    merges_raw = field_value(reader, "tokenizer.ggml.merges")
    if merges_raw is None:
        raise GGUFImportError(
            f"GGUF file {path} has a gpt2 (byte-level BPE) tokenizer without tokenizer.ggml.merges."
        )
    merges = [_split_merge(m, "tokenizer.ggml.merges") for m in merges_raw]
    ignore_merges = pre in _LLAMA3_PRE
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as e:
        raise GGUFImportError(
            f"cannot build a BPE tokenizer from {path}'s tokenizer.ggml.tokens/merges: {e}"
        ) from e
    tok = Tokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, warnings_out)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(reader, path: Path, tokens: list[str], types: list[int], vocab: dict[str, int],
                       unk_id: int | None) -> Tokenizer:
    """A "llama" (SentencePiece BPE) tokenizer, its merges recovered from tokenizer.ggml.scores."""
    n = len(tokens)
    scores_arr = field_array(reader, "tokenizer.ggml.scores", np.float64)
    if scores_arr is None or len(scores_arr) != n:
        raise GGUFImportError(
            f"GGUF file {path} has a SentencePiece (llama) tokenizer without a tokenizer.ggml.scores "
            f"array of {n} entries; cannot rebuild the merges."
        )
    merges = _spm_merges(tokens, types, scores_arr.tolist())
    unk_tok = tokens[unk_id] if unk_id is not None else None
    try:
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk_tok, byte_fallback=True,
                           fuse_unk=True)
    except Exception as e:
        raise GGUFImportError(
            f"cannot build a BPE tokenizer from {path}'s SentencePiece vocabulary: {e}"
        ) from e
    tok = Tokenizer(model)
    add_space_prefix = field_value(reader, "tokenizer.ggml.add_space_prefix", True)
    norm = [normalizers.Replace(" ", "\u2581")]
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int], vocab: dict[str, int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens."""
    added = []
    for i, t in enumerate(tokens):
        if vocab.get(t) != i:
            continue
        if types[i] in (_TT_CONTROL, _TT_UNKNOWN):
            added.append(AddedToken(t, special=True, normalized=False))
        elif types[i] == _TT_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    if added:
        tok.add_tokens(added)


def _add_bos_eos(reader, ids: dict, default_add_bos: bool, warnings_out: list[str]) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS (tokenizer.ggml.add_*_token, off without a token id)."""
    add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(field_value(reader, "tokenizer.ggml.add_eos_token", False))
    if add_bos and ids["bos"] is None:
        warnings_out.append("tokenizer.ggml.add_bos_token is set but there is no bos token id; ignored.")
        add_bos = False
    if add_eos and ids["eos"] is None:
        add_eos = False
    return add_bos, add_eos


def _template_processor(tokens: list[str], ids: dict, add_bos: bool, add_eos: bool):
    """The post-processor that adds BOS and/or EOS around single texts and pairs."""
    single, pair, specials = "$A:0", "$A:0 $B:1", []
    if add_bos:
        b = tokens[ids["bos"]]
        single, pair = f"{b}:0 {single}", f"{b}:0 $A:0 {b}:1 $B:1"
        specials.append((b, ids["bos"]))
    if add_eos:
        e = tokens[ids["eos"]]
        single = f"{single} {e}:0"
        pair = pair.replace("$A:0", f"$A:0 {e}:0").replace("$B:1", f"$B:1 {e}:1")
        if e not in dict(specials):
            specials.append((e, ids["eos"]))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_tokenizer(reader, path: Path, warnings_out: list[str]):
    """Rebuild a ``tokenizers.Tokenizer`` from the GGUF vocabulary. Returns (tokenizer, info dict)."""
    tok_model, tokens, types, pre = _read_vocab(reader, path)
    ids = _special_ids(reader, types, warnings_out)
    vocab = _vocab_dict(tokens, warnings_out)
    if tok_model == "gpt2":
        tok, default_add_bos = _byte_level_bpe(reader, path, vocab, pre, warnings_out), False
    elif tok_model == "llama":
        tok, default_add_bos = _sentencepiece_bpe(reader, path, tokens, types, vocab, ids["unk"]), True
    else:
        raise GGUFImportError(
            f"GGUF file {path} uses tokenizer model {tok_model!r}; only 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece) tokenizers can be imported."
        )
    _add_special_tokens(tok, tokens, types, vocab)
    add_bos, add_eos = _add_bos_eos(reader, ids, default_add_bos, warnings_out)
    if add_bos or add_eos:
        tok.post_processor = _template_processor(tokens, ids, add_bos, add_eos)
    elif tok_model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    info = {
        "bos_id": ids["bos"], "eos_id": ids["eos"], "unk_id": ids["unk"], "pad_id": ids["pad"],
        "add_bos": add_bos, "add_eos": add_eos, "tokens": tokens, "vocab": vocab,
    }
    return tok, info


def eos_ids(reader, info: dict, chat_template: str | None) -> int | list[int] | None:
    ids: list[int] = []
    if info["eos_id"] is not None:
        ids.append(info["eos_id"])
    n = len(info["tokens"])
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = field_value(reader, key)
        if v is not None and 0 <= int(v) < n and int(v) not in ids:
            ids.append(int(v))
    if chat_template:
        for t in _TURN_END_TOKENS:
            if t in chat_template and t in info["vocab"] and info["vocab"][t] not in ids:
                ids.append(info["vocab"][t])
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def tokenizer_config(info: dict, model_max_length: int, chat_template: str | None) -> dict[str, Any]:
    """tokenizer_config.json for the tokenizer described by ``info`` (from build_tokenizer)."""
    tokens = info["tokens"]

    def tstr(i):
        return tokens[i] if i is not None else None

    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tstr(info["bos_id"]),
        "eos_token": tstr(info["eos_id"]),
        "pad_token": tstr(info["pad_id"]),
        "unk_token": tstr(info["unk_id"]),
        "add_bos_token": info["add_bos"],
        "add_eos_token": info["add_eos"],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    return tok_cfg

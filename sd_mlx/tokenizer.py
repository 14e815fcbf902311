"""CLIP byte-level BPE tokenizer built on the ``tokenizers`` library (no ``transformers`` needed at run time).

The pipeline reproduces ``transformers.CLIPTokenizer`` (transformers 5, which is backed by ``tokenizers``; there is
no separate "slow" Python CLIP tokenizer any more): the text is NFC-normalised, every run of whitespace becomes one
space, and it is lower-cased; it is then split with CLIP's word pattern (``'s|'t|...|letters+|one digit|other
symbols+``), byte-level encoded and BPE-merged with the ``</w>`` end-of-word suffix. The checkpoint's special
tokens (BOS, EOS, UNK, PAD, read the way transformers reads them from ``tokenizer_config.json`` and
``special_tokens_map.json``) are registered as added tokens, so they are matched verbatim inside a prompt; note
that this means Stable Diffusion 2.x tokenizers (whose pad token is ``"!"``) encode every ``"!"`` of a prompt as the
pad id 0, exactly as transformers does.

Sequences are ``[BOS] + content[:model_max_length - 2] + [EOS]`` padded with the checkpoint's pad id to
``model_max_length`` (77), as diffusers does with ``padding="max_length", truncation=True``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from .errors import ConfigError, InvalidArgumentError, ModelNotFoundError

# CLIP's word pattern (a fact of the CLIP tokenizer; the same split transformers and OpenAI CLIP use).
_CLIP_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                       r"[^\s\p{L}\p{N}]+")
_END_OF_WORD = "</w>"
# transformers' order of named special tokens; a later token with the same text replaces an earlier one's flags.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                     "pad_token": "<|endoftext|>"}
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


@dataclass(frozen=True)
class _Special:
    """One added token: its text and the ``tokenizers.AddedToken`` flags (``normalized`` False by default)."""

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


def _as_special(value: Any, source: str, key: str) -> _Special | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _Special(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {f: bool(value[f]) for f in _TOKEN_FLAGS if f in value and value[f] is not None}
        return _Special(value["content"], **flags)
    raise ConfigError(f"{source}: '{key}' must be a string or a token object with 'content', got {value!r}")


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read tokenizer file ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


class CLIPTokenizer:
    """CLIP tokenizer equal (ids) to ``transformers.CLIPTokenizer`` loaded from the same folder.

    Build it with :meth:`from_folder`. Attributes: ``model_max_length`` (77 for every SD checkpoint; the content of
    one sequence is ``model_max_length - 2`` tokens), ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (49407
    ``<|endoftext|>`` for SD 1.x/SDXL, 0 ``"!"`` for SD 2.x), ``unk_token_id``.
    """

    def __init__(self, backend: Any, *, bos_token: str, eos_token: str, pad_token: str, unk_token: str,
                 model_max_length: int, source: str = "<tokenizer>") -> None:
        """Wrap a configured ``tokenizers.Tokenizer`` (use :meth:`from_folder` instead of calling this).

        Raises:
            ConfigError: a special token is not in the vocabulary, or ``model_max_length < 3``.
        """
        self._tok = backend
        ids = {}
        for name, text in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            tid = backend.token_to_id(text)
            if tid is None:
                raise ConfigError(f"{source}: {name} token {text!r} is not in the vocabulary")
            ids[name] = int(tid)
        if model_max_length < 3:
            raise ConfigError(f"{source}: model_max_length must be at least 3, got {model_max_length}")
        self.bos_token_id: int = ids["bos"]
        self.eos_token_id: int = ids["eos"]
        self.pad_token_id: int = ids["pad"]
        self.unk_token_id: int = ids["unk"]
        self.model_max_length: int = int(model_max_length)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path: Path | str) -> "CLIPTokenizer":
        """Load a checkpoint's tokenizer folder (e.g. ``model/tokenizer``).

        Reads ``vocab.json`` + ``merges.txt`` (or the vocabulary and merges of ``tokenizer.json`` when present),
        ``tokenizer_config.json`` (``model_max_length``; 77 when absent, the CLIP context length; special tokens;
        ``added_tokens_decoder``) and ``special_tokens_map.json`` (which overrides the config's special tokens when
        the config has no ``added_tokens_decoder``, as in transformers).

        Raises:
            ModelNotFoundError: the folder does not exist.
            ConfigError: a file is missing or unreadable, or a special token is not in the vocabulary.
        """
        from tokenizers.models import BPE

        folder = Path(path)
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder}: tokenizer folder not found; a diffusers model folder has "
                                     f"tokenizer/ with vocab.json and merges.txt")
        cfg_path = folder / "tokenizer_config.json"
        config = _read_json_file(cfg_path) if cfg_path.is_file() else {}
        source = str(folder)
        named = _named_specials(folder, config, source)
        unk = named["unk_token"].content

        tok_json = folder / "tokenizer.json"
        json_added: list[dict[str, Any]] = []
        if tok_json.is_file():
            data = _read_json_file(tok_json)
            model = data.get("model") or {}
            vocab, merges = model.get("vocab"), model.get("merges")
            if not isinstance(vocab, dict) or not isinstance(merges, list) or model.get("type") != "BPE":
                raise ConfigError(f"{tok_json}: not a BPE tokenizer.json (model.vocab / model.merges missing)")
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
            json_added = [t for t in data.get("added_tokens") or [] if isinstance(t, dict)]
            bpe = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                      end_of_word_suffix=_END_OF_WORD, fuse_unk=False, unk_token=unk)
        else:
            vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
            for f in (vocab_file, merges_file):
                if not f.is_file():
                    raise ConfigError(f"{f}: tokenizer file missing; the tokenizer folder needs vocab.json and "
                                      f"merges.txt (or tokenizer.json)")
            try:
                bpe = BPE.from_file(str(vocab_file), str(merges_file), dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix=_END_OF_WORD, fuse_unk=False, unk_token=unk)
            except Exception as e:  # tokenizers raises its own Exception type with the parse error
                raise ConfigError(f"{folder}: cannot read vocab.json/merges.txt ({e}); re-download them") from None

        return cls._assemble(bpe, named, config, json_added, source)

    @classmethod
    def from_bpe(cls, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, config: dict[str, Any],
                 special_tokens_map: dict[str, Any] | None = None, source: str = "<tokenizer>") -> "CLIPTokenizer":
        """Build the tokenizer from an in-memory vocabulary and merge list (e.g. the copy shipped with sd_mlx, see
        :mod:`sd_mlx.loading.builtin_tokenizer`), with ``config`` and ``special_tokens_map`` read exactly as the
        ``tokenizer_config.json`` and ``special_tokens_map.json`` of a folder are by :meth:`from_folder`.

        Raises:
            ConfigError: a special token is not in the vocabulary, or a malformed special-token entry.
        """
        from tokenizers.models import BPE

        named = _named_specials_from(config, special_tokens_map, source)
        bpe = BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None, continuing_subword_prefix="",
                  end_of_word_suffix=_END_OF_WORD, fuse_unk=False, unk_token=named["unk_token"].content)
        return cls._assemble(bpe, named, config, [], source)

    @classmethod
    def _assemble(cls, bpe: Any, named: dict[str, _Special], config: dict[str, Any],
                  json_added: list[dict[str, Any]], source: str) -> "CLIPTokenizer":
        """CLIP's normaliser, pre-tokeniser and decoder around ``bpe``, with the special tokens registered."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers

        backend = Tokenizer(bpe)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        backend.decoder = decoders.ByteLevel()

        for sp in _resolve_specials(named, config, json_added, source):
            backend.add_special_tokens([AddedToken(sp.content, single_word=sp.single_word, lstrip=sp.lstrip,
                                                   rstrip=sp.rstrip, normalized=sp.normalized, special=True)])
        max_len = config.get("model_max_length", 77)
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len > 10**6:
            max_len = 77
        return cls(backend, bos_token=named["bos_token"].content, eos_token=named["eos_token"].content,
                   pad_token=named["pad_token"].content, unk_token=named["unk_token"].content,
                   model_max_length=max_len, source=source)

    # ----------------------------------------------------------------------------------------------- encoding
    @property
    def content_length(self) -> int:
        """Content tokens per sequence: ``model_max_length - 2`` (75)."""
        return self.model_max_length - 2

    def encode_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` without BOS/EOS, padding or truncation (its full length)."""
        _check_prompt(prompt)
        return list(self._tok.encode(prompt, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as transformers' ``CLIPTokenizer.decode`` gives it (``</w>`` become spaces, stripped)."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        return text.replace(_END_OF_WORD, " ").strip()

    def truncate(self, prompt: str) -> tuple[list[int], str]:
        """Split ``prompt`` into the content ids that fit one sequence and the text that does not.

        Returns:
            ``(ids, dropped_text)``: at most ``model_max_length - 2`` (75) content ids (no BOS/EOS), and the decoded
            text of the dropped tokens (``""`` when nothing is dropped), for a warning like diffusers'.
        """
        ids = self.encode_ids(prompt)
        n = self.content_length
        return ids[:n], (self.decode(ids[n:]) if len(ids) > n else "")

    def _frame(self, content: Sequence[int]) -> list[int]:
        row = [self.bos_token_id, *content, self.eos_token_id]
        return row + [self.pad_token_id] * (self.model_max_length - len(row))

    def __call__(self, prompts: str | Sequence[str]) -> mx.array:
        """Encode prompts as diffusers does (``padding="max_length", truncation=True``).

        Args:
            prompts: one prompt or a list of B prompts.

        Returns:
            ``(B, model_max_length)`` int32 ids: BOS, at most 75 content ids, EOS, then pad ids.

        Raises:
            InvalidArgumentError: a prompt is not a string, or the list is empty.
        """
        batch = _as_batch(prompts)
        return mx.array([self._frame(self.truncate(p)[0]) for p in batch], dtype=mx.int32)

    def num_chunks(self, prompts: str | Sequence[str]) -> int:
        """Chunks :meth:`chunked` needs for the longest of ``prompts``: ``max(1, ceil(len(ids) / 75))``."""
        n = self.content_length
        return max(max(1, math.ceil(len(self.encode_ids(p)) / n)) for p in _as_batch(prompts))

    def chunked(self, prompts: str | Sequence[str], num_chunks: int | None = None) -> mx.array:
        """Encode long prompts A1111-style: the content is cut into pieces of 75 tokens, each framed as one sequence.

        Each chunk is ``[BOS] + piece + [EOS]`` padded with the pad id to ``model_max_length``; a prompt with fewer
        pieces than ``num_chunks`` gets empty chunks (``[BOS, EOS, pad...]``). The text encoder runs on each
        ``(B, 77)`` chunk and the caller concatenates the embeddings along the sequence axis.

        Args:
            prompts: one prompt or B prompts.
            num_chunks: chunks per prompt; default :meth:`num_chunks` of ``prompts``. Pass the same value for the
                prompt and the negative prompt (e.g. ``max`` of both) so their embeddings have equal length.

        Returns:
            ``(B, num_chunks * model_max_length)`` int32 ids.

        Raises:
            InvalidArgumentError: ``num_chunks`` is not a positive int or is smaller than a prompt needs.
        """
        batch = _as_batch(prompts)
        n = self.content_length
        all_ids = [self.encode_ids(p) for p in batch]
        needed = max(max(1, math.ceil(len(ids) / n)) for ids in all_ids)
        if num_chunks is None:
            num_chunks = needed
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise InvalidArgumentError(f"num_chunks must be a positive integer, got {num_chunks!r}")
        if num_chunks < needed:
            raise InvalidArgumentError(f"num_chunks={num_chunks} is too small: a prompt needs {needed} chunks of "
                                       f"{n} tokens")
        rows = []
        for ids in all_ids:
            row: list[int] = []
            for c in range(num_chunks):
                row.extend(self._frame(ids[c * n:(c + 1) * n]))
            rows.append(row)
        return mx.array(rows, dtype=mx.int32)


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"a prompt must be a string, got {type(prompt).__name__}")


def _as_batch(prompts: str | Sequence[str]) -> list[str]:
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise InvalidArgumentError("no prompt given (empty list)")
    for p in batch:
        _check_prompt(p)
    return batch


def _named_specials(folder: Path, config: dict[str, Any], source: str) -> dict[str, _Special]:
    """Named special tokens of a tokenizer folder (see :func:`_named_specials_from`)."""
    map_path = folder / "special_tokens_map.json"
    return _named_specials_from(config, _read_json_file(map_path) if map_path.is_file() else None, source)


def _named_specials_from(config: dict[str, Any], special_map: dict[str, Any] | None,
                         source: str) -> dict[str, _Special]:
    """Named special tokens: the config's values, overridden by ``special_map`` (``special_tokens_map.json``) when
    the config has no ``added_tokens_decoder`` (transformers' legacy rule); CLIP defaults for absent ones."""
    values: dict[str, Any] = {k: config.get(k) for k in _SPECIAL_KEYS}
    if "added_tokens_decoder" not in config and special_map:
        for k, v in special_map.items():
            if k in values:
                values[k] = v
    out: dict[str, _Special] = {}
    for k in _SPECIAL_KEYS:
        sp = _as_special(values[k], source, k)
        if sp is None and k in _DEFAULT_SPECIALS:
            sp = _Special(_DEFAULT_SPECIALS[k])
        if sp is not None:
            out[k] = sp
    return out


def _resolve_specials(named: dict[str, _Special], config: dict[str, Any], json_added: list[dict[str, Any]],
                      source: str) -> list[_Special]:
    """The added tokens, in the order transformers registers them (a later one with the same text wins)."""
    listed: list[_Special] = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            sp = _as_special(entry, source, "added_tokens_decoder")
            if sp is not None:
                listed.append(sp)
    else:
        for entry in json_added:
            sp = _as_special(entry, source, "added_tokens")
            if sp is not None:
                listed.append(sp)
    known = {sp.content for sp in listed}
    for sp in named.values():
        if sp.content not in known:
            listed.append(sp)
    return listed

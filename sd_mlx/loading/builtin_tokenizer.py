"""The CLIP tokenizer shipped with sd_mlx, for single-file checkpoints (which carry no tokenizer).

Every Stable Diffusion tokenizer (SD 1.x, 2.x, SDXL's ``tokenizer`` and ``tokenizer_2``) uses the same byte-level
BPE files; only the pad token differs (``<|endoftext|>`` for OpenAI CLIP, ``"!"`` for OpenCLIP). sd_mlx ships the
merge list once (``sd_mlx/data/clip_tokenizer/merges.txt.gz``, 0.2 MB, MIT licence of OpenAI CLIP; see the
``LICENSE`` there) and rebuilds the vocabulary from it the way CLIP defines it: the 256 byte symbols of GPT-2's
byte-to-unicode table, the same with the end-of-word suffix ``</w>``, one entry per merge (the merged pair, in file
order), then ``<|startoftext|>`` and ``<|endoftext|>`` (49408 entries, equal to the Hub's ``vocab.json``; tested).
The special tokens are configured as the reference ``tokenizer_config.json`` / ``special_tokens_map.json`` files
do (BOS/EOS/UNK as normalised added tokens, the pad token as a plain string).
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from ..errors import ConfigError
from ..tokenizer import CLIPTokenizer

MERGES_FILE = "merges.txt.gz"
VOCAB_SIZE = 49408
_SPECIAL_START, _SPECIAL_END = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in CLIP's vocabulary order: the printable
    Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) as themselves, then every other byte ``b`` as
    ``chr(256 + n)`` in increasing order of ``b``."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + n)
            n += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """``(vocab, merges)`` of the CLIP tokenizer, read from the shipped merge list (cached).

    Raises:
        ConfigError: the packaged file is missing or damaged (reinstall sd_mlx).
    """
    try:
        data = resources.files("sd_mlx").joinpath("data", "clip_tokenizer", MERGES_FILE).read_bytes()
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise ConfigError(f"sd_mlx's packaged CLIP tokenizer ({MERGES_FILE}) cannot be read ({e}); reinstall "
                          f"sd_mlx or pass a tokenizer folder with --tokenizer PATH") from None
    merges = tuple(tuple(line.split(" ")) for line in text.split("\n")[1:] if line)
    base = _byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [_SPECIAL_START, _SPECIAL_END]
    if len(tokens) != VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise ConfigError(f"sd_mlx's packaged CLIP tokenizer ({MERGES_FILE}) is damaged ({len(tokens)} tokens, "
                          f"expected {VOCAB_SIZE}); reinstall sd_mlx")
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def _added(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def builtin_tokenizer(pad_token: str) -> CLIPTokenizer:
    """The shipped CLIP tokenizer with ``pad_token`` (``"<|endoftext|>"`` or ``"!"``), ids equal to
    ``transformers.CLIPTokenizer`` loaded from the matching reference tokenizer folder.

    Raises:
        ConfigError: the packaged file is damaged, or ``pad_token`` is not in the vocabulary.
    """
    vocab, merges = clip_bpe()
    specials = {"bos_token": _added(_SPECIAL_START), "eos_token": _added(_SPECIAL_END),
                "unk_token": _added(_SPECIAL_END), "pad_token": pad_token}
    config = dict(specials, model_max_length=77, do_lower_case=True)
    return CLIPTokenizer.from_bpe(vocab, merges, config=config, special_tokens_map=specials,
                                  source=f"sd_mlx's packaged CLIP tokenizer (pad {pad_token!r})")

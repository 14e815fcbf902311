"""Parity of sd_mlx.tokenizer.CLIPTokenizer with transformers.CLIPTokenizer (ids must be equal, exactly).

transformers 5 has a single CLIPTokenizer (backed by ``tokenizers``); that is the reference here.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest

from sd_mlx.errors import ConfigError, InvalidArgumentError, ModelNotFoundError
from sd_mlx.tokenizer import CLIPTokenizer

FOLDERS = ["stable-diffusion-v1-5/tokenizer", "stable-diffusion-2-1/tokenizer"]

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "un petit chaton très mignon",
    "😀🐱🔥",
    "你好世界 猫咪 東京タワー",
    "3.14159 1234567890 1st 2nd",
    "",
    "     ",
    "“curly quotes” and ‘single’ ones",
    "line one\nline two\tand a tab\r\n end",
    "Mixed CASE Words, With Punctuation!!! (and brackets) [x] {y}",
    "café CAFÉ e\u0301 naïve",  # composed and decomposed accents (NFC)
    "it's I'M we'll they've you'd",
    "hello <|endoftext|> world <|startoftext|>again",
    "masterpiece, best quality, ((detailed)), [low quality:0.5]",
    " ".join(f"word{i} cat" for i in range(75)),  # over-long (150 words)
]


@pytest.fixture(scope="module", params=FOLDERS)
def pair(request, assets):
    transformers = pytest.importorskip("transformers")
    folder = assets / "configs" / request.param
    return transformers.CLIPTokenizer.from_pretrained(str(folder)), CLIPTokenizer.from_folder(folder)


def _ref_ids(ref, prompts):
    return ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids


def test_special_ids(pair):
    ref, ours = pair
    assert ours.model_max_length == ref.model_max_length == 77
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.unk_token_id == ref.unk_token_id


def test_pad_token_per_checkpoint(assets):
    sd15 = CLIPTokenizer.from_folder(assets / "configs" / FOLDERS[0])
    sd21 = CLIPTokenizer.from_folder(assets / "configs" / FOLDERS[1])
    assert sd15.pad_token_id == 49407  # "<|endoftext|>"
    assert sd21.pad_token_id == 0  # "!"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers(pair, prompt):
    ref, ours = pair
    got = ours(prompt)
    assert got.dtype == mx.int32
    assert got.shape == (1, 77)
    assert got.tolist() == _ref_ids(ref, [prompt])
    assert ours.encode_ids(prompt) == ref(prompt, add_special_tokens=False).input_ids


def test_batch_equal_transformers(pair):
    ref, ours = pair
    assert ours(PROMPTS).tolist() == _ref_ids(ref, PROMPTS)


@pytest.mark.parametrize("n", [74, 75, 76, 77, 150])
def test_exact_lengths(pair, n):
    ref, ours = pair
    prompt = " ".join(["cat"] * n)
    assert len(ours.encode_ids(prompt)) == n
    got = ours(prompt).tolist()
    assert got == _ref_ids(ref, [prompt])
    row = got[0]
    assert row[0] == ours.bos_token_id
    kept = min(n, 75)
    assert row[kept + 1] == ours.eos_token_id
    assert all(t == ours.pad_token_id for t in row[kept + 2:])
    ids, dropped = ours.truncate(prompt)
    assert len(ids) == kept
    if n <= 75:
        assert dropped == ""
    else:
        # diffusers' warning text: batch_decode(untruncated_ids[:, max_length - 1 : -1])
        untruncated = ref(prompt, padding="longest").input_ids
        assert dropped == ref.batch_decode([untruncated[76:-1]])[0]
        assert dropped == " ".join(["cat"] * (n - 75))


def test_dropped_text_punctuation(pair):
    ref, ours = pair
    prompt = " ".join(f"w{i}," for i in range(60)) + " a red fox, jumping high"
    _, dropped = ours.truncate(prompt)
    untruncated = ref(prompt, padding="longest").input_ids
    assert dropped == ref.batch_decode([untruncated[76:-1]])[0]


def test_exclamation_is_pad_on_sd2(assets):
    # SD 2.x registers its pad token "!" as a special token, so transformers encodes every "!" as id 0.
    sd21 = CLIPTokenizer.from_folder(assets / "configs" / FOLDERS[1])
    sd15 = CLIPTokenizer.from_folder(assets / "configs" / FOLDERS[0])
    assert sd21.encode_ids("wow!") == [2781, 0]
    assert sd15.encode_ids("wow!") == [2781, 256]


def test_tokenizer_json_folder(tmp_path, assets):
    transformers = pytest.importorskip("transformers")
    for name in FOLDERS:
        ref = transformers.CLIPTokenizer.from_pretrained(str(assets / "configs" / name))
        out = tmp_path / name.replace("/", "_")
        ref.save_pretrained(str(out))
        assert (out / "tokenizer.json").is_file() and not (out / "vocab.json").exists()
        ours = CLIPTokenizer.from_folder(out)
        assert ours.pad_token_id == ref.pad_token_id
        assert ours(PROMPTS).tolist() == _ref_ids(ref, PROMPTS)


def test_chunked(pair):
    ref, ours = pair
    long = " ".join(["cat"] * 100)
    short = "a dog"
    ids_long = ours.encode_ids(long)
    assert ours.num_chunks(long) == 2 and ours.num_chunks(short) == 1 and ours.num_chunks("") == 1
    out = ours.chunked([long, short])
    assert out.shape == (2, 154)
    rows = out.tolist()
    c0, c1 = rows[0][:77], rows[0][77:]
    assert c0 == [ours.bos_token_id] + ids_long[:75] + [ours.eos_token_id]
    assert c1 == [ours.bos_token_id] + ids_long[75:] + [ours.eos_token_id] + [ours.pad_token_id] * 50
    # the short prompt: first chunk equals the plain encoding, second one is empty
    assert rows[1][:77] == ours(short).tolist()[0]
    assert rows[1][77:] == ours("").tolist()[0]
    # forcing the same number of chunks for prompt and negative prompt
    n = max(ours.num_chunks(long), ours.num_chunks(""))
    assert ours.chunked(long, num_chunks=n).shape == ours.chunked("", num_chunks=n).shape == (1, 154)
    assert ours.chunked(short, num_chunks=3).shape == (1, 231)
    # one chunk == the plain truncating encoding for short prompts
    assert ours.chunked(PROMPTS[:-1]).tolist() == ours(PROMPTS[:-1]).tolist()
    with pytest.raises(InvalidArgumentError, match="num_chunks"):
        ours.chunked(long, num_chunks=1)
    with pytest.raises(InvalidArgumentError, match="num_chunks"):
        ours.chunked(long, num_chunks=0)


def test_invalid_inputs(tmp_path, assets):
    tok = CLIPTokenizer.from_folder(assets / "configs" / FOLDERS[0])
    with pytest.raises(InvalidArgumentError):
        tok([])
    with pytest.raises(InvalidArgumentError):
        tok(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ModelNotFoundError):
        CLIPTokenizer.from_folder(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(assets / "configs" / FOLDERS[0] / "vocab.json", broken / "vocab.json")
    with pytest.raises(ConfigError, match="merges.txt"):
        CLIPTokenizer.from_folder(broken)

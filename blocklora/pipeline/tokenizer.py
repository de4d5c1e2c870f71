"""An exact CLIP BPE tokenizer, offline, from the vocabulary open_clip ships.

No hub is reachable here, but open_clip bundles OpenAI's `bpe_simple_vocab_16e6.txt.gz`; the HF
`vocab.json`/`merges.txt` pair is derived from it the same way OpenAI's tokenizer builds its
encoder, so ids match the tokenizer that ships with Stable Diffusion's text encoders.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from blocklora.config import cache_root
from blocklora.files.atomic import atomic_write

N_MERGES = 49152 - 256 - 2  # 48,894 merges: lines 1..48894 of the bundled file
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> list[str]:
    """OpenAI CLIP's reversible byte -> printable-unicode table, in its order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json into `folder` (idempotent: written files
    are used as they are, so a machine without open_clip can run from a copied folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    import open_clip  # only its BPE merges file is read

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    files = {
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "tokenizer_config.json": json.dumps({
            "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
            "tokenizer_class": "CLIPTokenizer",
        }),
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),  # last: marks done
    }
    for name, text in files.items():  # concurrent processes never read half a file
        atomic_write(folder / name, text.encode("utf-8"))
    return folder


@lru_cache(maxsize=1)
def _cache_dir() -> Path:
    return write_clip_tokenizer_files(cache_root() / "clip-tokenizer")


def clip_tokenizer() -> CLIPTokenizer:
    """A fresh CLIPTokenizer (fresh, because concepts add tokens to it)."""
    return CLIPTokenizer.from_pretrained(str(_cache_dir()))

"""Tokenizers, offline: generated ones for the presets, the checkpoint's own for local folders.

The presets have random weights and no hub, so their tokenizers are generated deterministically:
a byte-level BPE with CLIP's layout (bytes, bytes + ``</w>``, merges, then ``<|startoftext|>`` and
``<|endoftext|>`` as the two highest ids, so CLIP's argmax pooling finds the end token) and a
WordPiece vocabulary for the BERT-style text classifier, and a Unigram model with T5's layout for the
T5 encoders of the diffusion transformers. The merges and words are learnt from a
small embedded corpus of ad-style text, then padded to the model's vocabulary size.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import string
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from fastgen.errors import UnsupportedError

logger = logging.getLogger(__name__)

CORPUS = """
a photo of a red sports car on a mountain road at sunset, studio lighting, product shot
minimalist poster of a running shoe, bold typography, summer sale, fifty percent off
a cozy coffee shop interior with warm light and wooden tables, lifestyle photography
fresh organic orange juice bottle on a kitchen counter, bright morning light, clean background
luxury watch on black marble, macro photography, dramatic shadows, premium brand advert
happy family having a picnic in the park, vibrant colors, spring collection banner
a smartphone floating above a city skyline at night, neon lights, futuristic tech ad
skincare cream jar surrounded by flowers and water drops, soft pastel palette, beauty campaign
a golden retriever wearing sunglasses on a beach, funny social media ad, blue sky
healthy salad bowl with avocado and tomatoes, top view, food delivery promotion
new collection of winter jackets, snowy forest background, outdoor adventure brand
electric bicycle in a modern city street, eco friendly commute, clean energy campaign
buy now limited offer free shipping best price quality guaranteed new arrival
great product fast delivery excellent service would recommend to friends five stars
terrible quality broken on arrival never buying again waste of money refund please
the text is too small the image is blurry low quality spammy content clickbait
""".split()

CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Plain BPE on CLIP-style words (last symbol carries ``</w>``), most frequent pair first."""
    byte_map = bytes_to_unicode()
    seqs = Counter()
    for w in words:
        symbols = [byte_map[b] for b in w.lower().encode()]
        symbols[-1] += "</w>"
        seqs[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs = Counter()
        for seq, freq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties broken by the pair itself
        merges.append(best)
        merged = Counter()
        for seq, freq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] += freq
        seqs = merged
    return merges


def _filler_merges(known: set[str], count: int) -> list[tuple[str, str]]:
    """Valid extra merges (letter strings grown one letter at a time) to reach a vocabulary size."""
    out: list[tuple[str, str]] = []
    for length in itertools.count(2):
        for combo in itertools.product(string.ascii_lowercase, repeat=length):
            if len(out) >= count:
                return out
            word = "".join(combo)
            if word in known or word[:-1] not in known and length > 2:
                continue
            out.append((word[:-1], word[-1]))
            known.add(word)


@functools.cache
def clip_vocab(vocab_size: int) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """(vocab items, merges) of a CLIP-layout BPE with exactly ``vocab_size`` entries."""
    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]
    n_merges = vocab_size - len(base) - 2
    if n_merges < 0:
        raise UnsupportedError(f"a CLIP tokenizer needs a vocabulary of at least {len(base) + 2}, not {vocab_size}")
    merges = _learn_merges(CORPUS, n_merges)
    tokens = base + ["".join(m) for m in merges]
    merges += _filler_merges(set(tokens), n_merges - len(merges))
    tokens = base + ["".join(m) for m in merges]
    # a merge may recreate a token already present; keep ids unique while preserving the count
    seen: dict[str, int] = {}
    for tok in tokens:
        seen.setdefault(tok, len(seen))
    i = 0
    while len(seen) < vocab_size - 2:
        seen.setdefault(f"<|unused{i}|>", len(seen))
        i += 1
    seen[CLIP_START] = vocab_size - 2
    seen[CLIP_END] = vocab_size - 1
    return tuple(seen.items()), tuple(f"{a} {b}" for a, b in merges)


def clip_tokenizer(vocab_size: int = 1000, model_max_length: int = 77, pad_token: str = CLIP_END):
    """A generated CLIP tokenizer (pads with ``<|endoftext|>``, as SD 1.x; SDXL's second pads with ``!``)."""
    from transformers import CLIPTokenizer

    items, merges = clip_vocab(vocab_size)
    # Files, passed positionally: the one constructor form transformers 4.x and 5.x share.
    with tempfile.TemporaryDirectory(prefix="fastgen-vocab-") as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(dict(items), ensure_ascii=False))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length,
                             pad_token=pad_token)


@functools.cache
def bert_vocab(vocab_size: int) -> tuple[str, ...]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w for w, _ in Counter(w.lower().strip(string.punctuation) for w in CORPUS).most_common() if w]
    vocab = BERT_SPECIALS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + words
    vocab = list(dict.fromkeys(vocab))
    filler = ("".join(p) for n in itertools.count(2) for p in itertools.product(string.ascii_lowercase, repeat=n))
    while len(vocab) < vocab_size:
        vocab.append("##" + next(filler))
    return tuple(vocab[:vocab_size])


def bert_tokenizer(vocab_size: int = 1000, model_max_length: int = 128):
    """A generated WordPiece tokenizer for the BERT-style text classifier."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory(prefix="fastgen-vocab-") as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(bert_vocab(vocab_size)) + "\n")
        return BertTokenizer(vocab=str(path), model_max_length=model_max_length)


T5_PAD, T5_EOS, T5_UNK, T5_SPACE = "<pad>", "</s>", "<unk>", "\u2581"
#: T5's sentencepiece model has 32000 pieces plus 100 sentinel ids (the model's table has 32128 rows).
T5_PIECES, T5_EXTRA_IDS = 32000, 100


@functools.cache
def t5_vocab(size: int) -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) of a T5-layout Unigram model with exactly ``size`` pieces.

    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5; then the corpus words (most frequent first, scored
    so a known word is always one piece), single characters as fallback, and letter strings as filler.
    """
    words = [w for w, _ in Counter(w.lower().strip(string.punctuation) for w in CORPUS).most_common() if w]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, -2.0)]
    pieces += [(T5_SPACE + w, -3.0 - i / 1000) for i, w in enumerate(words)]
    pieces += [(c, -10.0) for c in chars] + [(T5_SPACE + c, -10.0) for c in chars]
    known = {p for p, _ in pieces}
    filler = ("".join(p) for n in itertools.count(2) for p in itertools.product(string.ascii_lowercase, repeat=n))
    while len(pieces) < size:
        piece = next(filler)
        if piece not in known:
            pieces.append((piece, -12.0 - len(pieces) / 1e5))
    return tuple(pieces[:size])


def t5_tokenizer(vocab_size: int = 32128, model_max_length: int = 512):
    """A generated T5TokenizerFast for a T5 encoder's vocabulary: a Unigram model built with ``tokenizers``,
    ``</s>`` appended to every text, padding with ``<pad>`` (id 0). Models with T5's vocabulary get its 32000
    pieces and 100 sentinel ids; smaller (tiny) ones one piece per row and no sentinels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    extra = T5_EXTRA_IDS if vocab_size >= T5_PIECES + T5_EXTRA_IDS else 0
    pieces = list(t5_vocab(min(vocab_size - extra, T5_PIECES)))
    # Sentinels last, in reverse order (<extra_id_0> has the highest id), as T5's tokenizer numbers them.
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=T5_SPACE, prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement=T5_SPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS],
                                                       special_tokens=[(T5_EOS, 1)])
    # A tokenizer.json file: the constructor form transformers 4.x and 5.x share.
    with tempfile.TemporaryDirectory(prefix="fastgen-vocab-") as tmp:
        path = Path(tmp) / "tokenizer.json"
        tok.save(str(path))
        return T5TokenizerFast(tokenizer_file=str(path), extra_ids=extra, model_max_length=model_max_length,
                               pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK)


def preset_tokenizer(config: dict[str, Any], class_name: str, component: str | None = None):
    """The generated tokenizer that fits a preset's text model config (``component``: its name in the preset)."""
    vocab = int(config["vocab_size"])
    max_len = int(config.get("max_position_embeddings", 77))
    if class_name.startswith("T5"):
        return t5_tokenizer(vocab)
    if class_name.startswith("CLIP"):
        # SDXL's and SD3's second tokenizer (CLIP-G) pads with "!" (id 0), their first with <|endoftext|>
        # (SD3's first is a projection model too, so the component decides when known).
        second = component == "text-encoder-2" if component else class_name == "CLIPTextModelWithProjection"
        return clip_tokenizer(vocab, min(max_len, 77), pad_token="!" if second else CLIP_END)
    return bert_tokenizer(vocab, max_len)


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer saved in a local folder (``tokenizer_config.json`` / vocab files), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

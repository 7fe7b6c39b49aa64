"""A tiny random BERT written to a folder, for fast tests of anything that embeds labels.

Import it from a test module under tests/unit (pytest puts that folder on ``sys.path``)::

    from _tiny_bert import write_tiny_bert
    cfg = TextConfig(checkpoint=str(write_tiny_bert(tmp_path / "bert")))
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

HIDDEN = 32
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARS = string.ascii_lowercase + string.digits
# Single characters and their "##" continuations make any lowercase word tokenize without [UNK].
_WORDS = ["pan", "tilt", "zoom", "left", "right", "up", "down", "in", "out", "to", "the", "rotate", "still"]


def write_tiny_bert(path: str | Path, *, hidden: int = HIDDEN, seed: int = 0) -> Path:
    """Write a 2-layer, 2-head random BERT (``hidden_size`` ``hidden``) and its WordPiece tokenizer to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _SPECIAL + list(_CHARS) + [f"##{c}" for c in _CHARS] + _WORDS + list(string.punctuation)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(path)
    return path

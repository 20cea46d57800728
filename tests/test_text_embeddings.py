"""Vocabulary embeddings: the 81-template ensemble and the on-disk cache."""
import pytest
import torch

import clip
from regionspot.modeling import text_embeddings as te
from regionspot.modeling.clip_features import ClipDenseFeatures, build_clip


@pytest.fixture(scope="module")
def feats():
    return ClipDenseFeatures(build_clip("tiny", random_init=True, seed=2), 64)


def test_templates_and_cleaning():
    assert len(te.PROMPT_TEMPLATES) == 81 and te.PROMPT_TEMPLATES[0] == "{}."
    assert te.PROMPT_TEMPLATES[1] == "a bad photo of a {}." and te.PROMPT_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(set(te.PROMPT_TEMPLATES)) == 81
    assert te.clean_class_name("wall-other-merged") == "wall"
    assert te.clean_class_name("convertible_(automobile)") == "convertible_(automobile)"


def test_encoding_is_mean_of_sentences(feats):
    emb = te.encode_vocabulary(feats, ["cat", "dog-stuff"], show_progress=False, batch_size=50)
    assert emb.shape == (2, feats.embed_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    sentences = [t.format("dog") for t in te.PROMPT_TEMPLATES]
    manual = feats.encode_text(clip.tokenize(sentences)).mean(0)
    torch.testing.assert_close(emb[1], manual / manual.norm(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        te.encode_vocabulary(feats, [])


def test_cache_hit_encodes_nothing(feats, tmp_path, monkeypatch):
    cache = te.TextEmbeddingCache(str(tmp_path))
    first = cache.get(feats, ["cat", "dog"])
    assert len(list(tmp_path.glob("text_*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(te, "encode_vocabulary", fail)
    second = te.TextEmbeddingCache(str(tmp_path)).get(feats, ["cat", "dog"])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="cache miss"):
        cache.get(feats, ["dog", "cat"])  # other names, other key
    other = ClipDenseFeatures(build_clip("tiny", random_init=True, seed=99), 64)
    with pytest.raises(AssertionError, match="cache miss"):
        cache.get(other, ["cat", "dog"])  # other weights, other key


def test_corrupt_cache_file_is_rebuilt(feats, tmp_path):
    cache = te.TextEmbeddingCache(str(tmp_path))
    key = cache.key(feats, ["cat"], te.PROMPT_TEMPLATES)
    (tmp_path / f"text_{key}.pt").write_bytes(b"not a torch file")
    emb = cache.get(feats, ["cat"])
    assert emb.shape == (1, feats.embed_dim)

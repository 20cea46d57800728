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


def _long_name(limit: int = 77) -> str:
    """A name whose longest prompt sentence is exactly ``limit`` tokens with SOT and EOT."""
    tokenizer = clip.clip._tokenizer
    words = ["striped"]
    while max(len(tokenizer.encode(t.format(" ".join(words + ["striped"])))) + 2 for t in te.PROMPT_TEMPLATES) <= limit:
        words.append("striped")
    return " ".join(words)


def test_fast_encode_text_matches_stock(feats, caplog):
    long_name = _long_name()
    sentences = ["a.", "a photo of a cat.", f"a photo of the {long_name}.", "itap of my convertible_(automobile)."]
    tokens = clip.tokenize(sentences)
    assert int(tokens.argmax(-1).max()) < 76
    widths = []  # positions the text tower runs over
    hook = feats.model.token_embedding.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        with caplog.at_level("WARNING"):
            torch.testing.assert_close(
                feats.encode_text(tokens), feats.encode_text(tokens, stock=True), rtol=0, atol=1e-5
            )
            # A batch of short sentences only: the tower runs over a few positions.
            short = tokens[[0, 1]]
            torch.testing.assert_close(
                feats.encode_text(short), feats.encode_text(short, stock=True), rtol=0, atol=1e-5
            )
    finally:
        hook.remove()
    assert widths == [int(tokens.argmax(-1).max()) + 1, 77, int(short.argmax(-1).max()) + 1, 77]
    assert "full context" not in caplog.text  # clip's tower is the causal one: no fallback
    # A sentence that fills the whole context (EOT at position 76).
    tokenizer = clip.clip._tokenizer
    longest = max(te.PROMPT_TEMPLATES, key=lambda t: len(tokenizer.encode(t.format(long_name))))
    full = clip.tokenize([longest.format(long_name)])
    assert full[0, 76] == full.max()
    torch.testing.assert_close(feats.encode_text(full), feats.encode_text(full, stock=True), rtol=0, atol=1e-5)


def test_non_causal_text_tower_falls_back_to_stock(caplog):
    model = build_clip("tiny", random_init=True, seed=3)
    for block in model.transformer.resblocks:
        block.attn_mask = torch.zeros(77, 77)  # full attention: later positions change earlier ones
    bidirectional = ClipDenseFeatures(model, 64)
    tokens = clip.tokenize(["a.", "a photo of a cat."])
    with caplog.at_level("WARNING"):
        out = bidirectional.encode_text(tokens)
    torch.testing.assert_close(out, bidirectional.encode_text(tokens, stock=True), rtol=0, atol=0)
    assert "not the stock causal" in caplog.text


@pytest.mark.parametrize("batch_size", [1, 7, 50, 256, 100000])
def test_fast_vocabulary_matches_stock(feats, batch_size, monkeypatch):
    long_name = _long_name()
    # Names of very different lengths, with panoptic suffixes and LVIS-style underscores.
    names = ["a", "cat", "photo", "a photo", "dog-stuff", "convertible_(automobile)", "wall-other-merged", long_name]
    # Repeated templates, and "{}." / "a {}." make "a photo." for both "a photo" and "photo".
    templates = te.PROMPT_TEMPLATES + ("{}.", "a {}.", "a photo of a {}.")
    reference = te.encode_vocabulary(feats, names, templates, batch_size=256, show_progress=False, stock=True)

    calls = []
    original = feats.encode_text

    def recording(tokens, stock=False):
        calls.append(tokens.shape[0])
        return original(tokens, stock=stock)

    monkeypatch.setattr(feats, "encode_text", recording)
    fast = te.encode_vocabulary(feats, names, templates, batch_size=batch_size, show_progress=False)
    assert fast.shape == reference.shape == (len(names), feats.embed_dim)
    assert (fast - reference).abs().max() < 1e-5
    distinct = {s for n in names for s in (t.format(te.clean_class_name(n)) for t in templates)}
    assert sum(calls) == len(distinct) < len(names) * len(templates)  # each distinct sentence once
    assert max(calls) <= batch_size


def test_batch_size_must_be_positive(feats):
    with pytest.raises(ValueError, match="VOCAB.BATCH_SIZE"):
        te.encode_vocabulary(feats, ["cat"], batch_size=0, show_progress=False)


def test_cache_key_unchanged(feats, tmp_path):
    """The fast encoding gives the stock embeddings, so cache files written before it stay valid."""
    import hashlib

    assert te._CACHE_FORMAT == "regionspot-text-v1"
    names = ["cat", "dog-stuff", _long_name()]
    h = hashlib.sha256()  # the key as the stock-path versions computed it
    fingerprint = te._text_tower_fingerprint(feats)
    parts = ("regionspot-text-v1", fingerprint, "\x1f".join(te.PROMPT_TEMPLATES), "\x1f".join(names))
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x1e")
    cache = te.TextEmbeddingCache(str(tmp_path))
    assert cache.key(feats, names, te.PROMPT_TEMPLATES) == h.hexdigest()[:32]
    # An entry encoded the stock way is served as is, and matches what the fast path encodes.
    stock = te.encode_vocabulary(feats, names, show_progress=False, stock=True)
    torch.save({"class_names": names, "embeddings": stock}, cache.path(h.hexdigest()[:32]))
    torch.testing.assert_close(cache.get(feats, names), stock, rtol=0, atol=0)
    assert (te.encode_vocabulary(feats, names, show_progress=False) - stock).abs().max() < 1e-5

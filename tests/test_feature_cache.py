"""
Feature cache (regionspot/data/feature_cache.py, regionspot/engine/fingerprints.py,
regionspot/engine/feature_extraction.py behind tools/extract_features.py): cached tokens and
features equal the online computation for each view, the loss from the cache equals the online
loss, extraction resumes, stale and corrupt caches are refused, and the trainer runs from the cache
without running SAM or CLIP.
"""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from conftest import TINY_CONFIG, tiny_cfg
from hooks import RecordLoss

from regionspot.data import mappers
from regionspot.data.feature_cache import (
    MANIFEST_NAME,
    CachedFeatureMapper,
    FeatureCache,
    FeatureCacheError,
    StaleFeatureCacheError,
    get_view,
)
from regionspot.data.shapes import SHAPES_CLASSES, generate_shapes_split
from regionspot.engine import Trainer, build_train_loader, check_feature_cache
from regionspot.engine import feature_extraction

DATASET = "test_feature_cache_shapes"
NUM_IMAGES = 6
EMPTY = 5  # index of the image whose annotations are removed


def _opts(*extra):
    return ["DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()", *extra]


def _cfg(*extra):
    return tiny_cfg(*_opts(*extra))


def _extract(out, *extra_opts, views="identity,hflip"):
    argv = ["--config-file", TINY_CONFIG, "--output", str(out), "--views", views, "--no-progress", "--opts"]
    return feature_extraction.main(argv + [str(o) for o in _opts(*extra_opts)])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    dicts = generate_shapes_split(str(tmp_path_factory.mktemp("fc_shapes")), "train", NUM_IMAGES, 3)
    dicts[EMPTY]["annotations"] = []  # images without boxes are cached too (N = 0)
    DatasetCatalog.register(DATASET, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(DATASET).set(thing_classes=list(SHAPES_CLASSES))
    yield dicts
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


@pytest.fixture(scope="module")
def cache_dir(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("fc") / "cache"
    summary = _extract(out)
    assert summary["images"] == summary["extracted"] == NUM_IMAGES and summary["skipped"] == 0
    assert summary["records"] == 2 * NUM_IMAGES and summary["bytes"] > 0
    assert summary["regions"] == 2 * sum(len(d["annotations"]) for d in shapes)  # tokens of both views
    return out


@pytest.fixture
def cache_copy(cache_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    return out


def _xyxy(d):
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_manifest_and_views(cache_dir, shapes):
    cache = FeatureCache(str(cache_dir))
    m = cache.manifest
    assert m["datasets"][DATASET] == {"num_images": NUM_IMAGES, "views": ["identity", "hflip"]}
    assert m["sam"]["type"] == "tiny" and m["clip"]["input_size"] == 128 and m["dtype"] == "float16"
    assert m["views"]["hflip"]["hflip"] and not m["views"]["identity"]["hflip"]
    cfg = _cfg()
    check_feature_cache(cache, cfg)
    check_feature_cache(cache, build_model(cfg))  # the very tensors of a model built from the config
    cache.check_complete(DATASET)
    # views are drawn at random per dict (detectron2 seeds numpy's global RNG)
    mapper = CachedFeatureMapper(cache, DATASET)
    np.random.seed(0)
    assert {mapper(shapes[0])["cache_view"] for _ in range(20)} == {"identity", "hflip"}
    assert get_view("short64_hflip").get_transform((128, 160)).transforms[0].new_h == 64
    with pytest.raises(ValueError, match="Unknown feature-cache view"):
        get_view("rotate90")


def test_cached_features_equal_online(cache_dir, shapes):
    head = build_model(_cfg()).roi_heads.eval()
    cache = FeatureCache(str(cache_dir))
    for d in shapes:
        image = np.array(utils.read_image(d["file_name"], format="RGB"))
        h, w = image.shape[:2]
        boxes = _xyxy(d)
        flipped = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])
        classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.int64)
        for view, img, bxs in (("identity", image, boxes), ("hflip", np.ascontiguousarray(image[:, ::-1]), flipped)):
            rec = cache.load(DATASET, view, d["image_id"])
            state, feats = head.encode_image(img)
            out = head.sam.decode_prompts(state, bxs, with_masks=False)
            assert rec["region_tokens"].dtype == rec["clip_features"].dtype == torch.float16
            assert rec["region_tokens"].shape == (len(boxes), head.sam.token_dim)
            assert rec["clip_features"].shape == (head.clip.num_tokens, head.clip.width)
            torch.testing.assert_close(rec["region_tokens"].float(), out.tokens, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(rec["clip_features"].float(), feats[0], rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(rec["gt_boxes"], bxs)
            assert torch.equal(rec["gt_classes"], classes)
            assert rec["image_size"] == [h, w] and rec["view"] == view
    assert len(cache.load(DATASET, "identity", shapes[EMPTY]["image_id"])["region_tokens"]) == 0


def test_loss_from_cache_equals_online(cache_dir, shapes):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    cache = FeatureCache(str(cache_dir))
    check_feature_cache(cache, cfg)
    for view, augmentations in (("identity", []), ("hflip", [T.RandomFlip(prob=1.0)])):
        online = DatasetMapper(
            is_train=True, augmentations=augmentations, image_format=cfg.INPUT.FORMAT, use_instance_mask=False
        )
        cached = CachedFeatureMapper(cache, DATASET, views=[view])
        batch_online = [online(copy.deepcopy(d)) for d in shapes]
        batch_cached = [cached(d) for d in shapes]
        assert all("image" not in x and "region_tokens" in x for x in batch_cached)
        for a, b in zip(batch_online, batch_cached):
            assert a["instances"].image_size == b["instances"].image_size
            assert (a["height"], a["width"]) == (b["height"], b["width"])
            torch.testing.assert_close(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        loss_online = model(batch_online)["loss_region_cls"]
        loss_cached = model(batch_cached)["loss_region_cls"]
        assert loss_online.item() > 0
        torch.testing.assert_close(loss_cached, loss_online, rtol=1e-3, atol=1e-4)
        loss_cached.backward()
    assert all(p.grad is not None for p in model.roi_heads.fusion.parameters() if p.requires_grad)


def test_resume_rewrites_only_missing_or_corrupt(cache_copy, shapes):
    cache = FeatureCache(str(cache_copy))
    files = sorted(cache_copy.rglob("*.pt"))
    assert len(files) == 2 * NUM_IMAGES
    before = {f: f.stat().st_mtime_ns for f in files}
    missing = cache.path(DATASET, "hflip", shapes[2]["image_id"])
    corrupt = cache.path(DATASET, "identity", shapes[4]["image_id"])
    os.remove(missing)
    with open(corrupt, "r+b") as f:  # flip bytes in the middle of the file
        f.seek(os.path.getsize(corrupt) // 2)
        f.write(b"\x00\xff\x00\xff")
    summary = _extract(cache_copy)
    assert (summary["extracted"], summary["skipped"], summary["rewritten"], summary["records"]) == (2, 4, 1, 2)
    for f in files:
        if str(f) in (missing, corrupt):
            assert cache.verify(DATASET, f.parent.name, int(f.stem))
        else:
            assert f.stat().st_mtime_ns == before[f], f"{f} was rewritten"
    assert _extract(cache_copy)["extracted"] == 0  # nothing left to do
    # adding a view extends the cache in place; the old files stay
    summary = _extract(cache_copy, views="identity,hflip,short64")
    assert summary["extracted"] == NUM_IMAGES and summary["records"] == NUM_IMAGES
    assert FeatureCache(str(cache_copy)).dataset_views(DATASET) == ["identity", "hflip", "short64"]
    assert all(f.stat().st_mtime_ns == before[f] for f in files if str(f) not in (missing, corrupt))


@pytest.mark.parametrize(
    "opts, field",
    [
        (("MODEL.REGIONSPOT.CLIP.INPUT_SIZE", 64), "MODEL.REGIONSPOT.CLIP.INPUT_SIZE is 128 in the cache but 64"),
        (("MODEL.REGIONSPOT.FROZEN.SEED", 7), "MODEL.REGIONSPOT.FROZEN.SEED"),
        (("MODEL.REGIONSPOT.FROZEN.PRECISION", "bf16"),
         "MODEL.REGIONSPOT.FROZEN.PRECISION .* is 'fp32' in the cache but 'bf16'"),
    ],
)
def test_stale_cache_is_refused(cache_copy, opts, field):
    manifest = (cache_copy / MANIFEST_NAME).read_text()
    cfg = _cfg("MODEL.REGIONSPOT.FEATURE_CACHE.DIR", str(cache_copy), *opts)
    with pytest.raises(StaleFeatureCacheError, match=field) as e:
        build_train_loader(cfg)
    assert "tools/extract_features.py" in str(e.value) and "new --output directory" in str(e.value).lower()
    with pytest.raises(StaleFeatureCacheError, match=field.split(" ")[0]):
        _extract(cache_copy, *opts)
    with pytest.raises(StaleFeatureCacheError, match="fingerprint of|input size|precision"):
        check_feature_cache(FeatureCache(str(cache_copy)), build_model(_cfg(*opts)))
    assert (cache_copy / MANIFEST_NAME).read_text() == manifest  # refused before writing anything


def test_clip_antialias_is_recorded(cache_copy):
    """A cache of the un-antialiased CLIP view is refused with antialias on; old manifests read as off."""
    cfg = _cfg("MODEL.REGIONSPOT.FEATURE_CACHE.DIR", str(cache_copy), "MODEL.REGIONSPOT.CLIP.RESIZE_ANTIALIAS", True)
    with pytest.raises(StaleFeatureCacheError, match="RESIZE_ANTIALIAS is False in the cache but True"):
        build_train_loader(cfg)
    manifest = json.loads((cache_copy / MANIFEST_NAME).read_text())
    settings = manifest.get("settings", manifest)
    del settings["clip"]["resize_antialias"]
    (cache_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    build_train_loader(_cfg("MODEL.REGIONSPOT.FEATURE_CACHE.DIR", str(cache_copy)))


def test_stale_view_or_dataset_and_missing_dataset(cache_copy, tmp_path):
    cache = FeatureCache(str(cache_copy))
    cfg = _cfg("DATASETS.TRAIN", "('regionspot_shapes_val',)")
    with pytest.raises(FeatureCacheError, match="no features of dataset 'regionspot_shapes_val'"):
        check_feature_cache(cache, cfg)
    from regionspot.data.feature_cache import CachedView

    with pytest.raises(StaleFeatureCacheError, match="view 'hflip'"):
        cache.prepare(cache.manifest, {}, [CachedView("hflip", short_edge=64, max_size=100, hflip=True)])
    with pytest.raises(StaleFeatureCacheError, match="the dataset changed"):
        cache.prepare(cache.manifest, {DATASET: NUM_IMAGES + 1}, [])


def test_corrupt_and_missing_files_are_named(cache_copy, shapes):
    cache = FeatureCache(str(cache_copy))
    check_feature_cache(cache, _cfg())
    image_id = shapes[1]["image_id"]
    path = cache.path(DATASET, "identity", image_id)
    good = open(path, "rb").read()

    with open(path, "wb") as f:  # truncated
        f.write(good[: len(good) // 3])
    with pytest.raises(FeatureCacheError, match=f"{path}.*corrupt"):
        cache.load(DATASET, "identity", image_id)
    with pytest.raises(FeatureCacheError, match=path):  # through the mapper as training sees it
        CachedFeatureMapper(cache, DATASET, views=["identity"])(shapes[1])

    with open(path, "wb") as f:
        f.write(good)
    rec = cache.load(DATASET, "identity", image_id)
    rec["region_tokens"][0, 0] += 1  # a valid file whose values changed
    torch.save(rec, path)
    with pytest.raises(FeatureCacheError, match=f"{path}.*checksum"):
        cache.load(DATASET, "identity", image_id)

    with open(path, "wb") as f:
        f.write(good)
    changed = copy.deepcopy(shapes[1])
    changed["annotations"][0]["category_id"] = (changed["annotations"][0]["category_id"] + 1) % len(SHAPES_CLASSES)
    with pytest.raises(FeatureCacheError, match=f"{path}.*other annotations"):
        CachedFeatureMapper(cache, DATASET, views=["identity"])(changed)

    os.remove(path)
    with pytest.raises(FeatureCacheError, match=f"missing: {path}"):
        cache.load(DATASET, "identity", image_id)
    with pytest.raises(FeatureCacheError, match="incomplete.*'identity'.*5 of 6"):
        cache.check_complete(DATASET)


def test_trainer_from_cache_runs_no_sam_clip_or_image_decoding(cache_dir, tmp_path, monkeypatch):
    cfg = _cfg(
        "MODEL.REGIONSPOT.FEATURE_CACHE.DIR", str(cache_dir), "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", 5,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.EVAL_PERIOD", 0, "SOLVER.WARMUP_ITERS", 0,
    )
    trainer = Trainer(cfg)
    head = trainer.model.roi_heads

    def fail(*args, **kwargs):
        raise AssertionError("SAM/CLIP or image decoding ran while training from the feature cache")

    monkeypatch.setattr(head.sam, "encode_image", fail)
    monkeypatch.setattr(head.clip, "dense_features", fail)
    monkeypatch.setattr(utils, "read_image", fail)
    monkeypatch.setattr(mappers, "read_image", fail)  # the reader of RegionSpot's mappers
    fusion = {n: p.detach().clone() for n, p in head.fusion.named_parameters()}
    losses = []
    trainer.register_hooks([RecordLoss(losses)])
    trainer.train()
    assert len(losses) == 5 and all(np.isfinite(losses)) and max(losses) > 0
    assert any(not torch.equal(p, fusion[n]) for n, p in head.fusion.named_parameters())


def test_weights_file_fingerprint(shapes, tmp_path):
    from regionspot.modeling.sam_tokens import build_sam

    sam = build_sam("tiny", "", random_init=True, seed=0)
    weights = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), weights)
    out = tmp_path / "cache"
    assert _extract(out, "MODEL.REGIONSPOT.SAM.WEIGHTS", str(weights), views="identity")["extracted"] == NUM_IMAGES
    cache = FeatureCache(str(out))
    assert cache.manifest["sam"]["weights_sha256"] and cache.manifest["sam"]["random_init_seed"] is None
    check_feature_cache(cache, _cfg("MODEL.REGIONSPOT.SAM.WEIGHTS", str(weights)))
    moved = tmp_path / "moved.pth"
    os.replace(weights, moved)  # the path is not part of the fingerprint
    check_feature_cache(cache, _cfg("MODEL.REGIONSPOT.SAM.WEIGHTS", str(moved)))
    state = sam.state_dict()
    state["mask_decoder.iou_token.weight"][0, 0] += 1e-3  # one weight of the decoder
    torch.save(state, moved)
    with pytest.raises(StaleFeatureCacheError, match="SHA-256 of MODEL.REGIONSPOT.SAM.WEIGHTS"):
        check_feature_cache(cache, _cfg("MODEL.REGIONSPOT.SAM.WEIGHTS", str(moved)))
    with pytest.raises(StaleFeatureCacheError, match="source of SAM's weights .* 'a weights file' in the cache"):
        check_feature_cache(cache, _cfg())  # random SAM weights now

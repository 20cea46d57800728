"""Multi-dataset training: one dataset per batch, its own vocabulary, weighted and seeded choice."""
import itertools
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.utils import comm

import regionspot.modeling.text_embeddings as text_embeddings
from regionspot.data import build_regionspot_train_mapper
from regionspot.data.multi_dataset import (
    MultiDatasetTrainLoader,
    build_multi_dataset_train_loader,
    dataset_choice_seed,
    dataset_class_names,
    read_coco_category_names,
)
from regionspot.data.shapes import SHAPES_CLASSES, generate_shapes_split
from regionspot.data.training_datasets import TRAINING_DATASETS, register_training_datasets

from regionspot.engine import Trainer, register_training_vocabularies

from conftest import tiny_cfg
from hooks import RecordLoss

# Dataset B keeps 3 of the shapes classes, renamed and with other category ids:
# shapes class index -> (category id, name). By id: 10 star, 20 diamond, 30 square.
_B_CLASSES = {1: (30, "square shape"), 3: (10, "star shape"), 5: (20, "diamond shape")}
_B_THING_CLASSES = ["star shape", "diamond shape", "square shape"]


def _write_coco_json(dicts, path, categories, remap, categories_first):
    """COCO instances json of shapes dicts; ``remap``: shapes class -> category id (others dropped)."""
    images, annotations = [], []
    for d in dicts:
        images.append({"id": d["image_id"] + 1, "file_name": os.path.basename(d["file_name"]),
                       "height": d["height"], "width": d["width"]})
        for a in d["annotations"]:
            if a["category_id"] not in remap:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": d["image_id"] + 1, "bbox": a["bbox"],
                                "category_id": remap[a["category_id"]], "area": a["area"], "iscrowd": 0})
    body = {"images": images, "annotations": annotations}
    content = dict(categories=categories, **body) if categories_first else dict(body, categories=categories)
    with open(path, "w") as f:
        json.dump(content, f, indent=1)


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """Two small COCO-format datasets of shapes images with different class lists."""
    root = tmp_path_factory.mktemp("multi_dataset")
    dicts_a = generate_shapes_split(str(root / "a"), "train", 20, seed=11)
    dicts_b = generate_shapes_split(str(root / "b"), "train", 20, seed=12)
    json_a, json_b = root / "a.json", root / "b.json"
    _write_coco_json(dicts_a, json_a, [{"id": i + 1, "name": n} for i, n in enumerate(SHAPES_CLASSES)],
                     {i: i + 1 for i in range(len(SHAPES_CLASSES))}, categories_first=True)
    _write_coco_json(dicts_b, json_b, [{"id": i, "name": n} for i, n in _B_CLASSES.values()],
                     {k: v[0] for k, v in _B_CLASSES.items()}, categories_first=False)
    return {"a": (str(json_a), str(root / "a" / "train")), "b": (str(json_b), str(root / "b" / "train"))}


_counter = itertools.count()


@pytest.fixture
def datasets(coco_files):
    """Fresh names (nothing loaded, no thing_classes in the metadata yet) for the two datasets."""
    k = next(_counter)
    names = []
    for key in ("a", "b"):
        name = f"test_multi_{key}_{k}"
        register_coco_instances(name, {}, *coco_files[key])
        names.append(name)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _loader_cfg(names, *opts):
    return tiny_cfg("DATASETS.TRAIN", tuple(names), "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", 2,
                    "DATALOADER.NUM_WORKERS", 0, *opts)


def _mapper_factory(seen):
    def factory(cfg, name):
        seen.append(name)
        return build_regionspot_train_mapper(cfg)

    return factory


def _signature(loader, n):
    return [(b[0]["vocabulary"], tuple(x["file_name"] for x in b)) for b in itertools.islice(iter(loader), n)]


def test_batches_from_one_dataset_follow_the_ratios(datasets):
    a, b = datasets
    seen = []
    loader = build_multi_dataset_train_loader(_loader_cfg(datasets, "DATALOADER.DATASET_RATIOS", [3, 1], "SEED", 3),
                                              _mapper_factory(seen))
    assert seen == [a, b]
    counts = {a: 0, b: 0}
    for batch in itertools.islice(iter(loader), 200):
        assert len(batch) == 2
        vocab = {x["vocabulary"] for x in batch}
        assert len(vocab) == 1
        name = vocab.pop()
        counts[name] += 1
        num_classes = 6 if name == a else 3
        for x in batch:
            assert x["file_name"].startswith(os.path.dirname(MetadataCatalog.get(name).json_file))
            assert ((x["instances"].gt_classes >= 0) & (x["instances"].gt_classes < num_classes)).all()
    assert counts[b] > 0
    assert 0.65 <= counts[a] / 200 <= 0.85, counts
    # Loading the datasets set thing_classes from the json: B's are its own, ordered by category id.
    assert MetadataCatalog.get(a).thing_classes == list(SHAPES_CLASSES)
    assert MetadataCatalog.get(b).thing_classes == _B_THING_CLASSES


def test_choice_is_reproducible_and_per_rank(datasets, monkeypatch):
    def signature(seed):
        cfg = _loader_cfg(datasets, "SEED", seed)
        return _signature(build_multi_dataset_train_loader(cfg, _mapper_factory([])), 40)

    first = signature(5)
    assert {v for v, _ in first} == set(datasets)
    assert signature(5) == first
    assert [v for v, _ in signature(6)] != [v for v, _ in first]
    # Iterating the same loader again starts over.
    loader = build_multi_dataset_train_loader(_loader_cfg(datasets, "SEED", 5), _mapper_factory([]))
    assert _signature(loader, 10) == _signature(loader, 10) == first[:10]
    # Each rank draws its own sequence; without a seed the choice is still fixed.
    assert dataset_choice_seed(5, 0) != dataset_choice_seed(5, 1)
    assert dataset_choice_seed(-1, 0) == dataset_choice_seed(-1, 0)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    other_rank = build_multi_dataset_train_loader(_loader_cfg(datasets, "SEED", 5), _mapper_factory([]))
    assert other_rank.seed == dataset_choice_seed(5, 1)
    assert [v for v, _ in _signature(other_rank, 40)] != [v for v, _ in first]


def test_single_dataset_is_tagged(datasets):
    loader = build_multi_dataset_train_loader(_loader_cfg(datasets[1:]), _mapper_factory([]))
    for batch in itertools.islice(iter(loader), 3):
        assert [x["vocabulary"] for x in batch] == [datasets[1]] * 2


def test_loaders_start_only_when_drawn():
    class Loader:
        def __init__(self, tag):
            self.tag, self.started = tag, 0

        def __iter__(self):
            self.started += 1
            return itertools.repeat([{"tag": self.tag}])

    loaders = [Loader("x"), Loader("y")]
    it = iter(MultiDatasetTrainLoader(["x", "y"], loaders, [0.0, 1.0], seed="s"))
    assert loaders[0].started == loaders[1].started == 0
    assert all(next(it)[0]["tag"] == "y" for _ in range(20))
    assert (loaders[0].started, loaders[1].started) == (0, 1)


@pytest.mark.parametrize("ratios", [[1], [1, 1, 1], [1, 0], [2, -1]])
def test_bad_ratios_fail_before_loading(ratios):
    # Unregistered names: the ratios are checked before any dataset is looked at.
    cfg = _loader_cfg(["nope_one", "nope_two"], "DATALOADER.DATASET_RATIOS", ratios)
    with pytest.raises(ValueError, match=r"DATALOADER\.DATASET_RATIOS.*nope_one|nope_one.*DATALOADER\.DATASET_RATIOS"):
        build_multi_dataset_train_loader(cfg, _mapper_factory([]))


def test_class_names_read_from_the_json_before_loading(datasets, coco_files, tmp_path):
    a, b = datasets
    assert MetadataCatalog.get(b).get("thing_classes", None) is None
    assert dataset_class_names(b) == _B_THING_CLASSES
    assert MetadataCatalog.get(b).thing_classes == _B_THING_CLASSES
    DatasetCatalog.get(b)  # detectron2's loader sets the same names (it refuses a different value)
    assert MetadataCatalog.get(b).thing_dataset_id_to_contiguous_id == {10: 0, 20: 1, 30: 2}
    # The scan finds the categories wherever they are, across chunk boundaries.
    for key, expected in (("a", list(SHAPES_CLASSES)), ("b", _B_THING_CLASSES)):
        for chunk in (3, 17, 1 << 20):
            assert read_coco_category_names(coco_files[key][0], chunk_size=chunk) == expected
    no_categories = tmp_path / "none.json"
    no_categories.write_text(json.dumps({"images": [], "annotations": []}))
    assert read_coco_category_names(str(no_categories)) is None


def test_dataset_without_class_names_fails_clearly(tmp_path):
    DatasetCatalog.register("test_multi_no_classes", lambda: [])
    try:
        with pytest.raises(ValueError, match="test_multi_no_classes.*thing_classes"):
            dataset_class_names("test_multi_no_classes")
    finally:
        DatasetCatalog.remove("test_multi_no_classes")
    register_coco_instances("test_multi_missing_json", {}, str(tmp_path / "missing.json"), str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match="missing.json"):
            dataset_class_names("test_multi_missing_json")
    finally:
        DatasetCatalog.remove("test_multi_missing_json")
        MetadataCatalog.remove("test_multi_missing_json")


def test_training_over_two_datasets(datasets, tmp_path):
    a, b = datasets
    cfg = _loader_cfg(datasets, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", 10, "SOLVER.CHECKPOINT_PERIOD", 1000,
                      "TEST.EVAL_PERIOD", 0, "SEED", 0)
    trainer = Trainer(cfg)  # A's class names come from its json: nothing is loaded before the loader
    head = trainer.model.roi_heads
    widths = {name: head.classifier.vocabularies[name][1].shape for name in (a, b)}
    assert widths == {a: (6, head.clip.embed_dim), b: (3, head.clip.embed_dim)}
    assert head.classifier.vocabularies[b][0] == _B_THING_CLASSES
    assert head.class_names == list(SHAPES_CLASSES)  # current vocabulary: DATASETS.TRAIN[0]'s

    logits_widths = []
    logits = head.classifier.forward

    def spy(region_embeddings, vocabulary=None):
        out = logits(region_embeddings, vocabulary)
        logits_widths.append((vocabulary, out.shape[-1]))
        return out

    head.classifier.forward = spy
    losses = []
    trainer.register_hooks([RecordLoss(losses)])
    trainer.train()
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert len(logits_widths) == 10
    assert {v for v, _ in logits_widths} == {a, b}
    assert all(width == {a: 6, b: 3}[v] for v, width in logits_widths), logits_widths


def test_vocabularies_are_encoded_once(datasets, tmp_path, monkeypatch):
    a, b = datasets
    encoded, events = [], []
    original = text_embeddings.encode_vocabulary

    def counting(clip, names, *args, **kwargs):
        encoded.append(list(names))
        events.append("encode")
        return original(clip, names, *args, **kwargs)

    def failing(*args, **kwargs):
        raise AssertionError("text encoded a second time")

    def cfg(cache):
        return _loader_cfg(datasets, "MODEL.REGIONSPOT.VOCAB.SOURCE", "custom", "MODEL.REGIONSPOT.VOCAB.CUSTOM",
                           ["unrelated thing"], "MODEL.REGIONSPOT.VOCAB.CACHE_DIR", str(tmp_path / cache))

    monkeypatch.setattr(text_embeddings, "encode_vocabulary", counting)
    model = build_model(cfg("one"))
    encoded.clear()
    assert register_training_vocabularies(model, [a, b]) == {a: 6, b: 3}
    assert encoded == [list(SHAPES_CLASSES), _B_THING_CLASSES]
    # A second start (another rank, a restart) reads the cache.
    monkeypatch.setattr(text_embeddings, "encode_vocabulary", failing)
    again = build_model(cfg("one"))
    register_training_vocabularies(again, [a, b])
    for name in (a, b):
        torch.testing.assert_close(again.roi_heads.classifier.vocabularies[name][1], model.roi_heads.classifier.vocabularies[name][1])

    # Distributed, as seen by one process: the local main process encodes and writes the cache before
    # the barrier; the other processes wait at the barrier and then only read the cache.
    monkeypatch.setattr(text_embeddings, "encode_vocabulary", counting)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(comm, "get_local_rank", lambda: 0)
    events.clear()
    main = Trainer.build_model(cfg("two"))
    assert events == ["encode", "sync", "encode", "encode", "sync"]
    monkeypatch.setattr(comm, "get_local_rank", lambda: 1)
    events.clear()
    other = Trainer.build_model(cfg("two"))
    assert events == ["sync", "sync"]
    assert set(other.roi_heads.classifier.vocabularies) == set(main.roi_heads.classifier.vocabularies) == {a, b}


def test_training_datasets_are_registered():
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    expected = {
        "objects365_v1_train": ("objects365/annotations/objects365_train.json", "objects365/train/"),
        "objects365_v1_val": ("objects365/annotations/objects365_val.json", "objects365/val/"),
        "v3det_train": ("v3det/annotations/v3det_2023_v1_train.json", "v3det/"),
        "v3det_val": ("v3det/annotations/v3det_2023_v1_val.json", "v3det/"),
        "openimages_v6_train": ("openimages/annotations/openimages_v6_train_bbox.json", "openimages/train/"),
        "openimages_v6_val": ("openimages/annotations/openimages_v6_val_bbox.json", "openimages/validation/"),
    }
    assert TRAINING_DATASETS == expected
    registered = DatasetCatalog.list()
    for name, (json_file, image_root) in expected.items():
        assert name in registered
        meta = MetadataCatalog.get(name)
        assert meta.json_file == os.path.join(root, json_file)
        assert meta.image_root == os.path.join(root, image_root)
        assert meta.evaluator_type == "coco"
    # Registering again (with any root) keeps what is registered.
    assert register_training_datasets("/elsewhere") == list(expected)
    assert MetadataCatalog.get("v3det_train").json_file == os.path.join(root, expected["v3det_train"][0])

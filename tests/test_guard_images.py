"""
Bad image files never give silent garbage and one bad file never loses a run:
regionspot/data/images.py (the shared reader), demo/demo.py (skip with a warning, --strict, output
folder guard), the data mappers (errors name the file and image id) and tools/extract_features.py
(skip with a warning; the cache stays visibly incomplete).
"""
import copy
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from conftest import REPO_ROOT, TINY_CONFIG, tiny_cfg

from regionspot.data.feature_cache import FeatureCache, FeatureCacheError
from regionspot.data.images import ImageReadError, probe_image, read_image, to_8bit
from regionspot.data.mappers import RegionSpotTestMapper, build_regionspot_train_mapper
from regionspot.data.shapes import SHAPES_CLASSES, generate_shapes_split

DEMO = os.path.join(REPO_ROOT, "demo", "demo.py")


def _load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photo(h=48, w=64, seed=0):
    """A smooth RGB test image (JPEG-friendly, so a truncated copy is still a valid header)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], axis=-1)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


def _truncated_jpeg(path):
    Image.fromarray(_photo(96, 128)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _sixteen_bit(h=120, w=160):
    """uint16 gray covering 0..65535 (most values > 255: PIL's convert("RGB") makes them white)."""
    return (np.linspace(0, 65535, h * w).round().astype(np.uint16)).reshape(h, w)


@pytest.fixture
def files(tmp_path):
    """One file per guarded case."""
    d = tmp_path / "cases"
    d.mkdir()
    out = {"truncated": _truncated_jpeg(d / "truncated.jpg")}
    out["html"] = d / "html.jpg"
    out["html"].write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    out["empty"] = d / "empty.jpg"
    out["empty"].write_bytes(b"")
    out["missing"] = d / "missing.jpg"
    out["sixteen"] = d / "sixteen.png"
    img16 = Image.fromarray(_sixteen_bit())
    assert img16.mode == "I;16"
    img16.save(out["sixteen"])
    gray = _photo()[:, :, 0]
    out["gray"] = d / "gray.png"
    Image.fromarray(gray, "L").save(out["gray"])
    rgba = np.dstack([_photo(), np.linspace(0, 255, 48 * 64).astype(np.uint8).reshape(48, 64)])
    out["rgba"] = d / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(out["rgba"])
    out["palette"] = d / "palette.png"
    pal = Image.fromarray(_photo()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(out["palette"])
    out["_arrays"] = {"gray": gray, "rgba": rgba}
    return out


# -------------------------------------------------------------------------------------------------
# The reader
@pytest.mark.parametrize(
    "case, reason, words",
    [
        ("truncated", "truncated or corrupt", "truncated"),
        ("html", "not an image", "HTML"),
        ("empty", "empty", "0 bytes"),
        ("missing", "missing", "no such file"),
    ],
)
def test_read_image_bad_files_raise_one_error_naming_file(files, case, reason, words):
    path = str(files[case])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    e = info.value
    assert isinstance(e, ValueError) and e.path == path and e.reason == reason
    msg = str(e)
    assert msg.startswith(f"Cannot read image {path}: ") and words in msg and "\n" not in msg
    assert e.fix and msg.rstrip(".").endswith(e.fix)  # the fix is part of the message
    # Reading never switches PIL's global "fill truncated images with grey".
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_probe_image_checks_header_only(files):
    assert probe_image(str(files["truncated"])) == (128, 96)  # the full read finds it, not the probe
    for case in ("html", "empty", "missing"):
        with pytest.raises(ImageReadError, match="Cannot read image " + str(files[case])):
            probe_image(str(files[case]))


def test_sixteen_bit_png_is_scaled_not_white(files):
    img = read_image(str(files["sixteen"]))
    expected = (_sixteen_bit() >> 8).astype(np.uint8)
    assert img.dtype == np.uint8 and img.shape == expected.shape + (3,)
    np.testing.assert_array_equal(img, np.repeat(expected[:, :, None], 3, axis=2))
    assert (img == 255).mean() < 0.01  # detectron2's reader clips: nearly all white
    np.testing.assert_array_equal(read_image(str(files["sixteen"]), format="L")[:, :, 0], expected)


def test_sixteen_bit_modes_and_undefined_ranges():
    a = _sixteen_bit(8, 9)
    expected = (a >> 8).astype(np.uint8)
    big_endian = Image.frombytes("I;16B", (9, 8), a.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_8bit(big_endian)), expected)
    as_int32 = Image.fromarray(a.astype(np.int32))
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_8bit(as_int32)), expected)
    with pytest.raises(ImageReadError, match="no defined 8-bit range"):
        to_8bit(Image.fromarray(np.full((4, 4), 70000, np.int32)), "x.tif")
    with pytest.raises(ImageReadError, match="mode F"):
        to_8bit(Image.fromarray(np.ones((4, 4), np.float32)), "x.tif")


@pytest.mark.parametrize("case", ["gray", "rgba", "palette"])
def test_eight_bit_modes_as_detectron2(files, case):
    path = str(files[case])
    img = read_image(path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    # 8-bit files give exactly detectron2's arrays (evaluation numbers stay comparable).
    np.testing.assert_array_equal(img, utils.read_image(path, format="RGB"))
    np.testing.assert_array_equal(read_image(path, format="BGR"), img[:, :, ::-1])
    if case == "gray":
        np.testing.assert_array_equal(img, np.repeat(files["_arrays"]["gray"][:, :, None], 3, axis=2))
    elif case == "rgba":  # alpha dropped, as detectron2 does
        np.testing.assert_array_equal(img, files["_arrays"]["rgba"][:, :, :3])
    else:
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(img, expected)


def test_exif_orientation_as_detectron2(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270 on reading
    Image.fromarray(_photo()).save(path, exif=exif, quality=95)
    img = read_image(str(path))
    assert img.shape[:2] == (64, 48)
    np.testing.assert_array_equal(img, utils.read_image(str(path), format="RGB"))


def test_error_survives_pickling_and_workers(files):
    e = pytest.raises(ImageReadError, read_image, str(files["empty"])).value
    copy_ = pickle.loads(pickle.dumps(e))
    assert type(copy_) is ImageReadError and str(copy_) == str(e) and copy_.path == e.path and copy_.reason == "empty"
    assert str(ImageReadError("message only")) == "message only"  # how torch's workers rebuild it


# -------------------------------------------------------------------------------------------------
# The mappers
def _dict(path, image_id=7):
    return {"file_name": str(path), "image_id": image_id, "annotations": []}


def test_test_mapper_error_names_file_and_image_id(files):
    mapper = RegionSpotTestMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=False)
    for case in ("truncated", "html", "missing"):
        with pytest.raises(ImageReadError) as info:
            mapper(_dict(files[case]))
        msg = str(info.value)
        assert f"Cannot read image {files[case]} (image_id 7 of the dataset)" in msg
        assert "remove image 7 from the dataset json" in msg and "change the AP" in msg
    # A 16-bit image reaches the model as its >> 8 gray, not white.
    out = mapper(_dict(files["sixteen"]))
    expected = torch.as_tensor((_sixteen_bit() >> 8).astype(np.uint8))
    assert torch.equal(out["image"], expected.expand(3, -1, -1))


def test_train_mapper_error_names_file_also_from_a_worker(files):
    mapper = build_regionspot_train_mapper(tiny_cfg())
    with pytest.raises(ImageReadError, match=r"truncated\.jpg \(image_id 7 of the dataset\).*training stops"):
        mapper(_dict(files["truncated"]))
    # train_net's loaders map in worker processes: the error arrives with its type and message.
    loader = torch.utils.data.DataLoader([_dict(files["html"], 3)], batch_size=None, num_workers=1, collate_fn=mapper)
    with pytest.raises(ImageReadError, match=r"html\.jpg \(image_id 3 of the dataset\)"):
        next(iter(loader))


# -------------------------------------------------------------------------------------------------
# The demo
@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(REGIONSPOT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return e


def _run_demo(args, env):
    proc = subprocess.run(
        [sys.executable, DEMO, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    return proc, proc.stdout + proc.stderr


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def demo_inputs(files, tmp_path):
    """A folder of two good images (one 16-bit), three bad ones, and boxes for all of them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_photo()).save(folder / "good.png")
    for case in ("sixteen", "truncated", "html", "empty"):
        (folder / files[case].name).write_bytes(files[case].read_bytes())
    boxes = {f.name: [[2, 2, 20, 20], [10, 5, 30, 25, 0.5]] for f in folder.iterdir()}
    boxes_path = tmp_path / "boxes.json"
    boxes_path.write_text(json.dumps(boxes))
    return folder, boxes_path


def _demo_args(folder, boxes, out, *extra):
    return [
        "--input", str(folder), "--boxes", str(boxes), "--vocabulary", "custom", "--custom-vocabulary", "a,b",
        "--confidence-threshold", "0", "--no-masks", "--output", str(out), *extra,
    ]


def test_demo_skips_bad_images_and_writes_the_good(demo_inputs, env, tmp_path):
    folder, boxes = demo_inputs
    out = tmp_path / "out"
    proc, log = _run_demo(_demo_args(folder, boxes, out), env)
    assert proc.returncode == 0, log
    results = json.loads((out / "results.json").read_text())
    # sorted inputs: empty.jpg, good.png, html.jpg, sixteen.png, truncated.jpg; ids are their indices
    assert {(os.path.basename(e["file_name"]), e["image_id"]) for e in results} == {("good.png", 1), ("sixteen.png", 3)}
    assert len(results) == 4
    assert sorted(os.listdir(out)) == ["good.png", "results.json", "sixteen.png", "vocabulary.json"]
    for name, words in (("truncated.jpg", "truncated"), ("html.jpg", "HTML"), ("empty.jpg", "0 bytes")):
        lines = [line for line in log.splitlines() if f"Cannot read image {folder / name}" in line]
        assert len(lines) == 1 and "WARNING" in lines[0] and words in lines[0] and "Skipping it" in lines[0], log
    assert "3 images skipped (see warnings)" in log
    # the 16-bit image was drawn from its >> 8 gray, not from an all-white image
    vis = np.asarray(Image.open(out / "sixteen.png").convert("RGB"))
    expected = (_sixteen_bit() >> 8).astype(np.uint8)
    np.testing.assert_array_equal(vis[60:, 80:, 0], expected[60:, 80:])  # away from the boxes and labels


def test_demo_strict_stops_at_first_bad_image(demo_inputs, env, tmp_path):
    folder, boxes = demo_inputs
    proc, log = _run_demo(_demo_args(folder, boxes, tmp_path / "out", "--strict"), env)
    assert proc.returncode != 0
    assert f"Cannot read image {folder / 'empty.jpg'}" in log and "--strict" in log
    assert not (tmp_path / "out" / "results.json").exists()
    # a truncated file passes the header check: --strict stops at the full read
    for name in ("html.jpg", "empty.jpg"):
        (folder / name).unlink()
    proc, log = _run_demo(_demo_args(folder, boxes, tmp_path / "out2", "--strict"), env)
    assert proc.returncode != 0 and f"Cannot read image {folder / 'truncated.jpg'}" in log, log
    assert "Traceback" not in log


def test_demo_refuses_output_over_inputs(demo_inputs, env, tmp_path):
    folder, boxes = demo_inputs
    before = _snapshot(folder)
    proc, log = _run_demo(_demo_args(folder, boxes, folder), env)
    assert proc.returncode != 0 and "is the input folder" in log and "--output" in log and "_regionspot" in log
    assert _snapshot(folder) == before
    demo = _load_script("regionspot_demo_guard", DEMO)

    def run(*argv):
        return demo.run(demo.get_parser().parse_args(list(argv)))

    good = folder / "good.png"
    with pytest.raises(ValueError, match="holds the input image"):  # a glob's folder, spelled otherwise
        run("--input", str(folder / "*.png"), "--boxes", str(boxes), "--output", str(folder) + "/./")
    with pytest.raises(ValueError, match="is the input file"):
        run("--input", str(good), "--boxes", str(boxes), "--output", str(good))
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(ValueError, match="is the input folder"):
        run("--input", str(folder), "--boxes", str(boxes), "--output", str(link))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "good.png").symlink_to(good)  # writing over the link would overwrite the photo
    with pytest.raises(ValueError, match="holds the input image"):
        run("--input", str(elsewhere / "good.png"), "--boxes", str(boxes), "--output", str(elsewhere))
    named = tmp_path / "named"
    named.mkdir()
    (named / "results.json").write_text(boxes.read_text())
    with pytest.raises(ValueError, match="replace the --boxes file"):
        run("--input", str(good), "--boxes", str(named / "results.json"), "--output", str(named))
    with pytest.raises(ValueError, match=r"Cannot read image .*empty\.jpg.*cannot be read either.*nothing to do"):
        run("--input", str(folder / "empty.jpg"), str(folder / "html.jpg"), "--boxes", str(boxes),
            "--output", str(tmp_path / "o"))
    assert _snapshot(folder) == before and not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------------
# The feature extractor
def test_extract_features_skips_unreadable_image(tmp_path):
    from regionspot.engine import feature_extraction as extract

    name = "test_guard_images_shapes"
    dicts = generate_shapes_split(str(tmp_path / "shapes"), "train", 3, 0)
    bad = tmp_path / "bad.png"
    data = open(dicts[1]["file_name"], "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    dicts[1]["file_name"] = str(bad)
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
    try:
        out = tmp_path / "cache"
        argv = ["--config-file", TINY_CONFIG, "--output", str(out), "--views", "identity", "--no-progress",
                "--dataset", name]
        summary = extract.main(argv)
        assert summary["images"] == 3 and summary["extracted"] == 2 and summary["unreadable"] == 1
        [entry] = summary["unreadable_files"]
        assert entry["file_name"] == str(bad) and entry["image_id"] == dicts[1]["image_id"] and "truncated" in entry["error"]
        assert not os.path.exists(FeatureCache(str(out)).path(name, "identity", dicts[1]["image_id"]))
        # the manifest counts 3 images: training from this cache refuses instead of training without it
        with pytest.raises(FeatureCacheError, match="incomplete.*2 of 3"):
            FeatureCache(str(out)).check_complete(name)
        with pytest.raises(SystemExit, match=rf"{bad}.*image_id {dicts[1]['image_id']!r} of dataset.*--strict"):
            extract.main(argv + ["--strict"])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

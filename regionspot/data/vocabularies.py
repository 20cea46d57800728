"""
Built-in vocabularies for open-vocabulary recognition: LVIS v1, COCO and Objects365 v1 class names,
plus comma-separated custom lists, all through :func:`get_vocabulary`.

The names are returned exactly as the datasets spell them (``"aerosol_can"``, ``"cabinet/shelf"``);
the text encoder's templates are filled with them as they are (see
:func:`regionspot.modeling.text_embeddings.clean_class_name`), so the cache key of a vocabulary does
not depend on where it came from.
"""
from typing import List, Sequence, Union

__all__ = ["OBJECTS365_CLASSES", "VOCABULARY_NAMES", "get_vocabulary", "parse_custom_vocabulary"]

VOCABULARY_NAMES = ("lvis", "coco", "objects365", "custom")

# Objects365 v1 (the 2019 release, objects365_train.json / objects365_val.json), ordered by category id
# 1..365, so list index i is category id i + 1. One deviation from the annotation files: category 159
# is spelled "tissue " (trailing space) there and "tissue" here. Objects365 v2 renamed and re-ordered
# many categories ("Person", "Other Shoes", ...); this is NOT the v2 list.
OBJECTS365_CLASSES = (
    # 1-10
    "person", "sneakers", "chair", "hat", "lamp", "bottle", "cabinet/shelf", "cup", "car", "glasses",
    # 11-20
    "picture/frame", "desk", "handbag", "street lights", "book", "plate", "helmet", "leather shoes",
    "pillow", "glove",
    # 21-30
    "potted plant", "bracelet", "flower", "tv", "storage box", "vase", "bench", "wine glass", "boots",
    "bowl",
    # 31-40
    "dining table", "umbrella", "boat", "flag", "speaker", "trash bin/can", "stool", "backpack",
    "couch", "belt",
    # 41-50
    "carpet", "basket", "towel/napkin", "slippers", "barrel/bucket", "coffee table", "suv", "toy",
    "tie", "bed",
    # 51-60
    "traffic light", "pen/pencil", "microphone", "sandals", "canned", "necklace", "mirror", "faucet",
    "bicycle", "bread",
    # 61-70
    "high heels", "ring", "van", "watch", "sink", "horse", "fish", "apple", "camera", "candle",
    # 71-80
    "teddy bear", "cake", "motorcycle", "wild bird", "laptop", "knife", "traffic sign", "cell phone",
    "paddle", "truck",
    # 81-90
    "cow", "power outlet", "clock", "drum", "fork", "bus", "hanger", "nightstand", "pot/pan", "sheep",
    # 91-100
    "guitar", "traffic cone", "tea pot", "keyboard", "tripod", "hockey", "fan", "dog", "spoon",
    "blackboard/whiteboard",
    # 101-110
    "balloon", "air conditioner", "cymbal", "mouse", "telephone", "pickup truck", "orange", "banana",
    "airplane", "luggage",
    # 111-120
    "skis", "soccer", "trolley", "oven", "remote", "baseball glove", "paper towel", "refrigerator",
    "train", "tomato",
    # 121-130
    "machinery vehicle", "tent", "shampoo/shower gel", "head phone", "lantern", "donut",
    "cleaning products", "sailboat", "tangerine", "pizza",
    # 131-140
    "kite", "computer box", "elephant", "toiletries", "gas stove", "broccoli", "toilet", "stroller",
    "shovel", "baseball bat",
    # 141-150
    "microwave", "skateboard", "surfboard", "surveillance camera", "gun", "life saver", "cat",
    "lemon", "liquid soap", "zebra",
    # 151-160
    "duck", "sports car", "giraffe", "pumpkin", "piano", "stop sign", "radiator", "converter",
    "tissue", "carrot",
    # 161-170
    "washing machine", "vent", "cookies", "cutting/chopping board", "tennis racket", "candy",
    "skating and skiing shoes", "scissors", "folder", "baseball",
    # 171-180
    "strawberry", "bow tie", "pigeon", "pepper", "coffee machine", "bathtub", "snowboard", "suitcase",
    "grapes", "ladder",
    # 181-190
    "pear", "american football", "basketball", "potato", "paint brush", "printer", "billiards",
    "fire hydrant", "goose", "projector",
    # 191-200
    "sausage", "fire extinguisher", "extension cord", "facial mask", "tennis ball", "chopsticks",
    "electronic stove and gas stove", "pie", "frisbee", "kettle",
    # 201-210
    "hamburger", "golf club", "cucumber", "clutch", "blender", "tong", "slide", "hot dog",
    "toothbrush", "facial cleanser",
    # 211-220
    "mango", "deer", "egg", "violin", "marker", "ship", "chicken", "onion", "ice cream", "tape",
    # 221-230
    "wheelchair", "plum", "bar soap", "scale", "watermelon", "cabbage", "router/modem", "golf ball",
    "pine apple", "crane",
    # 231-240
    "fire truck", "peach", "cello", "notepaper", "tricycle", "toaster", "helicopter", "green beans",
    "brush", "carriage",
    # 241-250
    "cigar", "earphone", "penguin", "hurdle", "swing", "radio", "CD", "parking meter", "swan",
    "garlic",
    # 251-260
    "french fries", "horn", "avocado", "saxophone", "trumpet", "sandwich", "cue", "kiwi fruit",
    "bear", "fishing rod",
    # 261-270
    "cherry", "tablet", "green vegetables", "nuts", "corn", "key", "screwdriver", "globe", "broom",
    "pliers",
    # 271-280
    "volleyball", "hammer", "eggplant", "trophy", "dates", "board eraser", "rice",
    "tape measure/ruler", "dumbbell", "hamimelon",
    # 281-290
    "stapler", "camel", "lettuce", "goldfish", "meat balls", "medal", "toothpaste", "antelope",
    "shrimp", "rickshaw",
    # 291-300
    "trombone", "pomegranate", "coconut", "jellyfish", "mushroom", "calculator", "treadmill",
    "butterfly", "egg tart", "cheese",
    # 301-310
    "pig", "pomelo", "race car", "rice cooker", "tuba", "crosswalk sign", "papaya", "hair drier",
    "green onion", "chips",
    # 311-320
    "dolphin", "sushi", "urinal", "donkey", "electric drill", "spring rolls", "tortoise/turtle",
    "parrot", "flute", "measuring cup",
    # 321-330
    "shark", "steak", "poker card", "binoculars", "llama", "radish", "noodles", "yak", "mop", "crab",
    # 331-340
    "microscope", "barbell", "bread/bun", "baozi", "lion", "red cabbage", "polar bear", "lighter",
    "seal", "mangosteen",
    # 341-350
    "comb", "eraser", "pitaya", "scallop", "pencil case", "saw", "table tennis paddle", "okra",
    "starfish", "eagle",
    # 351-360
    "monkey", "durian", "game board", "rabbit", "french horn", "ambulance", "asparagus",
    "hoverboard", "pasta", "target",
    # 361-365
    "hotair balloon", "chainsaw", "lobster", "iron", "flashlight",
)
assert len(OBJECTS365_CLASSES) == 365 and len(set(OBJECTS365_CLASSES)) == 365


def parse_custom_vocabulary(custom: Union[str, Sequence[str], None]) -> List[str]:
    """
    ``"cat, dog ,sofa"`` (or a list of such strings) -> ``["cat", "dog", "sofa"]``: split on commas,
    strip whitespace, drop empty entries, keep the first of repeated names.
    """
    if custom is None:
        return []
    parts = [custom] if isinstance(custom, str) else list(custom)
    names: List[str] = []
    for part in parts:
        for name in str(part).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def _lvis_names() -> List[str]:
    # The thing_classes of detectron2's lvis_v1_* datasets (each category's first synonym; differs
    # from "name" only for id 76, 'horned_cow' / 'bull'), so the demo's vocabulary and evaluation's
    # are the same and share one text-embedding cache entry.
    from detectron2.data.datasets.lvis import get_lvis_instances_meta

    return list(get_lvis_instances_meta("lvis_v1")["thing_classes"])


def _coco_names() -> List[str]:
    # detectron2's builtin metadata: available without the dataset's files.
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import builtin  # noqa: F401  (registers coco_2017_val)

    return list(MetadataCatalog.get("coco_2017_val").thing_classes)


def get_vocabulary(name: str, custom: Union[str, Sequence[str], None] = None) -> List[str]:
    """
    Class names of a built-in vocabulary.

    Args:
        name: ``"lvis"`` (LVIS v1, 1203 names ordered by category id), ``"coco"`` (80 names, the
            order of detectron2's ``thing_classes``), ``"objects365"`` (365 Objects365 v1 names
            ordered by category id) or ``"custom"``.
        custom: for ``"custom"``: a comma-separated string or a list of names (see
            :func:`parse_custom_vocabulary`).

    Returns:
        the class names; index i is class i of the model's outputs.
    """
    key = str(name).strip().lower()
    if key == "lvis":
        return _lvis_names()
    if key == "coco":
        return _coco_names()
    if key == "objects365":
        return list(OBJECTS365_CLASSES)
    if key == "custom":
        names = parse_custom_vocabulary(custom)
        if not names:
            raise ValueError(
                "The custom vocabulary is empty: give comma-separated class names, e.g. \"cat,dog,sofa\"."
            )
        return names
    raise ValueError(f"Unknown vocabulary {name!r}; choose one of: {', '.join(VOCABULARY_NAMES)}.")

"""The Cityscapes label table, read once from cityscapesscripts (never retyped), and the label space of any dataset.

Everything in the suite that needs class names, colours or the id <-> trainId mapping imports it from here.
`LabelSpace` says which values another dataset's label images hold (its number of classes, and HF's
reduce_labels); `CITYSCAPES` is the 19 trainIds.
"""

from dataclasses import dataclass

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

IGNORE_INDEX = 255

# The 19 evaluated classes in trainId order (0..18). cityscapesscripts also lists ignored labels with trainId
# 255 or -1 (license plate): those all become IGNORE_INDEX.
_TRAIN_LABELS = sorted((label for label in _CITYSCAPES_LABELS if 0 <= label.trainId < IGNORE_INDEX),
                       key=lambda label: label.trainId)
NUM_CLASSES = len(_TRAIN_LABELS)
CLASS_NAMES = tuple(label.name for label in _TRAIN_LABELS)
ID2LABEL = dict(enumerate(CLASS_NAMES))
PALETTE = np.array([label.color for label in _TRAIN_LABELS], dtype=np.uint8)  # (19, 3) RGB

# Lookup tables indexed by a uint8 pixel value.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)  # IGNORE_INDEX -> 0 ("unlabeled"), as the test server expects
for _label in _TRAIN_LABELS:
    ID_TO_TRAIN_ID[_label.id] = _label.trainId
    TRAIN_ID_TO_ID[_label.trainId] = _label.id

# trainId -> RGB for colorized maps; ignored pixels are black. Datasets with more classes than Cityscapes get fixed
# random colours beyond the 19 (a seeded generator: the same class has the same colour in every picture).
_COLOR_LUT = np.zeros((256, 3), dtype=np.uint8)
_COLOR_LUT[:NUM_CLASSES] = PALETTE
_COLOR_LUT[NUM_CLASSES:IGNORE_INDEX] = np.random.default_rng(0).integers(0, 256, (IGNORE_INDEX - NUM_CLASSES, 3))


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """HxW trainId map (uint8 or int) -> HxWx3 uint8 RGB in the Cityscapes palette."""
    return _COLOR_LUT[np.asarray(train_ids).astype(np.uint8)]


@dataclass(frozen=True)
class LabelSpace:
    """The values a dataset's label images hold: classes 0..num_labels-1 and IGNORE_INDEX.

    reduce_labels: the Hugging Face examples' option for datasets whose 0 is "background" (e.g. ADE20k): 0 becomes
    IGNORE_INDEX and every other value v becomes v - 1 (255 stays 255), applied when a label is read.
    """

    num_labels: int = NUM_CLASSES
    reduce_labels: bool = False

    def __post_init__(self):
        if not 1 <= self.num_labels <= IGNORE_INDEX:
            raise ValueError(f"num_labels: expected 1..{IGNORE_INDEX} classes (8-bit labels, {IGNORE_INDEX} = "
                             f"ignore), got {self.num_labels}")

    def lookup(self) -> np.ndarray:
        """uint8 (256,) table from a stored label value to a training id."""
        table = np.arange(256, dtype=np.uint8)
        if self.reduce_labels:
            table = np.concatenate([[IGNORE_INDEX], table[:-2], [IGNORE_INDEX]]).astype(np.uint8)
        return table

    def valid(self) -> np.ndarray:
        """bool (256,): the training ids a label may hold."""
        valid = np.zeros(256, dtype=bool)
        valid[:self.num_labels] = valid[IGNORE_INDEX] = True
        return valid


CITYSCAPES = LabelSpace()

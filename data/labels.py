"""The Cityscapes label table, read once from cityscapesscripts (never retyped).

Everything in the suite that needs class names, colours or the id <-> trainId mapping imports it from here.
"""

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

# trainId -> RGB for colorized maps; ignored pixels are black.
_COLOR_LUT = np.zeros((256, 3), dtype=np.uint8)
_COLOR_LUT[:NUM_CLASSES] = PALETTE


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """HxW trainId map (uint8 or int) -> HxWx3 uint8 RGB in the Cityscapes palette."""
    return _COLOR_LUT[np.asarray(train_ids).astype(np.uint8)]

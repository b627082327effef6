"""The label table must be cityscapesscripts' own, in the recipe's trainId order."""

import numpy as np
from cityscapesscripts.helpers.labels import id2label as cs_id2label

from data.labels import CLASS_NAMES, ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES, PALETTE, TRAIN_ID_TO_ID, colorize


def test_train_ids_come_from_the_recipe_label_ids():
    # docs/recipe.md section 4: trainIds 0..18 come from these ids, in this order; everything else is ignored.
    recipe_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert NUM_CLASSES == 19
    assert [int(i) for i in TRAIN_ID_TO_ID[:NUM_CLASSES]] == recipe_ids
    for label_id in range(256):
        expected = recipe_ids.index(label_id) if label_id in recipe_ids else IGNORE_INDEX
        assert ID_TO_TRAIN_ID[label_id] == expected
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[-1] == "bicycle"


def test_palette_and_colorize_match_cityscapesscripts():
    for train_id, label_id in enumerate(TRAIN_ID_TO_ID[:NUM_CLASSES]):
        assert tuple(PALETTE[train_id]) == cs_id2label[int(label_id)].color
    train_ids = np.array([[0, 18], [IGNORE_INDEX, 10]], dtype=np.uint8)
    rgb = colorize(train_ids)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == tuple(PALETTE[18]) and tuple(rgb[1, 0]) == (0, 0, 0)

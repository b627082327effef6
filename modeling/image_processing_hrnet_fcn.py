"""The image processor saved with the model: the recipe's test-time preprocessing, for transformers' pipelines.

    processor = HRNetFCNImageProcessor()
    inputs = processor(images=[image], return_tensors="pt")      # whole image, its own size, normalized
    label_map = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[image.size[::-1]])[0]

Segformer's processor (PIL/NumPy backend: no torchvision needed) with the recipe's settings: no resize (whole-image
inference at the image's own size), mean/std on 0-255 RGB as mmseg's img_norm_cfg, and its semantic
post-processing (logits upsampled bilinearly, align_corners=False, to the image size, then argmax), which is
scripts/infer.py's whole mode. Like modeling/hrnet_fcn.py, this file is copied into saved folders: it imports
numpy and transformers only.
"""

import numpy as np
from transformers import SegformerImageProcessorPil


class HRNetFCNImageProcessor(SegformerImageProcessorPil):
    """Whole-image preprocessing of the fcn_hr18 recipe, bit for bit as data/transforms.py normalizes."""

    do_resize = False  # whole-image inference: the image keeps its size
    size = None
    do_rescale = False  # mean and std are on the 0-255 scale, as the recipe's
    image_mean = [123.675, 116.28, 103.53]  # RGB
    image_std = [58.395, 57.12, 57.375]

    def normalize(self, image: np.ndarray, mean, std, **kwargs) -> np.ndarray:
        # mmcv (the recipe, and data/transforms.py) multiplies by 1 / std; dividing by std, as transformers does,
        # differs in the last bit for about a third of the 0-255 values, which can flip a near tie between classes.
        mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        inv_std = np.asarray([1.0 / s for s in std], dtype=np.float32).reshape(-1, 1, 1)
        return (image.astype(np.float32) - mean) * inv_std


# save_pretrained writes this file and an `auto_map` into preprocessor_config.json (AutoImageProcessor, pipelines).
HRNetFCNImageProcessor.register_for_auto_class("AutoImageProcessor")

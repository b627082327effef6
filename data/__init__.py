"""Cityscapes data: label table, synthetic generator, discovery, preparation, transforms, fast path."""

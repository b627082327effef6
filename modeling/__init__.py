"""The network (HRNet-W18 + FCN head on timm), its loss, and the metric."""

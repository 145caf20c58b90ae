"""The cross-modal analyses: overlap (nIoU), interchange of sub-circuits, image-to-text alignment, back-patching."""

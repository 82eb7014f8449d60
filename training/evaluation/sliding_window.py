"""Sliding-window inference for semantic segmentation (mmsegmentation's "slide" test mode).

Windows of a fixed size step over the image by a fixed stride; the last window of each row and column is
aligned to the image border, so the windows cover every pixel. Each pixel's logits are the mean over the
windows that contain it. Along a side shorter than the window, the window is clipped to the image (one window
spans that side), as mmseg's `slide_inference` does, so the model sees the image itself and no padding. A model
that takes only multiples of a size (a ViT's patch size) gets each crop zero-padded at the bottom/right to the
next multiple (zero is the mean colour after normalisation) and its logits cropped back.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(
            f"{name} must be a positive int or a (height, width) pair of positive ints, got {value}"
        )
    return pair


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one side; the last window ends at the border (mmseg's grid)."""
    num_windows = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(num_windows)]


def window_positions(
    height: int, width: int, window: int | tuple[int, int], stride: int | tuple[int, int]
) -> list[tuple[int, int]]:
    """(top, left) corners of the slide windows over an image of at least the window's size, row-major."""
    window_h, window_w = _pair(window, "window")
    stride_h, stride_w = _pair(stride, "stride")
    rows = _window_starts(height, window_h, stride_h)
    cols = _window_starts(width, window_w, stride_w)
    return [(top, left) for top in rows for left in cols]


def sliding_window_logits(
    forward_fn: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    num_labels: int,
    window: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    crops_per_batch: int = 8,
    size_multiple: int = 1,
) -> torch.Tensor:
    """Average the logits of overlapping windows over each image.

    Args:
        forward_fn: maps crops (n, 3, h, w) to logits (n, num_labels, h, w), e.g.
            `lambda x: model(pixel_values=x).logits`; h, w are the window clipped to the image, rounded up to
            `size_multiple`. Call this under `torch.inference_mode()`.
        pixel_values: normalised images (B, 3, H, W); H and W need not be equal or multiples of anything.
        num_labels: number of classes C.
        window: window size, an int or (height, width); clipped to the image along a shorter side.
        stride: step between windows, an int or (height, width), at most the window size.
        crops_per_batch: how many crops (over windows and images) go through `forward_fn` at once.
        size_multiple: crop sides `forward_fn` accepts are multiples of this (the patch size of a ViT); a crop
            that is not is zero-padded at the bottom/right to the next multiple and its logits cropped back.

    Returns:
        float32 logits (B, C, H, W) on the device of `pixel_values`.
    """
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
    window_h, window_w = _pair(window, "window")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > window_h or stride_w > window_w:
        raise ValueError(f"stride {stride} exceeds window {window}; use a stride no larger than the window")
    if crops_per_batch < 1:
        raise ValueError(f"crops_per_batch must be at least 1, got {crops_per_batch}")
    if not isinstance(size_multiple, int) or size_multiple < 1:
        raise ValueError(f"size_multiple must be a positive int (the patch size), got {size_multiple}")
    batch_size, _, height, width = pixel_values.shape
    # mmseg clips the crop to the image: a side shorter than the window is covered by one window of its size.
    window_h, window_w = min(window_h, height), min(window_w, width)
    positions = window_positions(height, width, (window_h, window_w), (stride_h, stride_w))
    # The smallest bottom/right padding that makes each crop a multiple of size_multiple.
    pad_h, pad_w = -window_h % size_multiple, -window_w % size_multiple

    logits = pixel_values.new_zeros((batch_size, num_labels, height, width), dtype=torch.float32)
    counts = pixel_values.new_zeros((height, width), dtype=torch.float32)
    for top, left in positions:
        counts[top : top + window_h, left : left + window_w] += 1

    crops = [(top, left, image) for top, left in positions for image in range(batch_size)]
    expected_shape = (num_labels, window_h + pad_h, window_w + pad_w)
    for start in range(0, len(crops), crops_per_batch):
        chunk = crops[start : start + crops_per_batch]
        inputs = torch.stack(
            [
                pixel_values[image, :, top : top + window_h, left : left + window_w]
                for top, left, image in chunk
            ]
        )
        outputs = forward_fn(F.pad(inputs, (0, pad_w, 0, pad_h)) if pad_h or pad_w else inputs)
        if tuple(outputs.shape) != (len(chunk), *expected_shape):
            raise ValueError(
                f"forward_fn returned shape {tuple(outputs.shape)} for crops of {tuple(expected_shape[1:])}; "
                f"it must return logits (n, num_labels={num_labels}, {expected_shape[1]}, {expected_shape[2]})"
            )
        for (top, left, image), crop_logits in zip(chunk, outputs[:, :, :window_h, :window_w]):
            logits[image, :, top : top + window_h, left : left + window_w] += crop_logits.float()
    return logits / counts

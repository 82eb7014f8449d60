"""Sliding-window inference for semantic segmentation (mmsegmentation's "slide" test mode).

Windows of a fixed size step over the image by a fixed stride; the last window of each row and column is
aligned to the image border, so the windows cover every pixel. Each pixel's logits are the mean over the
windows that contain it. An image smaller than the window along a side is zero-padded at the bottom/right to
the window size (zero is the mean colour after normalisation) and the logits are cropped back, as mmseg's
test-time padding does.
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
) -> torch.Tensor:
    """Average the logits of overlapping windows over each image.

    Args:
        forward_fn: maps crops (n, 3, window_h, window_w) to logits (n, num_labels, window_h, window_w),
            e.g. `lambda x: model(pixel_values=x).logits`. Call this under `torch.inference_mode()`.
        pixel_values: normalised images (B, 3, H, W); H and W need not be equal or multiples of anything.
        num_labels: number of classes C.
        window: window size, an int or (height, width).
        stride: step between windows, an int or (height, width), at most the window size.
        crops_per_batch: how many crops (over windows and images) go through `forward_fn` at once.

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
    batch_size, _, height, width = pixel_values.shape
    # (B, 3, H, W) -> (B, 3, H', W') with H' >= window_h and W' >= window_w.
    padded = F.pad(pixel_values, (0, max(window_w - width, 0), 0, max(window_h - height, 0)))
    padded_h, padded_w = padded.shape[-2:]
    positions = window_positions(padded_h, padded_w, (window_h, window_w), (stride_h, stride_w))

    logits = padded.new_zeros((batch_size, num_labels, padded_h, padded_w), dtype=torch.float32)
    counts = padded.new_zeros((padded_h, padded_w), dtype=torch.float32)
    for top, left in positions:
        counts[top : top + window_h, left : left + window_w] += 1

    crops = [(top, left, image) for top, left in positions for image in range(batch_size)]
    expected_shape = (num_labels, window_h, window_w)
    for start in range(0, len(crops), crops_per_batch):
        chunk = crops[start : start + crops_per_batch]
        inputs = torch.stack(
            [padded[image, :, top : top + window_h, left : left + window_w] for top, left, image in chunk]
        )
        outputs = forward_fn(inputs)
        if tuple(outputs.shape) != (len(chunk), *expected_shape):
            raise ValueError(
                f"forward_fn returned shape {tuple(outputs.shape)} for crops {tuple(inputs.shape)}; "
                f"it must return logits (n, num_labels={num_labels}, {window_h}, {window_w})"
            )
        for (top, left, image), crop_logits in zip(chunk, outputs):
            logits[image, :, top : top + window_h, left : left + window_w] += crop_logits.float()
    return (logits / counts)[:, :, :height, :width]

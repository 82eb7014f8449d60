"""Two-view pre-training augmentation: colour math against torchvision and a colorsys loop, determinism,
the crop sampler, and the equivalence of the per-sample CPU path and the batched path."""

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import v2

from densecl_vit.training.data.transforms.colour import (
    ColorParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hsv,
    adjust_hue,
    adjust_saturation,
    apply_color_params,
    gaussian_blur,
    normalize,
    rgb_to_grayscale,
    to_float_batch,
    to_float_hwc,
)
from densecl_vit.training.data.transforms.two_view import (
    COLOR_UNIFORMS,
    BatchedColorAugment,
    SimCLRAugmentConfig,
    TwoViewTransform,
    _pixels,
    color_params_from_uniform,
    host_color_params,
    image_to_uint8_tensor,
    naive_torchvision_two_view,
    sample_color_params_torch,
    sample_crop_box,
)

S = 32
CFG = SimCLRAugmentConfig(image_size=S, blur_sigma=(0.1, 1.5))


def random_images(batch=3, size=16, seed=0):
    """Random colours plus exact ties (gray pixels, two equal maxima) that stress the hue branches."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, :, 0, :4] = 0.5  # gray: chroma 0
    x[:, 1, 1, :4] = x[:, 0, 1, :4]  # r == g
    x[:, 2, 2, :4] = x[:, 1, 2, :4].clamp_min(x[:, 0, 2, :4])  # b ties the max
    return x


def photo(height=40, width=56, seed=0):
    """A smooth, colourful PIL image."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).normal(0.0, 0.05, (height, width, 3))
    rgb = np.stack([xx / width, yy / height, 0.5 + 0.4 * np.sin(xx / 5.0 + yy / 7.0)], axis=-1) + noise
    return Image.fromarray((255 * np.clip(rgb, 0, 1)).astype(np.uint8))


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic max |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    return np.abs(
        np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)
    ).max()


def ks_critical(n, m, alpha=1e-3):
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


# --- colour math -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "reference", "factor"),
    [
        (adjust_brightness, TF.adjust_brightness, 1.3),
        (adjust_brightness, TF.adjust_brightness, 0.7),  # factors <= 1 skip the clamp
        (adjust_contrast, TF.adjust_contrast, 0.6),
        (adjust_contrast, TF.adjust_contrast, 1.4),
        (adjust_saturation, TF.adjust_saturation, 1.7),
        (adjust_saturation, TF.adjust_saturation, 0.5),
        (adjust_saturation, TF.adjust_saturation, 0.0),
        (adjust_hue, TF.adjust_hue, 0.23),
        (adjust_hue, TF.adjust_hue, -0.5),
    ],
)
def test_color_ops_match_torchvision(ours, reference, factor):
    x = random_images()
    expected = reference(x, factor)
    torch.testing.assert_close(ours(x.clone(), factor), expected, atol=2e-6, rtol=0)
    per_sample = ours(x.clone(), torch.full((3,), factor))
    torch.testing.assert_close(per_sample, expected, atol=2e-6, rtol=0)


def test_per_sample_factors_equal_separate_calls():
    x = random_images()
    factors = torch.tensor([0.7, 1.0, 1.4])
    for fn in (adjust_brightness, adjust_contrast, adjust_saturation):
        batched = fn(x.clone(), factors)
        for i in range(3):
            torch.testing.assert_close(batched[i : i + 1], fn(x[i : i + 1].clone(), float(factors[i])))
    shifts = torch.tensor([-0.3, 0.0, 0.45])
    batched = adjust_hue(x.clone(), shifts)
    for i in range(3):
        torch.testing.assert_close(
            batched[i : i + 1], TF.adjust_hue(x[i : i + 1], float(shifts[i])), atol=2e-6, rtol=0
        )


def test_hsv_saturation_scale_matches_colorsys_loop():
    x = random_images(batch=1, size=6, seed=3)
    out = adjust_hsv(x.clone(), hue_shift=0.1, saturation_scale=1.6)
    expected = torch.empty_like(x)
    for i in range(6):
        for j in range(6):
            h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            expected[0, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + 0.1) % 1.0, min(s * 1.6, 1.0), v))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.37, -0.1, 0.0, 0.05, 0.31, 0.5])
def test_hue_matches_a_colorsys_loop_across_shifts(shift):
    """The branch-free sextant selection against a plain per-pixel RGB -> HSV -> RGB round trip, on colours,
    grays, primaries and two-way ties."""
    x = random_images(batch=1, size=8, seed=7)
    x[0, :, 3, :6] = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]
    ).T.float()
    x[0, :, 4, :3] = torch.tensor([[0.5, 0.5, 0.2], [0.2, 0.5, 0.5], [0.5, 0.2, 0.5]]).T
    out = adjust_hue(x.clone(), shift)
    expected = torch.empty_like(x)
    for i in range(8):
        for j in range(8):
            h, sat, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            expected[0, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + shift) % 1.0, sat, v))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_grayscale_weights_match_torchvision():
    x = random_images()
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.3, 2.0])
def test_gaussian_blur_matches_torchvision_kernel(sigma):
    x = random_images(size=20)
    kernel = 2 * math.ceil(3 * sigma) + 1
    expected = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(x.clone(), sigma), expected, atol=1e-6, rtol=0)
    per_sample = gaussian_blur(x.clone(), torch.tensor([sigma, 0.3, sigma]))
    torch.testing.assert_close(per_sample[[0, 2]], expected[[0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(per_sample[1], TF.gaussian_blur(x[1], [3, 3], [0.3, 0.3]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_gaussian_blur_is_the_same_with_one_thread(sigma):
    """One thread (a loader worker) pads with F.pad, several threads copy slices: both equal torchvision."""
    x = random_images(size=20)
    kernel = 2 * math.ceil(3 * sigma) + 1
    expected = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(gaussian_blur(x.clone(), sigma), expected, atol=1e-6, rtol=0)
    finally:
        torch.set_num_threads(threads)


def test_gaussian_blur_rejects_kernel_wider_than_image():
    with pytest.raises(ValueError, match="blur radius"):
        gaussian_blur(torch.rand(1, 3, 5, 5), 2.0)


def test_normalize_and_to_float_batch():
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    x = to_float_batch(u8)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x * 255.0, u8.float())
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x.clone(), mean, std), expected)


# --- random parameters -----------------------------------------------------------------------------------


def test_color_params_map_uniforms_to_configured_ranges():
    cfg = SimCLRAugmentConfig(blur_p=(1.0, 0.1))
    u = torch.tensor([[0.0, 0.0, 0.5, 1.0, 0.0, 0.4, 0.1, 0.3, 0.2, 0.19, 0.5, 0.5]])
    p = color_params_from_uniform(u, cfg, 1)
    assert bool(p.jitter) and bool(p.grayscale) and not bool(p.blur)
    torch.testing.assert_close(torch.cat([p.brightness, p.contrast, p.saturation, p.hue, p.sigma]),
                               torch.tensor([0.6, 1.0, 1.2, -0.1, 1.05]))  # fmt: skip
    assert p.order.tolist() == [[1, 3, 2, 0]]
    assert bool(color_params_from_uniform(u, cfg, 0).blur)


def test_cpu_and_batched_parameter_distributions_agree():
    n = 20_000
    cfg = SimCLRAugmentConfig(blur_p=(1.0, 0.1))
    uniforms = np.random.default_rng(0).random((n, COLOR_UNIFORMS), dtype=np.float32)  # as the CPU path draws
    cpu = color_params_from_uniform(torch.from_numpy(uniforms), cfg, 1)
    batched = sample_color_params_torch(cfg, n, 1, torch.Generator().manual_seed(0))
    critical = ks_critical(n, n)
    for name, low, high in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                            ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)]:  # fmt: skip
        a, b = getattr(cpu, name).numpy(), getattr(batched, name).numpy()
        assert ks_statistic(a, b) < critical, name
        uniform = np.linspace(low, high, n)
        assert ks_statistic(a, uniform) < critical and ks_statistic(b, uniform) < critical, name
    tolerance = 4 * math.sqrt(0.25 / n)
    for name, p in [("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.1)]:
        for params in (cpu, batched):
            assert abs(getattr(params, name).float().mean().item() - p) < tolerance, name
    for params in (cpu, batched):  # the jitter order is a uniform permutation of the four operations
        assert (params.order.sort(dim=1).values == torch.arange(4)).all()
        codes = (params.order * torch.tensor([64, 16, 4, 1])).sum(1)
        counts = torch.bincount(codes, minlength=256)[torch.bincount(codes, minlength=256) > 0]
        assert len(counts) == 24
        chi2 = (((counts - n / 24) ** 2) / (n / 24)).sum().item()
        assert chi2 < 60.0  # 23 degrees of freedom: p ~ 5e-5


def test_host_color_params_equal_the_torch_mapping():
    """The per-sample path maps its uniforms with NumPy: the same float32 values as the torch mapping."""
    u = np.random.default_rng(0).random((64, COLOR_UNIFORMS), dtype=np.float32)
    views = [0, 1] * 32
    cfg = SimCLRAugmentConfig(blur_p=(1.0, 0.1))
    host = host_color_params(u, cfg, views)
    reference = color_params_from_uniform(torch.from_numpy(u), cfg, views)
    for name, value in vars(reference).items():
        assert host[name] == value.tolist(), name


def test_crop_box_matches_torchvision_distribution():
    width, height, scale, ratio = 50, 30, (0.08, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    ours = np.array([sample_crop_box(width, height, scale, ratio, rng) for _ in range(4000)])
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([v2.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(4000)])
    theirs = theirs[:, [1, 0, 3, 2]]  # (top, left, h, w) -> (left, top, w, h)
    left, top, w, h = ours.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    for column in range(4):
        assert ks_statistic(ours[:, column], theirs[:, column]) < ks_critical(4000, 4000), column


def test_crop_box_falls_back_to_a_central_crop():
    box = sample_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert box == (493, 0, 13, 10)


# --- the two paths ---------------------------------------------------------------------------------------


def test_two_view_shapes_and_dtypes():
    v1, v2_ = TwoViewTransform(CFG)(photo(), 0)
    assert v1.shape == v2_.shape == (3, S, S) and v1.dtype == torch.float32
    u1, u2 = TwoViewTransform(dataclasses.replace(CFG, gpu_color=True))(photo(), 0)
    assert u1.shape == (3, S, S) and u1.dtype == torch.uint8 and u1.is_contiguous()
    assert not torch.equal(u1, u2)


def test_two_view_is_deterministic_and_ignores_global_state():
    transform, image = TwoViewTransform(CFG), photo()
    torch.manual_seed(1)
    np.random.seed(1)
    first = transform(image, [7, 3])
    torch.manual_seed(2)
    np.random.seed(2)
    transform(image, [7, 4])
    again = transform(image, np.random.default_rng([7, 3]))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = transform(image, [7, 5])
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[0], first[1])


def test_two_view_accepts_arrays_tensors_and_non_rgb_images():
    transform, image = TwoViewTransform(CFG), photo()
    array = np.asarray(image).copy()
    reference = transform(image, 5)
    for same in (array, torch.from_numpy(array).permute(2, 0, 1)):
        assert all(torch.equal(a, b) for a, b in zip(reference, transform(same, 5)))
    gray = transform(image.convert("L"), 5)[0]
    assert gray.shape == (3, S, S)
    with pytest.raises(ValueError, match="uint8"):
        transform(array.astype(np.float32), 5)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_to_float_hwc_flips_and_converts_any_layout(flip, channels_last):
    view = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8)
    source = view.contiguous(memory_format=torch.channels_last) if channels_last else view
    out = to_float_hwc(source[0].permute(1, 2, 0).numpy(), flip)  # (H, W, 3) with the view's strides
    expected = (view.flip(-1) if flip else view).float() * (1.0 / 255.0)
    assert out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_pixels_read_rgb_images_like_image_to_uint8_tensor():
    image = photo()
    assert torch.equal(_pixels(image), image_to_uint8_tensor(image))
    assert torch.equal(_pixels(image.convert("L")), image_to_uint8_tensor(image.convert("L")))


def test_without_colour_steps_the_fast_path_is_the_normalised_crop():
    cfg = dataclasses.replace(CFG, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    views = TwoViewTransform(cfg)(photo(), 11)
    crops = TwoViewTransform(dataclasses.replace(cfg, gpu_color=True))(photo(), 11)
    for view, crop in zip(views, crops):
        expected = normalize(to_float_batch(crop[None]), cfg.mean, cfg.std)[0]
        torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_crop_resize_matches_pil_box_resize(flip_p):
    """A view's crop equals PIL's antialiased bilinear resize of the same box (to rounding), then flipped."""
    cfg = dataclasses.replace(CFG, flip_p=flip_p, gpu_color=True)
    image = photo(80, 120)
    view = TwoViewTransform(cfg)(image, 2)[0]
    rng = np.random.default_rng(2)
    left, top, w, h = sample_crop_box(120, 80, cfg.crop_scale, cfg.crop_ratio, rng)
    expected = image.resize((S, S), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if flip_p:
        expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    diff = np.abs(view.permute(1, 2, 0).numpy().astype(int) - np.asarray(expected).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_apply_color_params_follows_the_jitter_order_then_grayscale_and_blur(order):
    x = random_images(batch=1, size=20)
    p = ColorParams(
        jitter=torch.tensor([True]), brightness=torch.tensor([1.3]), contrast=torch.tensor([0.7]),
        saturation=torch.tensor([1.5]), hue=torch.tensor([0.2]), order=torch.tensor([order]),
        grayscale=torch.tensor([True]), blur=torch.tensor([True]), sigma=torch.tensor([0.9]),
    )  # fmt: skip
    ops = [
        (TF.adjust_brightness, 1.3),
        (TF.adjust_contrast, 0.7),
        (TF.adjust_saturation, 1.5),
        (TF.adjust_hue, 0.2),
    ]
    expected = x
    for op in order:
        fn, factor = ops[op]
        expected = fn(expected, factor)
    expected = TF.gaussian_blur(TF.rgb_to_grayscale(expected, num_output_channels=3), [7, 7], [0.9, 0.9])
    torch.testing.assert_close(apply_color_params(x.clone(), p), expected, atol=5e-6, rtol=0)


def test_batched_rows_equal_the_single_sample_path():
    """Grouping samples by operation and order gives exactly the per-sample (batch of one) result."""
    x = random_images(batch=8, size=24, seed=5)
    u = torch.rand(8, COLOR_UNIFORMS, generator=torch.Generator().manual_seed(3))
    u[:, 0] = 0.0  # jitter every sample, in eight random orders
    p = color_params_from_uniform(u, CFG, 0)
    batched = apply_color_params(x.clone(), p)
    for i in range(8):
        single = ColorParams(**{k: v[i : i + 1] for k, v in vars(p).items()})
        torch.testing.assert_close(batched[i : i + 1], apply_color_params(x[i : i + 1].clone(), single))


def test_batched_color_augment_per_sample_parameters_and_determinism():
    module = BatchedColorAugment(CFG)
    crops = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8).expand(6, -1, -1, -1)
    out = module(crops, view=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, S, S) and out.dtype == torch.float32
    assert len({tuple(row.flatten()[:64].tolist()) for row in out}) == 6
    again = module(crops, view=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    from_float = module(to_float_batch(crops), view=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_float, out)
    with pytest.raises(ValueError, match="view"):
        module(crops, view=2)


def test_batched_color_augment_reads_nothing_back_from_the_images_device():
    """With parameters from a CPU generator (as pre-training draws them) no value is read from the device the
    images are on, which on an accelerator would wait for it: meta tensors have no values to read."""
    module = BatchedColorAugment(CFG)
    for seed in range(4):  # every operation, blur with several widths among them, is drawn at least once
        images = torch.zeros(8, 3, S, S, dtype=torch.uint8, device="meta")
        out = module(images, view=seed % 2, generator=torch.Generator().manual_seed(seed))
        assert out.device.type == "meta" and out.shape == (8, 3, S, S)


def test_cpu_and_batched_output_statistics_agree():
    """On one fixed image, the two paths give the same distribution of per-view mean and contrast."""
    size, n = 24, 300
    cfg = SimCLRAugmentConfig(image_size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                              blur_sigma=(0.1, 1.5))  # fmt: skip
    image = photo(size, size)
    transform = TwoViewTransform(cfg)
    cpu = torch.stack([transform(image, i)[0] for i in range(n)])
    crops = TwoViewTransform(dataclasses.replace(cfg, gpu_color=True))(image, 0)[0]
    batched = BatchedColorAugment(cfg)(crops.expand(n, -1, -1, -1), 0, torch.Generator().manual_seed(0))
    for stat in (
        lambda t: t.mean(dim=(1, 2, 3)),
        lambda t: t.std(dim=(1, 2, 3)),
        lambda t: t[:, 0].mean((1, 2)),
    ):
        a, b = stat(cpu).numpy(), stat(batched).numpy()
        assert ks_statistic(a, b) < ks_critical(n, n)
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n)


def test_config_validation():
    assert SimCLRAugmentConfig(blur_p=0.3).blur_p == (0.3, 0.3)
    for bad in ({"jitter_p": 1.5}, {"blur_p": (0.5, 2.0)}, {"crop_scale": (0.5, 0.1)}, {"hue": 0.7},
                {"blur_sigma": (0.0, 1.0)}, {"image_size": 6}, {"std": (1.0, 0.0, 1.0)}):  # fmt: skip
        with pytest.raises(ValueError):
            SimCLRAugmentConfig(**bad)


def test_naive_pipeline_gives_two_normalised_views():
    views = naive_torchvision_two_view(CFG)(photo())
    assert [(tuple(v.shape), v.dtype) for v in views] == [((3, S, S), torch.float32)] * 2


# --- view geometry ----------------------------------------------------------------------------------------


def _coordinate_image(width: int = 240, height: int = 200) -> np.ndarray:
    """(H, W, 3) uint8 whose red channel is each pixel's column and green its row: pixels name their place."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)


def _patch_centre_values(view: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, S, S) -> (rows, cols, C): the view at each patch centre, the mean of the 2x2 pixels around it."""
    pooled = torch.nn.functional.avg_pool2d(view[None].double(), 2, stride=1)[0]  # centre of pixels j, j+1
    centres = torch.arange(patch // 2 - 1, view.shape[-1] - 1, patch)
    return pooled[:, centres][:, :, centres].permute(1, 2, 0)


@pytest.mark.parametrize("gpu_color", [False, True])
def test_crop_boxes_and_flips_map_patch_centres_onto_their_source_pixels(gpu_color):
    """The returned geometry, read as the dense loss reads it, lands each patch centre on the source pixel the
    view shows there; flips and both augmentation paths included."""
    size, patch = 32, 8
    cfg = SimCLRAugmentConfig(
        image_size=size,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        gpu_color=gpu_color,
    )
    transform, image, seen_flips = TwoViewTransform(cfg), _coordinate_image(), set()
    for seed in range(12):
        views = transform.sample(image, seed)
        for view, box, flip in (
            (views.view_1, views.crop_box_1, views.flip_1),
            (views.view_2, views.crop_box_2, views.flip_2),
        ):
            seen_flips.add(bool(flip))
            values = _patch_centre_values(view if gpu_color else view * 255, patch)  # (4, 4, 3), 0..255
            cells = (torch.arange(size // patch, dtype=torch.float64) + 0.5) / (size // patch)
            u = 1 - cells if flip else cells
            left, top, width, height = box.double()
            # A pixel k holds k and stands for its centre k + 0.5, so a point x of the source reads x - 0.5.
            want_x = (left + u * width - 0.5)[None, :].expand(len(cells), -1)
            want_y = (top + cells * height - 0.5)[:, None].expand(-1, len(cells))
            torch.testing.assert_close(values[..., 0], want_x, atol=1.0, rtol=0)
            torch.testing.assert_close(values[..., 1], want_y, atol=1.0, rtol=0)
    assert seen_flips == {False, True}


def test_geometry_does_not_change_the_views():
    cfg = SimCLRAugmentConfig(image_size=32)
    image = _coordinate_image()
    views = TwoViewTransform(cfg).sample(image, [3, 4])
    view_1, view_2 = TwoViewTransform(cfg)(image, [3, 4])
    assert torch.equal(views.view_1, view_1) and torch.equal(views.view_2, view_2)
    assert views.crop_box_1.dtype == torch.float32 and views.flip_1.dtype == torch.bool


def test_matched_patches_of_the_two_views_show_the_same_source_pixels():
    """End to end: the dense loss's matching, read off the returned geometry, pairs patches that show the same
    place of the coordinate image (within half a patch of view 2, in source pixels)."""
    from densecl_vit.modeling.losses_densecl_vit import match_patches

    size, patch, grid = 32, 8, 4
    cfg = SimCLRAugmentConfig(
        image_size=size,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        gpu_color=True,
    )
    transform, image, matched = TwoViewTransform(cfg), _coordinate_image(), 0
    for seed in range(12):
        v = transform.sample(image, seed)
        match = match_patches(
            v.crop_box_1[None], v.flip_1[None], (grid, grid), v.crop_box_2[None], v.flip_2[None], (grid, grid)
        )[0]
        values_1 = _patch_centre_values(v.view_1, patch).reshape(-1, 3)
        values_2 = _patch_centre_values(v.view_2, patch).reshape(-1, 3)
        tolerance = v.crop_box_2[2:].double() / grid / 2 + 1  # half a view-2 patch, plus rounding
        for i, j in enumerate(match.tolist()):
            if j >= 0:
                matched += 1
                assert ((values_1[i, :2] - values_2[j, :2]).abs() <= tolerance).all()
    assert matched > 50

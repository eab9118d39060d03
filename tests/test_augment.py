import numpy as np
import pytest
import torch

from conftest import exp

MEAN, STD = np.array(exp.CIFAR10_MEAN), np.array(exp.CIFAR10_STD)


def normalised(img):
    return ((img / 255.0 - MEAN) / STD).transpose(2, 0, 1)


@pytest.fixture
def image():
    return np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_cifar10_statistics_are_the_true_ones():
    assert exp.CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert exp.CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)


def augmented(transform, image):
    """The training pipeline for one image: augment (uint8), then normalise as the step does."""
    out = transform(image=image)["image"]
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    return exp.normalize(exp.as_tensors(out[None], [0])[0])[0].numpy()


def test_evaluation_normalises_only(image):
    out = exp.normalize(exp.as_tensors(image[None], [0])[0])[0].numpy()
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, normalised(image), atol=1e-5)


def test_batch_normalisation_is_albumentations_normalize_to_the_last_bit():
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    per_image = [torch.from_numpy(exp.A.Normalize(mean=exp.CIFAR10_MEAN, std=exp.CIFAR10_STD)(
        image=im)["image"].transpose(2, 0, 1)) for im in images]
    assert torch.equal(exp.normalize(exp.as_tensors(images, [0] * 4)[0]), torch.stack(per_image))


def test_all_probabilities_zero_is_the_evaluation_input(image):
    np.testing.assert_allclose(augmented(exp.train_transform(0, 0, 0), image), normalised(image),
                               atol=1e-5)


def test_flip_mirrors(image):
    out = augmented(exp.train_transform(flip_p=1, affine_p=0, dropout_p=0), image)
    np.testing.assert_allclose(out, normalised(image[:, ::-1]), atol=1e-5)


def test_one_16x16_hole_filled_with_the_mean_colour(image):
    t = exp.train_transform(flip_p=0, affine_p=0, dropout_p=1)
    for seed in range(10):
        t.set_random_seed(seed)
        out = augmented(t, image)
        changed = np.abs(out - normalised(image)).max(0) > 1e-5
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        assert len(rows) == 16 and len(cols) == 16 and np.ptp(rows) == 15 and np.ptp(cols) == 15
        hole = out[:, rows[0]:rows[0] + 16, cols[0]:cols[0] + 16]
        # the mean colour, which normalises to ~0 (uint8 rounding of mean*255 leaves < 1/255/std)
        assert np.abs(hole).max() < 1 / 255 / STD.min()


def test_affine_moves_pixels(image):
    t = exp.train_transform(flip_p=0, affine_p=1, dropout_p=0)
    outs = [augmented(t, image) for _ in range(5)]
    assert all(np.abs(o - normalised(image)).mean() > 0.1 for o in outs)
    assert np.abs(outs[0] - outs[1]).mean() > 0.1  # a new draw each call


def test_affine_rotates_up_to_15_degrees_scales_up_to_10_percent_and_reflects_the_border():
    t = exp.train_transform(flip_p=0, affine_p=1, dropout_p=0, save_applied_params=True)
    t.set_random_seed(0)
    grey = np.full((32, 32, 3), 200, np.uint8)
    rotations, scales = [], []
    for _ in range(200):
        drawn = t(image=grey)
        params = dict(drawn["applied_transforms"])["Affine"]
        rotations.append(abs(params["rotate"]))
        scales += [params["scale"]["x"], params["scale"]["y"]]
        assert (drawn["image"] == 200).all()  # the border is the image reflected, not a fill
    assert 14 < max(rotations) <= 15
    assert 0.9 <= min(scales) < 0.91 and 1.09 < max(scales) <= 1.1


def test_affine_shift_is_drawn_per_axis():
    t = exp.train_transform(flip_p=0, affine_p=1, dropout_p=0)
    affine = next(x for x in t.transforms if type(x).__name__ == "Affine")
    affine.set_random_seed(0)
    draws = (affine._get_translate_params((32, 32)) for _ in range(200))
    shifts = np.array([[s["x"], s["y"]] for s in draws])
    assert np.abs(shifts).max() == 3  # +-10% of 32 px, truncated to whole pixels
    assert (shifts[:, 0] != shifts[:, 1]).mean() > 0.5  # x and y drawn separately


def test_coarse_dropout_uses_albumentations_2_names():
    t = exp.train_transform()
    drop = next(x for x in t.transforms if type(x).__name__ == "CoarseDropout")
    assert drop.num_holes_range == (1, 1)
    assert drop.hole_height_range == (16, 16) and drop.hole_width_range == (16, 16)


# ---- augmentations.png: what the network sees

def samples_of(folder, **flags):
    splits, _, _, _ = exp.load_cifar10(folder)
    args = exp.build_parser().parse_args([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()])
    return splits["train"], exp.augmentation_samples(*splits["train"], args), args


def hole_of(text):
    """(x, y) of the hole a draw's label names, or None."""
    line = next((t for t in text.splitlines() if "hole" in t), None)
    if line is None:
        return None
    assert line.startswith("16x16 hole at ")
    x, y = line[len("16x16 hole at "):].split(", ")
    return int(x), int(y)


def test_the_samples_are_each_class_first_image_and_draws_of_it(image_folder):
    (images, labels), samples, _ = samples_of(image_folder)
    assert [s.label for s in samples] == list(range(10))
    for s in samples:
        assert np.array_equal(s.image, images[np.flatnonzero(labels == s.label)[0]])
        assert len(s.draws) == 7


def test_each_draw_is_labelled_with_what_was_applied(image_folder):
    _, samples, _ = samples_of(image_folder, flip_p=1, affine_p=0, dropout_p=0)
    for s in samples:
        for drawn, text in s.draws:
            assert text == "flip" and np.array_equal(drawn, s.image[:, ::-1])
    _, samples, _ = samples_of(image_folder, flip_p=0, affine_p=0, dropout_p=0)
    assert {text for s in samples for _, text in s.draws} == {"nothing"}


def test_a_draw_labelled_with_a_hole_holds_a_16x16_block_of_the_mean_colour(image_folder):
    _, samples, _ = samples_of(image_folder, flip_p=0, affine_p=0, dropout_p=1)
    mean = np.array(exp.CIFAR10_MEAN) * 255
    for s in samples:
        for drawn, text in s.draws:
            x, y = hole_of(text)
            hole = drawn[y:y + 16, x:x + 16].reshape(-1, 3)
            assert len(hole) == 256 and np.all(np.abs(hole - mean) < 1), text
            outside = np.ones((32, 32), bool)
            outside[y:y + 16, x:x + 16] = False
            assert np.array_equal(drawn[outside], s.image[outside])


def test_the_affine_label_gives_the_applied_rotation_shift_and_scale():
    import albumentations as A
    affine = A.Compose([A.Affine(translate_px={"x": (3, 3), "y": (-2, -2)}, rotate=(30, 30),
                                 scale={"x": (1.05, 1.05), "y": (0.95, 0.95)}, p=1)],
                       save_applied_params=True)
    applied = affine(image=np.zeros((32, 32, 3), np.uint8))["applied_transforms"]
    assert exp.describe_applied(applied).splitlines() == [
        "rotate +30.0°", "shift +3.0, -2.0 px", "scale 1.05 x 0.95"]


def test_the_samples_depend_on_the_flags_and_seed_alone(image_folder):
    _, first, _ = samples_of(image_folder, seed=3)
    _, again, _ = samples_of(image_folder, seed=3)
    _, other, _ = samples_of(image_folder, seed=4)

    def pixels(samples):
        return np.stack([d for s in samples for d, _ in s.draws])
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_the_picture_shows_the_decoded_images_and_the_holes_pixel_for_pixel(image_folder,
                                                                             tmp_path):
    from PIL import Image
    _, samples, args = samples_of(image_folder, flip_p=0, affine_p=0, dropout_p=1)
    exp.save_figure(exp.plot_augmentations(samples, args), tmp_path / "augmentations.png")
    picture = np.asarray(Image.open(tmp_path / "augmentations.png").convert("RGB"))
    size = 32 * exp.ZOOM

    def cell(row, column):
        x, y = exp.augmentation_cell(row, column)
        return picture[y:y + size, x:x + size]
    for row, s in enumerate(samples):
        assert np.array_equal(cell(row, 0), s.image.repeat(exp.ZOOM, 0).repeat(exp.ZOOM, 1))
        drawn, text = s.draws[0]
        assert np.array_equal(cell(row, 1), drawn.repeat(exp.ZOOM, 0).repeat(exp.ZOOM, 1))
        x, y = hole_of(text)
        block = cell(row, 1)[y * exp.ZOOM:(y + 16) * exp.ZOOM, x * exp.ZOOM:(x + 16) * exp.ZOOM]
        assert block.shape == (48, 48, 3) and len(np.unique(block.reshape(-1, 3), axis=0)) == 1

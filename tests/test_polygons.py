"""PolygonDataset: determinism, labels against images, noise semantics, geometry of the generated polygons."""
import math

import numpy as np
import pytest
import torch

from fbkernels.data import PolygonDataset
from fbkernels.data.polygons import polygon_vertices, rasterize_polygon


def test_items_have_the_documented_shapes_and_dtypes():
    ds = PolygonDataset(3, image_size=24, sigma=1.0, seed=1)
    image, labels = ds[0]
    assert len(ds) == 3
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert labels.shape == (24, 24) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1}
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # min-max normalised
    with pytest.raises(IndexError):
        ds[3]


def test_same_seed_same_items_other_seed_other_items():
    a = PolygonDataset(4, image_size=32, sigma=2.0, seed=7)
    b = PolygonDataset(4, image_size=32, sigma=2.0, seed=7)
    c = PolygonDataset(4, image_size=32, sigma=2.0, seed=8)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a.labels(), c.labels())
    # Reading items in any order gives the same result (no hidden sequential state).
    assert torch.equal(a[2][0], PolygonDataset(4, image_size=32, sigma=2.0, seed=7)[2][0])


def test_labels_match_images_without_noise():
    ds = PolygonDataset(20, image_size=32, sigma=0.0, seed=3)
    labels = ds.labels()
    assert labels.float().mean() > 0.005  # polygons are there
    for i in range(len(ds)):
        image, target = ds[i]
        assert torch.equal(target, labels[i])
        if target.any() and not target.all():
            for channel in image:
                assert torch.equal(channel, target.float())


def test_test_noise_is_fixed_and_training_noise_changes_each_epoch():
    test = PolygonDataset(2, image_size=16, sigma=3.0, seed=0, train=False)
    first = test[0][0]
    test.set_epoch(5)
    assert torch.equal(test[0][0], first)

    train = PolygonDataset(2, image_size=16, sigma=3.0, seed=0, train=True)
    epoch0 = train[0][0]
    assert torch.equal(train[0][0], epoch0)  # within an epoch an item is stable
    train.set_epoch(1)
    epoch1 = train[0][0]
    assert not torch.equal(epoch1, epoch0)
    train.set_epoch(0)
    assert torch.equal(train[0][0], epoch0)
    assert torch.equal(train[0][1], test[0][1])  # the shapes do not depend on the noise


def test_noise_level_controls_the_input_corruption():
    clean = PolygonDataset(6, image_size=32, sigma=0.0, seed=2)
    errors = []
    for sigma in (0.05, 4.0):
        noisy = PolygonDataset(6, image_size=32, sigma=sigma, seed=2)
        # Correlation of the noisy input with the clean mask falls as sigma grows.
        corr = [np.corrcoef(noisy[i][0][0].flatten(), clean[i][1].flatten().float())[0, 1] for i in range(6)]
        errors.append(float(np.mean(corr)))
    assert errors[0] > 0.8 and errors[1] < 0.2


def test_vertices_follow_the_generation_recipe():
    size, n = 200, 3
    # Replay the generator's draws in the documented order and rebuild every vertex from them:
    # mean radius ~ U[size/10, size/4], radii ~ |N(mean, 5)|, centre ~ U over the image, angles 2 pi n / N.
    rng = np.random.default_rng(1)
    for _ in range(50):
        state = rng.bit_generator.state
        vertices = polygon_vertices(rng, size, n)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        mean_radius = replay.uniform(size / 10, size / 4)
        assert size / 10 <= mean_radius <= size / 4
        radii = np.abs(replay.normal(mean_radius, 5.0, size=n))
        centre = replay.uniform(0, size, size=2)
        assert (0 <= centre).all() and (centre <= size).all()
        for k in range(n):
            angle = 2 * math.pi * k / n
            expected = centre + radii[k] * np.array([math.sin(angle), math.cos(angle)])
            np.testing.assert_allclose(vertices[k], expected)


def test_rasterized_area_matches_the_polygon_area():
    vertices = np.array([[10.0, 10.0], [10.0, 50.0], [40.0, 30.0]])  # (row, col)
    mask = rasterize_polygon(vertices, 64)
    shoelace = 0.5 * abs(np.dot(vertices[:, 0], np.roll(vertices[:, 1], 1)) - np.dot(vertices[:, 1], np.roll(vertices[:, 0], 1)))
    assert abs(int(mask.sum()) - shoelace) / shoelace < 0.05
    assert mask[20, 30] == 1 and mask[5, 5] == 0 and mask[45, 30] == 0
    # A polygon reaching past the border is cut by it, not wrapped around.
    cut = rasterize_polygon(np.array([[-20.0, -20.0], [-20.0, 40.0], [40.0, -20.0]]), 32)
    assert cut[0, 0] == 1 and cut[31, 31] == 0 and cut[:, 25:].sum() == 0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        PolygonDataset(2, sigma=-1.0)
    with pytest.raises(ValueError):
        PolygonDataset(2, num_vertices=2)
    # Counts and the seed are ints under their names: int() used to truncate 10.7 items to 10 and seed 1.5 to 1.
    with pytest.raises(TypeError, match="size must be an int >= 0, got float 10.7"):
        PolygonDataset(10.7)
    with pytest.raises(TypeError, match="image_size must be an int >= 1, got float 16.9"):
        PolygonDataset(2, image_size=16.9)
    with pytest.raises(TypeError, match="seed must be an int >= 0, got float 1.5"):
        PolygonDataset(2, seed=1.5)
    with pytest.raises(TypeError, match="channels must be an int >= 1, got float 2.0"):
        PolygonDataset(2, channels=2.0)
    # A negative seed used to be accepted here and fail at the first item.
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        PolygonDataset(2, seed=-1)
    # sigma=nan used to give noiseless images (nan > 0 is False), sigma=inf NaN images.
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=f"sigma must be a finite number >= 0, got {bad}"):
            PolygonDataset(2, sigma=bad)
    with pytest.raises(TypeError, match="sigma must be a finite number >= 0, got str '1.0'"):
        PolygonDataset(2, sigma="1.0")
    # train="no" is truthy: it redrew a test set's noise every epoch.
    with pytest.raises(TypeError, match="train must be a bool, got str 'no'"):
        PolygonDataset(2, train="no")


def test_radius_spread_scales_with_the_image_unless_given_in_pixels():
    from fbkernels.data.polygons import _SHAPE, default_radius_std

    assert default_radius_std(512) == 5.0  # the authors' spread at their image size
    assert PolygonDataset(1, image_size=48).radius_std == pytest.approx(5.0 * 48 / 512)
    assert PolygonDataset(1, image_size=1024).radius_std == pytest.approx(10.0)
    assert PolygonDataset(1, image_size=48, radius_std=5.0).radius_std == 5.0  # explicit pixels still accepted
    assert PolygonDataset(1, image_size=48, radius_std=0).radius_std == 0.0
    # The dataset draws its vertices with that spread: replaying the shape stream with it rebuilds the mask.
    for radius_std in (None, 3.0):
        ds = PolygonDataset(4, image_size=64, seed=5, radius_std=radius_std)
        for i in range(4):
            rng = np.random.default_rng(np.random.SeedSequence([5, _SHAPE, i]))
            expected = rasterize_polygon(polygon_vertices(rng, 64, 3, ds.radius_std), 64)
            assert np.array_equal(ds.mask(i), expected)
    # A larger spread gives different (more irregular) shapes from the same draws.
    assert not np.array_equal(PolygonDataset(1, image_size=64, seed=5).mask(0),
                              PolygonDataset(1, image_size=64, seed=5, radius_std=20.0).mask(0))


def test_radius_spread_is_validated():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"radius_std must be None or a finite number >= 0, got {bad}"):
            PolygonDataset(1, radius_std=bad)
    for bad in ("5", True):
        with pytest.raises(TypeError, match=f"radius_std must be None or a finite number >= 0, got {type(bad).__name__}"):
            PolygonDataset(1, radius_std=bad)

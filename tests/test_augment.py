"""Random flip and translation (`attribution.augment`): checked pixel by pixel, seeded per model, and
applied identically by the one-model and the batched trainer."""
import numpy as np
import pytest
import torch
from torch import nn

from attribution.augment import AugmentError, Augmentation, augment_seed
from attribution.datasets import make_dataset
from attribution.engine import derive_seeds, train_batched, train_model
from attribution.errors import DmmError
from attribution.recipes import Recipe, RecipeError, default_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def by_hand(x: np.ndarray, flip: bool, dy: int, dx: int, p: int) -> np.ndarray:
    """out[:, i, j] = x̃[:, i + dy - p, j + dx - p], 0 outside; x̃ is x mirrored left-right when flip."""
    src = x[:, :, ::-1] if flip else x
    _, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            r, c = i + dy - p, j + dx - p
            if 0 <= r < h and 0 <= c < w:
                out[:, i, j] = src[:, r, c]
    return out


def images(n=4, c=2, h=5, w=6) -> torch.Tensor:
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)


def test_a_flip_mirrors_the_rows_and_nothing_else():
    aug = Augmentation(translate=0, flip=True)
    x = images()
    out = aug(x, torch.tensor([1, 0, 1, 0]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_a_shift_moves_pixels_by_the_drawn_offset_and_pads_with_zeros():
    aug = Augmentation(translate=2, flip=False)
    x = images(n=2)
    flip, dy, dx = aug.decode(torch.tensor([0 * 5 + 4, 2 * 5 + 2]))  # (dy, dx) = (0, 4), (2, 2)
    assert (dy.tolist(), dx.tolist(), flip.tolist()) == ([0, 2], [4, 2], [False, False])
    out = aug(x, torch.tensor([4, 12]))
    # (0, 4): content moves 2 rows down and 2 columns left; the top 2 rows and right 2 columns are 0
    assert torch.equal(out[0, :, 2:, :4], x[0, :, :3, 2:])
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, 4:] == 0).all()
    assert torch.equal(out[1], x[1])  # (2, 2) is the centre: no shift


def test_every_code_equals_the_hand_computed_image():
    aug = Augmentation(translate=2, flip=True)
    x = images(n=aug.num_codes)
    codes = torch.arange(aug.num_codes)
    out = aug(x, codes).numpy()
    flips, dys, dxs = (t.tolist() for t in aug.decode(codes))
    assert {(f, a, b) for f, a, b in zip(flips, dys, dxs)} == {
        (f, a, b) for f in (False, True) for a in range(5) for b in range(5)}  # every (flip, dy, dx) once
    for k in range(aug.num_codes):
        np.testing.assert_array_equal(out[k], by_hand(x[k].numpy(), flips[k], dys[k], dxs[k], 2))


def test_draws_are_deterministic_per_seed_and_differ_between_models():
    aug = Augmentation(translate=2, flip=True)
    a = aug.draw(aug.generator(7), 1000)
    assert torch.equal(a, aug.draw(aug.generator(7), 1000))
    assert not torch.equal(a, aug.draw(aug.generator(8), 1000))
    assert set(a.tolist()) == set(range(aug.num_codes))
    assert np.random.SeedSequence(7).generate_state(3)[:2].tolist() == list(derive_seeds(7))
    assert augment_seed(7) not in derive_seeds(7)


def test_recipes_without_augmentation_get_none_and_unusable_ones_are_refused():
    assert Augmentation.from_recipe(Recipe(), (3, 8, 8)) is None
    assert Augmentation.from_recipe(Recipe(augment_flip=True), (3, 8, 8)) == Augmentation(0, True)
    with pytest.raises(AugmentError, match="needs image inputs"):
        Augmentation.from_recipe(Recipe(augment_translate=1), (64,))
    with pytest.raises(AugmentError, match="smaller than the image"):
        Augmentation.from_recipe(Recipe(augment_translate=8), (3, 8, 8))
    with pytest.raises(RecipeError, match="augment_translate"):
        Recipe(augment_translate=-1)
    with pytest.raises(RecipeError, match="augment_flip must be bool"):
        Recipe.from_dict({"augment_flip": "yes"})
    cifar = default_recipe("cifar10", "resnet9")
    assert cifar.augment_flip and cifar.augment_translate == 2


@pytest.fixture(scope="module")
def tiny_images():
    """64 random CIFAR-shaped (3×8×8) training images in 4 classes, 16 held out."""
    rng = np.random.default_rng(0)
    return make_dataset("tiny-images", rng.normal(size=(64, 3, 8, 8)), rng.integers(0, 4, 64),
                        rng.normal(size=(16, 3, 8, 8)), rng.integers(0, 4, 16), num_classes=4)


def tiny_cnn(input_shape, num_classes):
    """A BatchNorm-free conv net: goes through the batched trainer's vmap path."""
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, num_classes))


MODEL = "test_augment:tiny_cnn"
AUGMENTED = Recipe(epochs=3, batch_size=16, optimizer="sgd", lr=0.05, schedule="cosine",
                   augment_flip=True, augment_translate=2)


def test_batched_and_one_model_trainers_agree_with_augmentation(tiny_images):
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 64), dtype=bool)
    for row, size in zip(masks, [64, 40, 23]):  # unequal: models idle at some steps, short last batches
        row[rng.choice(64, size, replace=False)] = True
    seeds = [3, 4, 5]
    result = train_batched(MODEL, tiny_images, AUGMENTED, seeds, masks, group_size=2)
    plain = train_batched(MODEL, tiny_images, AUGMENTED.with_(augment_flip=False, augment_translate=0),
                          seeds, masks)
    for b, (seed, mask) in enumerate(zip(seeds, masks)):
        model = train_model(MODEL, tiny_images, AUGMENTED, seed, mask)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(result.state[k][b], v, rtol=0, atol=1e-4)
            assert not torch.allclose(plain.state[k][b], v, atol=1e-3), f"augmentation changed nothing in {k}"


def test_augmenting_flat_inputs_is_refused_before_training(tiny_images):
    flat = make_dataset("flat", tiny_images.x_train.flatten(1), tiny_images.y_train, tiny_images.x_test.flatten(1),
                        tiny_images.y_test, num_classes=4)
    with pytest.raises(DmmError, match="needs image inputs"):
        train_model("mlp", flat, AUGMENTED, 0)
    with pytest.raises(DmmError, match="needs image inputs"):
        train_batched("mlp", flat, AUGMENTED, [0], np.ones((1, 64), dtype=bool))

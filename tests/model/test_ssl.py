"""Self-supervised heads: the MIM mask and loss, the views, NT-Xent, and that both train."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from xlearner.config import HeadsConfig
from xlearner.metrics import MeanLoss
from xlearner.models.heads import create_head
from xlearner.models.multitask import backbone_trunk_spec, build_model, load_model, save_model
from xlearner.models.registry import create_backbone
from xlearner.models.ssl import (
    ContrastiveHead,
    MIMHead,
    ViewAugmentation,
    mim_loss,
    nt_xent_loss,
    random_patch_mask,
)

SIZE, BATCH = 64, 4
TINY = (16, 32, 64, 128)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=_gen(seed))


# --------------------------------------------------------------------------- MIM


def test_mim_loss_is_zero_for_a_perfect_reconstruction_and_the_mean_l1_on_masked_pixels():
    target = _images()
    mask = random_patch_mask(BATCH, SIZE, 8, 0.6, generator=_gen())
    assert mim_loss(target, target, mask).item() == 0.0
    torch.testing.assert_close(mim_loss(target + 0.25 * mask, target, mask), torch.tensor(0.25))


def test_mim_loss_counts_only_masked_pixels():
    target, pred = _images(seed=0), _images(seed=1)
    mask = random_patch_mask(BATCH, SIZE, 8, 0.6, generator=_gen())
    loss = mim_loss(pred, target, mask)

    visible_changed = torch.where(mask.bool(), pred, pred + 3.0)
    assert mim_loss(visible_changed, target, mask).item() == pytest.approx(loss.item())

    b, y, x = (int(v) for v in mask[:, 0].nonzero()[0])
    masked_changed = pred.clone()
    masked_changed[b, 1, y, x] = target[b, 1, y, x] + 5.0
    delta = 5.0 - abs(pred[b, 1, y, x] - target[b, 1, y, x]).item()
    expected = loss.item() + delta / (3 * mask.sum().item())
    assert mim_loss(masked_changed, target, mask).item() == pytest.approx(expected, rel=1e-5)


def test_mim_loss_rejects_mismatched_shapes():
    images = _images()
    with pytest.raises(ValueError, match=r"mask .* must be \[B, 1, S, S\]"):
        mim_loss(images, images, torch.ones(BATCH, 3, SIZE, SIZE))


@pytest.mark.parametrize(("size", "patch", "ratio"), [(64, 8, 0.6), (64, 16, 0.3), (60, 8, 0.75)])
def test_patch_mask_respects_the_ratio_and_masks_whole_patches(size, patch, ratio):
    mask = random_patch_mask(16, size, patch, ratio, generator=_gen())
    assert mask.shape == (16, 1, size, size)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    grid = math.ceil(size / patch)
    per_image = mask.mean(dim=(1, 2, 3))
    assert torch.all((per_image - ratio).abs() < 1.5 / grid)  # whole patches, cropped edge
    if size % patch == 0:  # exactly round(ratio * patches) patches per image
        torch.testing.assert_close(per_image, torch.full((16,), round(ratio * grid**2) / grid**2))
    blocks = mask[:, :, : size - size % patch, : size - size % patch].unfold(2, patch, patch)
    blocks = blocks.unfold(3, patch, patch)  # [B, 1, g, g, patch, patch]
    assert torch.all(blocks.amax(dim=(-1, -2)) == blocks.amin(dim=(-1, -2)))
    assert not torch.equal(mask[0], mask[1])  # each image its own mask


def test_mim_masked_inputs_keep_visible_pixels_and_show_the_token_elsewhere():
    head = create_head("mim", TINY, 0, SIZE)
    assert isinstance(head, MIMHead) and head.patch_size == 8 and head.mask_ratio == 0.6
    images = _images()
    masked, mask = head.prepare_inputs(images, generator=_gen(3))
    assert mask.shape == (BATCH, 1, SIZE, SIZE)
    visible = ~mask.bool().expand_as(images)
    torch.testing.assert_close(masked[visible], images[visible], rtol=0, atol=0)
    token = head.mask_token.detach().view(1, 3, 1, 1).expand_as(images)
    torch.testing.assert_close(masked[~visible], token[~visible])
    again, mask_again = head.prepare_inputs(images, generator=_gen(3))
    assert torch.equal(mask, mask_again) and torch.equal(masked, again)
    assert not torch.equal(mask, head.prepare_inputs(images, generator=_gen(4))[1])


def test_mim_masks_are_random_in_training_and_fixed_in_eval():
    head = create_head("mim", TINY, 0, SIZE)
    images = _images()
    assert not torch.equal(head.prepare_inputs(images)[1], head.prepare_inputs(images)[1])
    head.eval()
    assert torch.equal(head.prepare_inputs(images)[1], head.prepare_inputs(images)[1])


def test_mim_reconstructs_full_resolution_also_off_the_32px_grid():
    backbone = create_backbone("tiny_resnet")
    for size in (64, 48):
        head = create_head("mim", backbone.channels, 0, size)
        recon = head.predict(backbone(torch.rand(2, 3, size, size)))
        assert recon.shape == (2, 3, size, size)


def test_mim_head_rejects_bad_options():
    with pytest.raises(ValueError, match="mask_ratio"):
        create_head("mim", TINY, 0, SIZE, mask_ratio=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        create_head("mim", TINY, 0, SIZE, patch_size=65)


# --------------------------------------------------------------------------- NT-Xent


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss written out anchor by anchor."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    losses = []
    for k in range(2 * n):
        positive = (k + n) % (2 * n)
        sims = torch.stack([z[k] @ z[j] / temperature for j in range(2 * n) if j != k])
        losses.append(torch.logsumexp(sims, 0) - z[k] @ z[positive] / temperature)
    return torch.stack(losses).mean()


def test_nt_xent_matches_the_anchor_by_anchor_definition():
    z1, z2 = torch.randn(5, 8, generator=_gen(0)), torch.randn(5, 8, generator=_gen(1))
    for temperature in (0.1, 0.5, 2.0):
        torch.testing.assert_close(
            nt_xent_loss(z1, z2, temperature), _reference_nt_xent(z1, z2, temperature)
        )


def test_nt_xent_is_lower_for_matched_views_than_for_shuffled_pairs():
    z1 = torch.randn(16, 32, generator=_gen(0))
    z2 = z1 + 0.3 * torch.randn(16, 32, generator=_gen(1))
    shuffled = z2[torch.randperm(16, generator=_gen(2))]
    assert nt_xent_loss(z1, z2) < nt_xent_loss(z1, shuffled) - 1.0


def test_nt_xent_temperature_sharpens_matched_pairs_and_flattens_to_uniform():
    z1 = torch.randn(8, 64, generator=_gen(0))
    z2 = z1 + 0.1 * torch.randn(8, 64, generator=_gen(1))
    losses = [nt_xent_loss(z1, z2, t).item() for t in (0.05, 0.2, 1.0)]
    assert losses[0] < losses[1] < losses[2]
    # At a huge temperature all 2B - 1 candidates look alike: loss -> log(2B - 1).
    assert nt_xent_loss(z1, z2, 1e6).item() == pytest.approx(math.log(15), abs=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, 0.0)


# --------------------------------------------------------------------------- views


def test_view_augmentation_without_randomness_is_the_identity():
    identity = ViewAugmentation(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0
    )
    images = _images()
    torch.testing.assert_close(identity(images, _gen()), images)
    flipped = ViewAugmentation(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1, jitter_p=0, grayscale_p=0
    )
    torch.testing.assert_close(flipped(images, _gen()), images.flip(-1))


def test_view_augmentation_draws_different_valid_views_per_image():
    images = _images(batch=8)
    augment = ViewAugmentation()
    views = augment(images, _gen(0))
    assert views.shape == images.shape
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(views, augment(images, _gen(0)))  # deterministic given a generator
    other = augment(images, _gen(1))
    assert ((views - other).abs().mean(dim=(1, 2, 3)) > 0.01).all()  # every image changed
    gray = ViewAugmentation(grayscale_p=1.0)(images, _gen(0))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_hue_jitter_keeps_gray_pixels_and_brightness_scales():
    gray = _images()[:, :1].expand(-1, 3, -1, -1)
    hue_only = ViewAugmentation(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=1, grayscale_p=0,
        brightness=0, contrast=0, saturation=0, hue=0.5,
    )  # fmt: skip
    torch.testing.assert_close(hue_only(gray, _gen()), gray, atol=1e-5, rtol=0)
    colour = _images()
    assert not torch.allclose(hue_only(colour, _gen()), colour, atol=1e-2)


def test_view_augmentation_names_every_bad_option():
    with pytest.raises(ValueError, match=r"crop_scale.*; jitter_p"):
        ViewAugmentation(crop_scale=(0.0, 1.0), jitter_p=2.0)


# --------------------------------------------------------------------------- heads


def test_contrastive_head_views_and_embeddings():
    head = create_head("contrastive", TINY, 0, SIZE)
    assert isinstance(head, ContrastiveHead) and head.temperature == 0.2
    images = _images()
    views, batch = head.prepare_inputs(images, generator=_gen())
    assert views.shape == (2 * BATCH, 3, SIZE, SIZE) and batch == BATCH
    assert not torch.allclose(views[:BATCH], views[BATCH:])
    features = [torch.randn(2 * BATCH, c, 2, 2) for c in TINY]
    z = head.predict(features)
    assert z.shape == (2 * BATCH, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2 * BATCH))
    loss = head(features, images, {}, batch)
    assert set(loss) == {"nt_xent"} and torch.isfinite(loss["nt_xent"])
    with pytest.raises(ValueError, match="2 x 3 views"):
        head(features, images, {}, 3)


def _train(task: str, steps: int) -> tuple[list[float], float]:
    """Adam on one fixed batch with fixed masks / views; training losses and eval metric."""
    torch.manual_seed(0)
    backbone = create_backbone("tiny_resnet")
    head = create_head(task, backbone.channels, 0, SIZE)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    images = _images(batch=8)
    losses = []
    for _ in range(steps):
        inputs, ctx = head.prepare_inputs(images, generator=_gen(7))
        loss = sum(head(backbone(inputs), images, {}, ctx).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if task == "mim":
        assert head.mask_token.grad is not None and head.mask_token.grad.abs().sum() > 0
    metric = head.metric()
    assert isinstance(metric, MeanLoss)
    backbone.eval(), head.eval()
    with torch.no_grad():
        inputs, ctx = head.prepare_inputs(images)
        metric.update(head(backbone(inputs), images, {}, ctx))
    return losses, metric.compute()["loss"]


@pytest.mark.parametrize(("task", "steps"), [("mim", 8), ("contrastive", 8)])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(task, steps):
    losses, val_loss = _train(task, steps)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert math.isfinite(val_loss) and val_loss > 0


def test_heads_under_bf16_autocast_keep_pixels_and_losses_in_float32():
    backbone = create_backbone("tiny_resnet")
    images = _images()
    for task in ("mim", "contrastive"):
        head = create_head(task, backbone.channels, 0, SIZE)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inputs, ctx = head.prepare_inputs(images, generator=_gen())
            losses = head(backbone(inputs), images, {}, ctx)
        assert inputs.dtype == torch.float32
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_pipeline_head_options_default_to_the_heads_own_defaults():
    """`heads:` in the config shows the real defaults; they must not drift from the heads'."""
    for task, head_class in (("mim", MIMHead), ("contrastive", ContrastiveHead)):
        signature = inspect.signature(head_class.__init__).parameters
        for name, value in HeadsConfig().options(task).items():
            assert signature[name].default == value, (task, name)
    assert HeadsConfig().options("cls") == {}


def test_head_options_of_a_model_spec_build_the_heads_and_survive_a_save(tmp_path):
    spec = {
        "trunk": backbone_trunk_spec("tiny_resnet"),
        "streams": {
            "raw:mim": {"task": "mim", "options": {"mask_ratio": 0.75, "patch_size": 4}},
            "raw:contrastive": {"task": "contrastive", "options": {"temperature": 0.5}},
        },
        "image_size": SIZE,
    }
    model = build_model(spec)
    assert (model.heads["raw:mim"].mask_ratio, model.heads["raw:mim"].patch_size) == (0.75, 4)
    assert model.heads["raw:contrastive"].temperature == 0.5
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.heads["raw:mim"].mask_ratio == 0.75
    assert again.heads["raw:contrastive"].temperature == 0.5

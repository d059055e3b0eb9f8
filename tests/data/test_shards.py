"""ShardDataset: targets per format, resizing, deterministic flips, workers, errors; the
encoded (GPU decode) mode against the PIL path; per-epoch augmentation through the
engine's loader."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from xlearner.config import SourceConfig
from xlearner.data.augment import hflip, view_boxes
from xlearner.data.decode import EncodedBatch, decode_batch
from xlearner.data.ingest import ingest_source
from xlearner.data.shards import ManifestError, ShardDataset, collate_fn, load_manifest
from xlearner.loaders import StepBatchSampler, Stream, make_loader, stream_seed
from xlearner.store import StoreError, open_store
from xlearner.store_keys import manifest_key

SIZE = 48


@pytest.fixture(scope="module")
def published(synth_data, tmp_path_factory):
    """Every synthetic source ingested into one local store: {name: manifest URI}."""
    store = open_store(str(tmp_path_factory.mktemp("store")))
    uris = {}
    for config in synth_data.sources + synth_data.downstream:
        source = SourceConfig(**config)
        manifest = ingest_source(source, store, shard_bytes=100_000, log=lambda _: None)
        uris[source.name] = store.uri(manifest_key(source.name, manifest["version"]))
    return uris


def coco_boxes(synth_data, name):
    data = json.loads((synth_data.paths[name] / "annotations.json").read_text())
    files = {i["id"]: f"images/{i['file_name']}" for i in data["images"]}
    boxes = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(files[a["image_id"]], []).append(
            ([x, y, x + w, y + h], a["category_id"] - 1)
        )
    return boxes


@pytest.mark.parametrize(
    "name", ["shapes_cls", "shapes_attr", "shapes_det", "shapes_seg", "shapes_unlabeled"]
)
def test_items_follow_the_target_table(published, name):
    ds = ShardDataset(published[name], "val", SIZE)
    manifest = load_manifest(published[name])
    assert len(ds) == manifest["splits"]["val"]["records"] > 0
    assert ds.classes == manifest["classes"] and ds.num_classes == len(ds.classes)
    assert ds.manifest == manifest
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.02
        if ds.format == "cls":
            assert target["label"].dtype == torch.int64 and target["label"].shape == ()
            file = ds.raw(i)[1]["file"]
            assert ds.classes[int(target["label"])] == file.split("/")[0]
        elif ds.format == "multilabel":
            assert (
                target["labels"].shape == (ds.num_classes,)
                and target["labels"].dtype == torch.float32
            )
            assert set(target["labels"].tolist()) <= {0.0, 1.0} and target["labels"].sum() >= 2
        elif ds.format == "det":
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert target["boxes"].shape == (len(target["labels"]), 4)
        elif ds.format == "seg":
            assert target["mask"].shape == (SIZE, SIZE) and target["mask"].dtype == torch.int64
            assert set(target["mask"].unique().tolist()) <= set(range(ds.num_classes))
            assert (target["mask"] > 0).any()
        else:
            assert target == {}


def test_det_boxes_are_scaled_to_the_resized_image(published, synth_data):
    ds = ShardDataset(published["shapes_det"], "train", SIZE)
    truth = coco_boxes(synth_data, "shapes_det")
    scale = SIZE / 64
    for i in range(10):
        _, target = ds[i]
        file = ds.raw(i)[1]["file"]
        expected = torch.tensor([b for b, _ in truth[file]]) * scale
        assert torch.allclose(target["boxes"], expected)
        assert target["labels"].tolist() == [c for _, c in truth[file]]


def test_seg_mask_matches_the_shapes(published):
    ds = ShardDataset(published["shapes_seg"], "train", 64)  # no resize: mask = drawn pixels
    image, target = ds[0]
    inside = target["mask"] > 0
    # shapes are saturated colours on a muted background: they differ in colour spread
    spread = image.max(0).values - image.min(0).values
    assert spread[inside].mean() > spread[~inside].mean() + 0.1


def test_train_augmentation_is_deterministic_per_epoch(published):
    aug = ShardDataset(published["shapes_det"], "train", SIZE, train=True)
    plain = ShardDataset(published["shapes_det"], "train", SIZE)
    changed = 0
    for i in range(20):
        image, target = aug[i]
        again, target_again = aug[i]
        assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
        changed += not torch.equal(image, plain[i][0])
        boxes = target["boxes"]
        assert boxes.shape == (len(target["labels"]), 4)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= SIZE
    assert changed >= 18
    aug.set_epoch(1)
    assert sum(not torch.equal(aug[i][0], plain[i][0]) for i in range(20)) >= 18
    assert any(not torch.equal(aug[i][0], aug_i) for i, aug_i in enumerate(
        ShardDataset(published["shapes_det"], "train", SIZE, train=True)[k][0] for k in range(20)
    ))  # fmt: skip


def test_augmented_boxes_and_masks_follow_the_pixels(published):
    """Augmented det and seg samples: the shapes' pixels lie where the targets say."""
    det = ShardDataset(published["shapes_det"], "train", 64, train=True)
    seg = ShardDataset(published["shapes_seg"], "train", 64, train=True)
    for i in range(10):
        image, target = seg[i]
        inside = target["mask"] > 0
        spread = image.max(0).values - image.min(0).values  # saturated shapes, muted ground
        assert spread[inside].mean() > spread[~inside].mean() + 0.1
        image, target = det[i]
        spread = image.max(0).values - image.min(0).values
        for x0, y0, x1, y1 in target["boxes"].round().int().tolist():
            assert spread[y0:y1, x0:x1].mean() > spread.mean() - 0.02


def test_view_boxes_crops_scales_and_drops():
    boxes = torch.tensor([[0.5, 0.5, 0.75, 0.75], [0.0, 0.0, 0.05, 0.05], [0.85, 0.1, 1.0, 0.3]])
    out = view_boxes(boxes, torch.tensor([1, 2, 3]), (0.1, 0.1, 0.9, 0.9), 80)
    # x' = (x - 0.1) * 100, clipped to [0, 80]; the second box falls outside the window
    assert out["labels"].tolist() == [1, 3]
    assert torch.allclose(out["boxes"], torch.tensor([[40.0, 40, 65, 65], [75, 0, 80, 20]]))


def test_hflip_mirrors_boxes_and_masks():
    image = torch.zeros(3, 4, 10)
    image[:, :, 0] = 1
    mask = torch.zeros(4, 10, dtype=torch.int64)
    mask[:, :3] = 2
    out, target = hflip(image, {"boxes": torch.tensor([[0.0, 1.0, 3.0, 2.0]]), "mask": mask})
    assert out[:, :, 9].eq(1).all() and out[:, :, 0].eq(0).all()
    assert target["boxes"].tolist() == [[7.0, 1.0, 10.0, 2.0]]
    assert target["mask"][:, 7:].eq(2).all() and target["mask"][:, :7].eq(0).all()


@pytest.mark.parametrize(
    "name, keys",
    [
        ("shapes_cls", {"label": (4,)}),
        ("shapes_attr", {"labels": (4, 6)}),
        ("shapes_seg", {"mask": (4, SIZE, SIZE)}),
    ],
)
def test_collate_stacks(published, name, keys):
    ds = ShardDataset(published[name], "train", SIZE)
    images, targets = collate_fn(ds.format)([ds[i] for i in range(4)])
    assert images.shape == (4, 3, SIZE, SIZE)
    assert {k: tuple(v.shape) for k, v in targets.items()} == keys


def test_collate_det_and_unlabeled(published):
    det = ShardDataset(published["shapes_det"], "train", SIZE)
    images, targets = collate_fn("det")([det[i] for i in range(3)])
    assert images.shape == (3, 3, SIZE, SIZE) and isinstance(targets, list) and len(targets) == 3
    unl = ShardDataset(published["shapes_unlabeled"], "train", SIZE)
    images, targets = collate_fn("unlabeled")([unl[i] for i in range(3)])
    assert images.shape == (3, 3, SIZE, SIZE) and targets == {}


def test_picklable_and_workers_give_the_same_batches(published):
    ds = ShardDataset(published["shapes_seg"], "train", SIZE, train=True)
    ds[0]  # opens a shard file handle, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])
    kw = {"batch_size": 8, "collate_fn": collate_fn(ds.format)}
    single = list(DataLoader(ds, num_workers=0, **kw))
    multi = list(DataLoader(ds, num_workers=2, **kw))
    assert len(single) == len(multi)
    for (a, ta), (b, tb) in zip(single, multi, strict=True):
        assert torch.equal(a, b) and torch.equal(ta["mask"], tb["mask"])


def test_loads_through_the_content_cache(store, synth_data, tmp_path):
    source = SourceConfig(**synth_data.source("shapes_cls"))
    manifest = ingest_source(source, store, log=lambda _: None)
    uri = store.uri(manifest_key(source.name, manifest["version"]))
    cache = tmp_path / "cache"
    ds = ShardDataset(uri, "train", SIZE, cache_dir=cache)
    assert len(ds) == manifest["splits"]["train"]["records"]
    cached = sorted(cache.rglob("*.tar"))
    assert {p.name for p in cached} == {
        f"{s['sha256']}.tar" for s in manifest["splits"]["train"]["shards"]
    }
    mtime = cached[0].stat().st_mtime_ns
    ShardDataset(uri, "train", SIZE, cache_dir=cache)  # cached by content: no new download
    assert cached[0].stat().st_mtime_ns == mtime
    assert ds[0][0].shape == (3, SIZE, SIZE)


def test_tampered_shard_is_rejected(tmp_path, synth_data):
    store = open_store(str(tmp_path / "store"))
    source = SourceConfig(**synth_data.source("shapes_cls"))
    manifest = ingest_source(source, store, log=lambda _: None)
    shard = manifest["splits"]["val"]["shards"][0]["file"]
    path = store.root / "sources" / "shapes_cls" / manifest["version"] / shard
    path.write_bytes(path.read_bytes()[:-1024])
    with pytest.raises(StoreError, match="sha256"):
        ShardDataset(
            store.uri(manifest_key("shapes_cls", manifest["version"])),
            "val",
            SIZE,
            cache_dir=tmp_path / "c",
        )


def test_manifest_errors(tmp_path, published):
    with pytest.raises(
        ManifestError, match=r"nope/manifest.json does not exist; ingest the source"
    ):
        load_manifest(str(tmp_path / "nope" / "manifest.json"))
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ManifestError, match="is not an xlearner manifest"):
        load_manifest(str(tmp_path / "other.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ManifestError, match="broken.json.*not valid JSON"):
        load_manifest(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="split must be one of"):
        ShardDataset(published["shapes_cls"], "test", SIZE)


def assert_same_targets(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["shapes_det", "shapes_seg", "shapes_cls"])
def test_encoded_items_decode_like_the_pil_path(published, name):
    """The GPU decode path, run on the CPU (torchvision's decoder, the same resampling):
    the same augmented images within 1/255 and the same targets, JPEG and PNG alike."""
    ds = ShardDataset(published[name], "train", SIZE, train=True, seed=3)
    ds.set_epoch(2)
    batch = [ds.encoded_item(i) for i in range(24)]
    kinds = {item.jpeg is not None for item, _ in batch}
    assert kinds == {True, False}  # the synthetic sources mix JPEG and PNG
    assert any(item.flip for item, _ in batch) and any(not item.flip for item, _ in batch)
    images, targets = collate_fn(ds.format)(batch)
    assert isinstance(images, EncodedBatch) and len(images) == 24
    decoded = decode_batch(images, "cpu")
    expected = torch.stack([ds[i][0] for i in range(24)])
    assert decoded.shape == expected.shape == (24, 3, SIZE, SIZE)
    assert (decoded - expected).abs().max() <= 1.5 / 255
    assert (decoded - expected).abs().mean() < 0.3 / 255
    for i, (_, target) in enumerate(batch):
        assert_same_targets(target, ds[i][1])


def test_encoded_big_jpegs_decode_like_the_pil_path(tmp_path):
    """500x375 JPEGs to 64 px: PIL decodes at 1/4 scale (draft), the batch decoder at
    full size; both crop the same window, so they differ by little."""
    from data_helpers import write_coco
    from PIL import Image

    root = tmp_path / "big"
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 180, 500)[None, :, None]
    for k in range(4):
        pixels = (rng.random((375, 500, 3)) * 60 + ramp).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / f"{k}.jpg", quality=90)
    write_coco(
        root,
        [{"id": k, "file_name": f"{k}.jpg"} for k in range(4)],
        [{"id": k + 1, "image_id": k, "category_id": 1, "bbox": [100, 50, 200, 150]}
         for k in range(4)],
        [{"id": 1, "name": "thing"}],
    )  # fmt: skip
    store = open_store(str(tmp_path / "store"))
    source = SourceConfig(name="big", format="det", uri=str(root), val_fraction=0.0)
    manifest = ingest_source(source, store, log=lambda _: None)
    ds = ShardDataset(store.uri(manifest_key("big", manifest["version"])), "train", 64, True)
    batch = [ds.encoded_item(i) for i in range(len(ds))]
    decoded = decode_batch(collate_fn("det")(batch)[0], "cpu")
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    assert (decoded - expected).abs().mean() < 2 / 255
    for i, (_, target) in enumerate(batch):
        assert_same_targets(target, ds[i][1])


@pytest.mark.parametrize("workers", [0, 2])
def test_engine_loader_augments_per_epoch_with_the_pipeline_seed(published, workers):
    """Through the engine's loader (in worker processes too) every epoch gets new crops
    and flips, drawn from the pipeline seed: image i of epoch e is what
    set_epoch(e, seed=stream_seed(seed, stream)) gives, whichever worker loads it."""
    ds = ShardDataset(published["shapes_cls"], "train", SIZE, train=True)
    n = len(ds)
    stream = Stream("shapes_cls:cls", "cls", ds, None, collate_fn("cls"))
    loader = make_loader(stream, n, seed=7, workers=workers)  # one batch = one epoch
    epoch0, epoch1 = next(loader)[0], next(loader)[0]
    sampler = StepBatchSampler(n, n, stream_seed(7, stream.name))
    sampler_order = [sampler.batch(0), sampler.batch(1)]
    reference = ShardDataset(published["shapes_cls"], "train", SIZE, train=True)
    for epoch, images in enumerate((epoch0, epoch1)):
        reference.set_epoch(epoch, seed=stream_seed(7, stream.name))
        for k in (0, 1, n - 1):
            assert torch.equal(images[k], reference[sampler_order[epoch][k]][0])
    first = {i: epoch0[k] for k, i in enumerate(sampler_order[0])}
    second = {i: epoch1[k] for k, i in enumerate(sampler_order[1])}
    changed = sum(not torch.equal(first[i], second[i]) for i in range(n))
    assert changed >= 0.9 * n  # two epochs of one image differ
    again = make_loader(stream, n, seed=7, workers=0)
    assert torch.equal(next(again)[0], epoch0)  # one seed: the same run
    other = make_loader(stream, n, seed=8, workers=0)
    assert not torch.equal(next(other)[0], epoch0)


def test_encoded_batches_through_worker_processes_and_the_engine(published):
    """Encoded items cross DataLoader workers (JPEG bytes as tensors), and the engine's
    GPU-decode path, run on the CPU, trains on what decode_batch gives."""
    from xlearner.config import EngineConfig, TrainConfig
    from xlearner.engine import Trainer

    ds = ShardDataset(published["shapes_seg"], "train", SIZE, train=True)
    stream = Stream("shapes_seg:seg", "seg", ds, None, collate_fn("seg"))
    plain = next(make_loader(stream, 16, seed=3, workers=0))
    encoded = next(make_loader(stream, 16, seed=3, workers=2, encoded=True))
    assert isinstance(encoded[0], EncodedBatch)
    assert (decode_batch(encoded[0], "cpu") - plain[0]).abs().max() <= 1.5 / 255
    assert torch.equal(encoded[1]["mask"], plain[1]["mask"])

    class Seen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.images = []

        def forward(self, images, stream, targets):
            self.images.append(images)
            return {"l": (images.mean() - self.w) ** 2}

    model = Seen()
    trainer = Trainer(
        model, [stream], TrainConfig(steps=1, batch_size=16), EngineConfig(device="cpu"), seed=3
    )
    trainer.decode_on_device = True  # what engine.decode: gpu sets on CUDA
    trainer.fit()
    assert (model.images[0] - plain[0]).abs().max() <= 1.5 / 255

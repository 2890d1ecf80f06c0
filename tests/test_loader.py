"""The data path (auxframe/data/loader.py): worker processes make the same batches as the main process,
streams resume exactly from the state of the batches handed out, errors in workers stay clear."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

import fixtures_data as fx
from auxframe.data.loader import BatchStream, EvalBatches, PoolLoader, default_num_workers
from auxframe.data.torchvision_sets import celeba, cifar10
from auxframe.data.transforms import Transforms
from auxframe.errors import DataError

CIFAR = Transforms(augment=[A.PadIfNeeded(36, 36, border_mode=4), A.RandomCrop(32, 32), A.HorizontalFlip(),
                            A.GaussNoise(std_range=(0.15, 0.15))], mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    fx.make_cifar10(root / "cifar", train_per_class=12)
    fx.make_celeba(root / "celeba", n=40)
    return {"cifar": cifar10(str(root / "cifar"), transforms=CIFAR),  # batched: pixels fetched, augmented after
            "celeba": celeba(str(root / "celeba"), transforms=Transforms(resize=(16, 16),  # JPEG, per image
                                                                         augment=[A.HorizontalFlip()])),
            "root": root}


def loaders(data, rank=0, world_size=1):
    return {"labeled": PoolLoader(data["cifar"], np.arange(90), 12, seed=1, rank=rank, world_size=world_size),
            "train": PoolLoader(data["cifar"], np.arange(120), 24, seed=2, rank=rank, world_size=world_size),
            "faces": PoolLoader(data["celeba"], np.arange(20), 8, seed=3, rank=rank, world_size=world_size)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key][0], b[key][0]), key
        assert all(torch.equal(a[key][1][f], b[key][1][f]) for f in a[key][1]), key


def test_workers_make_the_batches_the_main_process_makes(data):
    assert data["cifar"].batched is not None and getattr(data["celeba"], "batched", None) is None
    inline, workers = BatchStream(loaders(data), "cpu"), BatchStream(loaders(data), "cpu", num_workers=2)
    reference = loaders(data)
    try:
        for step in range(9):  # crosses epoch ends of every pool
            a, b = next(inline), next(workers)
            assert_same(a, b)
            whole = {k: next(loader) for k, loader in reference.items()}  # PoolLoader alone: get_train_batch
            assert_same(a, whole)
        assert {k: l.state_dict() for k, l in workers.loaders.items()} == {k: l.state_dict() for k, l in inline.loaders.items()}
        assert workers.loaders["faces"].epoch == 4  # 2 batches an epoch
    finally:
        workers.close()


def test_a_stream_resumes_from_the_batches_handed_out_not_those_prefetched(data):
    stream = BatchStream(loaders(data), "cpu", num_workers=2, prefetch_factor=4)
    try:
        for _ in range(3):
            next(stream)
        state = {k: loader.state_dict() for k, loader in stream.loaders.items()}
        assert state["labeled"] == {"epoch": 0, "position": 36, "seed": 1}  # 3 batches, though 8 were asked for
        expected = [next(stream) for _ in range(4)]
        resumed = BatchStream(loaders(data), "cpu", num_workers=2)
        for k, loader in resumed.loaders.items():
            loader.load_state_dict(state[k])
        rewound = stream  # a running stream that loads a state starts again from it
        for k, loader in rewound.loaders.items():
            loader.load_state_dict(state[k])
        for want in expected:
            assert_same(next(resumed), want)
            assert_same(next(rewound), want)
        resumed.close()
    finally:
        stream.close()


def test_starting_workers_leaves_the_global_random_state_alone(data):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    stream = BatchStream(loaders(data), "cpu", num_workers=1)
    next(stream)
    stream.close()
    assert torch.equal(torch.get_rng_state(), before)  # the training's own draws do not depend on the workers


def test_each_rank_streams_its_slice_of_the_global_batch(data):
    whole = BatchStream(loaders(data), "cpu")
    ranks = [BatchStream(loaders(data, r, 2), "cpu", num_workers=1 if r else 0) for r in (0, 1)]
    try:
        for _ in range(3):
            batch, parts = next(whole), [next(s) for s in ranks]
            for key in batch:
                labels = torch.cat([p[key][1][next(iter(batch[key][1]))] for p in parts])
                assert torch.equal(labels, batch[key][1][next(iter(batch[key][1]))]), key
                assert parts[0][key][0].shape[0] * 2 == batch[key][0].shape[0]
            # rank 0 augments its slice as the single process did (same seed); rank 1 draws its own
            assert torch.equal(parts[0]["faces"][0], batch["faces"][0][:4])
    finally:
        ranks[1].close()


def test_evaluation_batches_from_workers_equal_get_batch(data):
    ds = data["celeba"]
    idx = np.arange(3, 30)
    expected = [ds.get_batch(torch.as_tensor(idx[i:i + 8])) for i in range(0, len(idx), 8)]
    batches = EvalBatches(ds, torch.device("cpu"), num_workers=2)
    try:
        for _ in range(2):  # persistent workers, a second pass over another pool
            got = list(batches(idx, 8))
            assert len(got) == len(expected) == 4
            for (x, y), (ex, ey) in zip(got, expected):
                assert torch.equal(x, ex) and torch.equal(y["Smiling"], ey["Smiling"])
        assert len(list(batches(idx[:5], 8))) == 1
    finally:
        batches.close()


def test_a_broken_file_read_in_a_worker_is_the_same_clear_error(data, tmp_path):
    fx.make_celeba(tmp_path, n=12)
    ds = celeba(str(tmp_path), transforms=Transforms(resize=(8, 8)))
    (tmp_path / "celeba" / "img_align_celeba" / "000003.jpg").write_bytes(b"not a jpeg")
    stream = BatchStream({"x": PoolLoader(ds, np.arange(12), 12, seed=0, shuffle=False)}, "cpu", num_workers=1)
    try:
        with pytest.raises(DataError) as err:
            next(stream)
    finally:
        stream.close()
    message = str(err.value)
    assert message.startswith("cannot read the image") and "000003.jpg" in message and "Traceback" not in message


def test_bad_settings_and_the_automatic_worker_count():
    with pytest.raises(DataError, match="train.num_workers must be 'auto' or a whole number >= 0, got -1"):
        BatchStream({}, "cpu", num_workers=-1)
    with pytest.raises(DataError, match="train.prefetch_factor"):
        BatchStream({}, "cpu", prefetch_factor=0)
    cores = len(__import__("os").sched_getaffinity(0))
    assert default_num_workers(torch.device("cpu")) == (0 if cores <= 4 else cores // 4)
    assert default_num_workers(torch.device("cuda")) == max(0, min(8, cores - 1))
    assert default_num_workers(torch.device("cuda"), processes_per_node=cores) == 0


# -- the trainer on top: workers change nothing, resume is exact with them -------------------------
SHIFTS = {  # digits shifted by up to a pixel, made as batched ops (in the workers on the CPU)
    "datasets.digits.transforms": "@Transforms()",
    "Transforms.augment": "[@albumentations.PadIfNeeded(), @albumentations.RandomCrop()]",
    "albumentations.PadIfNeeded.min_height": 10, "albumentations.PadIfNeeded.min_width": 10,
    "albumentations.RandomCrop.height": 8, "albumentations.RandomCrop.width": 8,
    "train.device": "'cpu'",
}
AUXILEARN = {"weightings.auxilearn.outer_every": 3, "weightings.auxilearn.alpha": 0.1}


def run(run_dir, steps, workers, resume=False, auxilearn=False):
    import gin

    from auxframe import config
    from auxframe.experiment import train
    from helpers import GIN, quick_bindings

    gin.clear_config()
    files = [GIN / "experiments/digits_equal_all.gin"] + ([GIN / "weightings/auxilearn_linear.gin"] if auxilearn else [])
    extra = {**SHIFTS, **(AUXILEARN if auxilearn else {}), "train.num_workers": workers}
    config.parse(files, quick_bindings(steps=steps, **extra))
    return train(run_dir=run_dir, resume=resume)


@pytest.mark.parametrize("auxilearn", [False, True], ids=["equal", "auxilearn"])
def test_resume_with_workers_ends_as_the_uninterrupted_run_without_them(tmp_path, auxilearn):
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint

    run(tmp_path / "inline", 10, workers=0, auxilearn=auxilearn)
    run(tmp_path / "split", 4, workers=2, auxilearn=auxilearn)
    run(tmp_path / "split", 10, workers=2, resume=True, auxilearn=auxilearn)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("inline", "split"))
    assert a["step"] == b["step"] == 10 and a["loaders"] == b["loaders"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["weighting"].keys() == b["weighting"].keys()
    rows = [__import__("json").loads(r) for r in (tmp_path / "split" / "scalars.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/step" in r]
    assert timed and all(0.0 <= r["time/data"] <= r["time/step"] for r in timed)


def test_resuming_a_run_of_another_device_kind_is_a_clear_error(tmp_path):
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint
    from auxframe.errors import CheckpointError

    run(tmp_path / "r", 2, workers=0)
    path = latest_checkpoint(tmp_path / "r")
    state = load_checkpoint(path)
    state["signal_rngs"] = {k: torch.zeros(16, dtype=torch.uint8) for k in state["signal_rngs"]}  # a CUDA generator's
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="random state of 'labels@labeled' was saved on another kind of device than cpu"):
        run(tmp_path / "r", 4, workers=0, resume=True)

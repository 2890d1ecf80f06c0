"""Real-size training throughput: auxframe's training loop against a hand-written PyTorch loop, data path included.

Two settings of the seed papers, built from the shipped recipes on fixtures the script writes itself
in each data set's real on-disk format (into a cache folder, ``--cache``):

* ``s4l`` (a): S4L on CIFAR-10 (``experiments/s4l_cifar10.gin``): WRN-28-2, each step 128 labelled
  images, 128 unlabelled images in 4 rotations and 128 in 8 Exemplar views (1,664 images), with the
  recipe's augmentation (reflect-pad by 2 and crop, flip, Gaussian noise) and Adam. Fixture:
  ``cifar-10-batches-py`` (five pickled training batches of 10,000 images and the test batch), as
  torchvision writes it; random pixels (the content does not change the cost of raw pixels).
* ``celeba`` (b): CelebA with 1% labels (``experiments/celeba_1pct.gin``): ResNet-18 (small-image
  stem), the main attribute and 39 auxiliary attributes (40 two-class heads), batch 64 of
  178x218 JPEGs decoded, resized to 64x64 and flipped image by image. Fixture: ``--celeba-images``
  (default 4,096) JPEGs in ``img_align_celeba/`` with ``list_attr_celeba.txt`` and
  ``list_eval_partition.txt`` as torchvision reads them; photo-like content, about 10 KB a file as
  CelebA's are. The split is the recipe's but with every non-held-out image labelled (1% of 4,096
  is less than one batch); what is timed is the batch, not which images it holds.

Sections (``--sections``):

* ``throughput``: auxframe (``Trainer.fit`` itself, in blocks of ``--steps`` steps, with each weighting
  of ``--weightings``: S4L's ARML and AuxiLearn take their update every 20 steps) and the
  hand-written loop (the same model with the same initial weights, batch composition, augmentation,
  losses, optimizer and precision, with its own DataLoader, workers and pinned memory), in
  interleaved blocks. Prints images/s, the ratio of step times auxframe (Equal) / hand-written with
  its spread over the pairs of blocks (goal <= 1.05), each weighting's step time over Equal's, and
  the share of each side's step time spent waiting for data (goal on a GPU: <= 10%).
* ``workers``: auxframe (Equal) with each number of DataLoader workers in ``--workers-list``,
  interleaved: images/s and data-wait share (also ``--setting quickstart``: the digits quickstart).
* ``data`` (S4L): the data side of a step alone (its batches made, copied and augmented, the signals
  applied), with the recipe's augmentation batched on the training device and image by image
  through albumentations (``Transforms.batched = False``), interleaved (the data wait of the
  throughput section is what of it the workers do not hide).
* ``precision`` (GPU): auxframe (Equal) in fp32 with TF32 off, fp32 with TF32 on and bf16,
  interleaved: images/s over fp32 without TF32 (goal for bf16: >= 1.7).
* ``memory`` (GPU): the peak GPU memory of a few steps with each weighting (those of
  ``--memory-weightings``; at K = 39 auxiliary tasks in the CelebA setting), over Equal's.

Run (CPU: a smaller batch, one thread for the training)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_scale.py --setting s4l --batch 8 --steps 4 --rounds 4
    OMP_NUM_THREADS=1 .venv/bin/python bench/real_scale.py --setting celeba --batch 16 --steps 4 --rounds 4
    .venv/bin/python bench/real_scale.py --setting s4l --device cuda --sections throughput,precision
    .venv/bin/python bench/real_scale.py --setting celeba --device cuda --sections throughput,memory
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the data sets' on-disk formats: one writer, shared with the tests

import fixtures_data as fx  # noqa: E402

from auxframe import config, experiment  # noqa: E402
from auxframe.losses import triplet  # noqa: E402  (the Exemplar loss: the model's objective, not framework)

GIN = REPO / "auxframe" / "configs"
SETTINGS = {
    "s4l": {"recipe": "experiments/s4l_cifar10.gin", "batch": 128, "images_per_batch": 1 + 4 + 8,
            "weightings": "equal,arml,auxilearn"},
    "celeba": {"recipe": "experiments/celeba_1pct.gin", "batch": 64, "images_per_batch": 1, "weightings": "equal"},
    # the quickstart (digit + parity + ge5 on 32 labelled images, rotation on 32 x 4): for the workers
    # section only (its hand-written comparison is bench/framework_tax.py)
    "quickstart": {"recipe": "experiments/digits_equal_all.gin", "batch": 32, "images_per_batch": 1 + 4, "weightings": "equal"},
}
#: gin files of the weightings whose recipe is not ``weightings/<name>.gin``.
WEIGHTING_FILES = {"auxilearn": "weightings/auxilearn_linear.gin"}
GOAL_TAX, GOAL_DATA, GOAL_BF16 = 1.05, 0.10, 1.7
cpu_times: dict[str, list[float]] = {}  # the last interleaved run's main-process CPU seconds per step


# -- fixtures ---------------------------------------------------------------------------------------
def cache_dir(args) -> Path:
    base = Path(args.cache) if args.cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "auxframe-bench"
    base.mkdir(parents=True, exist_ok=True)
    return base


def fixture(args) -> Path | None:
    """The data set's folder (``root`` of the dataset plugin), written once per cache."""
    if args.setting == "quickstart":
        return None  # scikit-learn's bundled digits
    if args.setting == "s4l":
        root = cache_dir(args) / "cifar10"
        if not (root / ".complete").exists():
            print(f"writing the CIFAR-10 fixture (50,000 + 10,000 images, python pickle batches) to {root} ...", flush=True)
            fx.make_cifar10(root, train_per_class=5_000, test_per_class=1_000)
            (root / ".complete").touch()
        return root
    root = cache_dir(args) / f"celeba-{args.celeba_images}"
    if not (root / ".complete").exists():
        print(f"writing the CelebA fixture ({args.celeba_images:,} JPEGs of 178x218) to {root} ...", flush=True)
        fx.make_celeba(root, n=args.celeba_images, size=(218, 178), smooth=True)
        (root / ".complete").touch()
    return root


# -- the auxframe side ------------------------------------------------------------------------------
_REAL_FIT = experiment.Trainer.fit


class _Captured(experiment.Trainer):
    """The trainer ``experiment.train`` builds, kept instead of trained; its final evaluation skipped.

    The strategy's global flags (TF32) are put back when ``experiment.train`` returns; the sections
    set them for every block (``_tf32``).
    """

    last: "_Captured | None" = None

    def fit(self):
        _Captured.last = self
        return {}

    def finish(self, wall_time):
        return {}


def supports(parameter: str) -> bool:
    return parameter in inspect.signature(experiment.train).parameters


def build_auxframe(args, root: Path, weighting: str, workers: Any = None, precision: str | None = None,
                   tf32: bool | None = None, extra: tuple[str, ...] | list[str] = ()):
    """The recipe's trainer, built by ``experiment.train`` from the shipped gin files."""
    import gin

    setting = SETTINGS[args.setting]
    files = [GIN / setting["recipe"]]
    if weighting != "equal":
        files.append(GIN / WEIGHTING_FILES.get(weighting, f"weightings/{weighting}.gin"))
    b = {
        "train.steps": 10**9, "train.batch_size": args.batch, "train.eval_every": 0, "train.log_every": 10**9,
        "train.checkpoint_every": 0, "train.progress": False, "train.device": f"'{args.device}'",
    }
    workers = workers if workers is not None else args.workers
    b["train.num_workers"] = "'auto'" if workers == "auto" else int(workers)
    precision = precision or args.precision
    if supports("precision"):
        b["train.precision"] = f"'{precision}'"
    if supports("tf32"):
        b["train.tf32"] = (args.tf32 == "on") if tf32 is None else tf32
    if args.setting == "s4l":
        b["datasets.cifar10.root"] = f"'{root}'"
    elif args.setting == "celeba":
        b.update({"datasets.celeba.root": f"'{root}'", "LowDataSplit.val_per_class": 16,
                  "LowDataSplit.labels_fraction": None, "LowDataSplit.aux_fraction": 0.05})
    gin.clear_config()
    config.parse(files, [f"{k} = {v}" for k, v in b.items()] + list(args.param) + list(extra))
    original, experiment.Trainer = experiment.Trainer, _Captured
    try:
        experiment.train(run_dir=None)
    finally:
        experiment.Trainer = original
    trainer, _Captured.last = _Captured.last, None
    return trainer


def auxframe_block(trainer) -> Callable[[int], float]:
    """``n`` steps of the real ``Trainer.fit``; returns the seconds spent waiting for data."""

    streams = [s for s in (trainer.train_stream, trainer.aux_stream) if s is not None]

    def run(n: int) -> float:
        before = sum(s.total_wait_s for s in streams)
        trainer.schedule.steps = trainer.step + n
        _REAL_FIT(trainer)
        return sum(s.total_wait_s for s in streams) - before

    return run


# -- the hand-written side --------------------------------------------------------------------------
class _Epochs:
    """Seeded reshuffles of one pool, batch after batch (the hand-written loop's own sampler)."""

    def __init__(self, pool: np.ndarray, batch: int, seed: int):
        self.pool, self.batch, self.rng, self.order, self.at = np.asarray(pool), batch, np.random.default_rng(seed), None, 0

    def next(self) -> np.ndarray:
        if self.order is None or self.at + self.batch > len(self.order):
            self.order, self.at = self.rng.permutation(self.pool), 0
        self.at += self.batch
        return self.order[self.at - self.batch : self.at]


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, pools: list[np.ndarray], batch: int, seed: int):
        self.pools, self.batch, self.seed = pools, batch, seed

    def __iter__(self):
        epochs = [_Epochs(p, self.batch, self.seed + i) for i, p in enumerate(self.pools)]
        step = 0
        while True:
            yield step, [e.next() for e in epochs]
            step += 1


class _CifarPixels(torch.utils.data.Dataset):
    """CIFAR-10 read from its pickles by hand; an item is the raw pixels of one step's three batches."""

    def __init__(self, root: Path):
        batches = []
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(root / "cifar-10-batches-py" / name, "rb") as f:
                batches.append(pickle.load(f, encoding="latin1"))
        self.x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.y = np.concatenate([b["labels"] for b in batches]).astype(np.int64)

    def __getitem__(self, item):
        _, (lab, rot, ex) = item
        return (torch.from_numpy(self.x[lab]), torch.from_numpy(self.y[lab]),
                torch.from_numpy(self.x[rot]), torch.from_numpy(self.x[ex]))

    def __len__(self):
        raise TypeError("infinite")


class _Faces(torch.utils.data.Dataset):
    """CelebA read by hand: attribute table and JPEGs, decoded, resized and flipped image by image."""

    def __init__(self, root: Path, columns: list[str], mean, std):
        import cv2

        self.cv2, self.base = cv2, root / "celeba"
        lines = (self.base / "list_attr_celeba.txt").read_text().split("\n")
        names = lines[1].split()
        rows = [line.split() for line in lines[2:] if line.strip()]
        self.files = [r[0] for r in rows]
        table = (np.array([r[1:] for r in rows], dtype=np.int64) > 0).astype(np.int64)
        self.labels = table[:, [names.index(c) for c in columns]]
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __getitem__(self, item):
        from PIL import Image

        step, (idx,) = item
        rng = np.random.default_rng(step)
        out = []
        for i in idx:
            with Image.open(self.base / "img_align_celeba" / self.files[i]) as img:
                pixels = np.asarray(img.convert("RGB"))
            pixels = self.cv2.resize(pixels, (64, 64), interpolation=self.cv2.INTER_LINEAR)
            if rng.random() < 0.5:
                pixels = pixels[:, ::-1]
            # contiguous CHW, as torchvision's ToTensor and auxframe give: a bare transpose of the HWC
            # array left the batch in NHWC strides, and the whole ResNet then ran in channels_last,
            # 5% faster on this CPU (mkldnn) than the NCHW auxframe side: not equal features
            # (`--param train.channels_last=True` runs both in NHWC: the hand-written loop copies the model)
            out.append(np.ascontiguousarray(((pixels.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)))
        return torch.from_numpy(np.stack(out)), torch.from_numpy(self.labels[idx])

    def __len__(self):
        raise TypeError("infinite")


def _as_is(batch):
    return batch


def _loader(dataset, sampler, workers: int, device: torch.device):
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers, collate_fn=_as_is,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=2 if workers else None))


def _cifar_augment(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The recipe's augmentation, hand-written: reflect-pad 2 and crop 32, flip, noise 0.15 (p = 0.5)."""
    n = x.shape[0]
    x = F.pad(x.permute(0, 3, 1, 2).float().div_(255.0), (2, 2, 2, 2), mode="reflect")
    grid = torch.arange(32, device=x.device)
    rows = (torch.randint(0, 5, (n,), device=x.device)[:, None] + grid)[:, None, :, None].expand(n, 3, 32, 36)
    x = x.gather(2, rows)
    cols = (torch.randint(0, 5, (n,), device=x.device)[:, None] + grid)[:, None, None, :].expand(n, 3, 32, 32)
    x = x.gather(3, cols)
    x = torch.where((torch.rand(n, device=x.device) < 0.5)[:, None, None, None], x.flip(3), x)
    noisy = (torch.rand(n, device=x.device) < 0.5)[:, None, None, None]
    x = torch.where(noisy, (x + 0.15 * torch.randn_like(x)).clamp(0.0, 1.0).mul(255).round().div(255), x)
    return (x - mean) / std


def _exemplar(x: torch.Tensor, views: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written Exemplar views: flip, noise 0.1, one 16x16 Cutout square each."""
    n = x.shape[0]
    v = x.repeat(views, 1, 1, 1)
    m = v.shape[0]
    v = torch.where((torch.rand(m, device=x.device) < 0.5)[:, None, None, None], v.flip(3), v)
    v = v + 0.1 * torch.randn_like(v)
    grid = torch.arange(32, device=x.device)
    top = torch.randint(0, 32, (m,), device=x.device)[:, None] - 8
    left = torch.randint(0, 32, (m,), device=x.device)[:, None] - 8
    square = (((grid >= top) & (grid < top + 16))[:, None, :, None] & ((grid >= left) & (grid < left + 16))[:, None, None, :])
    return v.masked_fill(square, 0.0), torch.arange(n, device=x.device).repeat(views)


class Plain:
    """The hand-written loop of a setting: its own data, the auxframe trainer's model copied at the start."""

    def __init__(self, trainer, args, root: Path):
        self.device = torch.device(args.device)
        self.model = copy.deepcopy(trainer.model).train()
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        workers = trainer.train_stream.num_workers  # the same as auxframe's (default: 'auto')
        if args.setting == "s4l":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=5e-3)  # base/ssl.gin
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=[160_000], gamma=0.2)
            pools = [trainer.split.pool("labeled"), trainer.split.pool("train"), trainer.split.pool("train")]
            self.batches = _loader(_CifarPixels(root), _StepSampler(pools, args.batch, 1), workers, self.device)
            self.mean = torch.tensor([0.4914, 0.4822, 0.4465], device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor([0.2470, 0.2435, 0.2616], device=self.device).view(1, 3, 1, 1)
            self.step = self._s4l_step
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)  # experiments/celeba_1pct.gin
            self.scheduler = None
            self.heads = list(trainer.model.heads.keys())
            faces = _Faces(root, [trainer.tasks[h].labels for h in self.heads],
                           (0.5063, 0.4258, 0.3832), (0.3107, 0.2904, 0.2897))
            self.batches = _loader(faces, _StepSampler([trainer.split.pool("labeled")], args.batch, 1), workers, self.device)
            self.step = self._celeba_step

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _update(self, total: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    def _s4l_step(self) -> float:
        start = time.perf_counter()
        x_lab, y, x_rot, x_ex = (t.to(self.device, non_blocking=True) for t in next(self.batches))
        x_lab, x_rot, x_ex = (_cifar_augment(x, self.mean, self.std) for x in (x_lab, x_rot, x_ex))
        waited = time.perf_counter() - start
        net, heads = self.model.backbone, self.model.heads
        with self._autocast():
            main = F.cross_entropy(heads["label"](net(x_lab)), y)
            rotated = torch.cat([torch.rot90(x_rot, k, dims=(2, 3)) for k in range(4)])
            rot_y = torch.arange(4, device=self.device).repeat_interleave(x_rot.shape[0])
            rotation = F.cross_entropy(heads["rotation"](net(rotated)), rot_y)
            views, ids = _exemplar(x_ex)
            exemplar = triplet(heads["exemplar"](net(views)).float(), ids).mean()
        self._update(main + rotation + exemplar)
        return waited

    def _celeba_step(self) -> float:
        start = time.perf_counter()
        x, y = (t.to(self.device, non_blocking=True) for t in next(self.batches))
        waited = time.perf_counter() - start
        with self._autocast():
            features = self.model.backbone(x)
            total = sum(F.cross_entropy(self.model.heads[h](features), y[:, j]) for j, h in enumerate(self.heads))
        self._update(total)
        return waited

    def block(self, n: int) -> float:
        return sum(self.step() for _ in range(n))


# -- measurement ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def interleaved(sides: dict[str, Callable[[int], float]], args, device, before: dict[str, Callable[[], None]] | None = None):
    """Warm each side up, then blocks of ``args.steps`` steps side after side, the order reversed every round.

    Returns per side the list of (seconds per step, data-wait seconds per step) of its blocks; the
    main process's CPU seconds per step of each block go to ``cpu_times`` (a cross-check that other
    processes on the machine do not move: on the CPU the workers' own time is not in it).
    """
    cpu_times.clear()
    for name, run in sides.items():
        if before and name in before:
            before[name]()
        run(args.warmup)
    _sync(device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    deadline = time.perf_counter() + args.time_limit
    names = list(sides)
    for r in range(args.rounds):
        if r >= 2 and time.perf_counter() > deadline:
            print(f"(time limit of {args.time_limit:g} s reached after {r} rounds)")
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            if before and name in before:
                before[name]()
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            waited = sides[name](args.steps)
            _sync(device)
            times[name].append(((time.perf_counter() - start) / args.steps, waited / args.steps))
            cpu_times.setdefault(name, []).append((time.process_time() - cpu) / args.steps)
    return times


def report(times, images_per_step: int, reference: str | None = None) -> None:
    print(f"\n{'side':28s} {'images/s':>10s} {'IQR':>19s} {'ms/step':>9s} {'data wait':>10s}")
    for name, blocks in times.items():
        rates = [images_per_step / t for t, _ in blocks]
        q1, q3 = quartiles(rates)
        share = statistics.median(w / t for t, w in blocks)
        print(f"{name:28s} {statistics.median(rates):10.1f} {q1:9.1f}-{q3:<9.1f} {1e3 * statistics.median(t for t, _ in blocks):9.1f} "
              f"{100 * share:9.1f}%")
    if reference is None:
        return
    ref = times[reference]
    for name, blocks in times.items():
        if name == reference:
            continue
        pair = [t / r for (t, _), (r, _) in zip(blocks, ref)]
        q1, q3 = quartiles(pair)
        cpu = [t / r for t, r in zip(cpu_times[name], cpu_times[reference])]
        print(f"step time {name} / {reference} = {statistics.median(pair):.3f} (median of {len(pair)} pairs of "
              f"blocks; IQR {q1:.3f}-{q3:.3f}, min-max {min(pair):.3f}-{max(pair):.3f}); main-process CPU time "
              f"{statistics.median(cpu):.3f}")


def section_throughput(args, root: Path, device: torch.device) -> None:
    if args.setting == "quickstart":
        print("throughput: the quickstart's hand-written comparison is bench/framework_tax.py (skipped)")
        return
    weightings = [w for w in args.weightings.split(",") if w]
    trainers = {w: build_auxframe(args, root, w) for w in weightings}
    plain = Plain(trainers.get("equal") or next(iter(trainers.values())), args, root)
    print(f"auxframe: {type(trainers[weightings[0]].model.backbone).__name__}, "
          f"{sum(p.numel() for p in plain.model.parameters()):,} parameters, "
          f"{len(plain.model.heads)} heads, DataLoader workers {trainers[weightings[0]].train_stream.num_workers}")
    sides = {f"auxframe {w}": auxframe_block(t) for w, t in trainers.items()}
    sides["hand-written"] = plain.block
    times = interleaved(sides, args, device)
    report(times, args.batch * SETTINGS[args.setting]["images_per_batch"], reference="hand-written")
    if "equal" in trainers:
        eq = times["auxframe equal"]
        for w in (w for w in weightings if w != "equal"):
            pair = [t / e for (t, _), (e, _) in zip(times[f"auxframe {w}"], eq)]
            q1, q3 = quartiles(pair)
            print(f"step time auxframe {w} / auxframe equal = {statistics.median(pair):.3f} (IQR {q1:.3f}-{q3:.3f})")
        pair = [t / h for (t, _), (h, _) in zip(eq, times["hand-written"])]
        ratio = statistics.median(pair)
        share = statistics.median(w / t for t, w in eq)
        print(f"{'PASS' if ratio <= GOAL_TAX else 'ABOVE GOAL'}: auxframe / hand-written = {ratio:.3f} (goal <= {GOAL_TAX})")
        if device.type == "cuda":
            print(f"{'PASS' if share <= GOAL_DATA else 'ABOVE GOAL'}: auxframe waits for data {100 * share:.1f}% of "
                  f"the step (goal <= {100 * GOAL_DATA:.0f}%)")
    for t in trainers.values():
        t.close_data()


def section_workers(args, root: Path, device: torch.device) -> None:
    counts = [int(w) for w in args.workers_list.split(",")]
    trainers = {n: build_auxframe(args, root, "equal", workers=n) for n in counts}
    times = interleaved({f"auxframe, {n} workers": auxframe_block(t) for n, t in trainers.items()}, args, device)
    report(times, args.batch * SETTINGS[args.setting]["images_per_batch"], reference=f"auxframe, {counts[0]} workers")
    for t in trainers.values():
        t.close_data()


def section_data(args, root: Path, device: torch.device) -> None:
    """The data side of a step alone: the step's batches made, copied and augmented, signals applied."""
    if args.setting != "s4l":
        print("data: the S4L setting compares batched and per-image augmentation (skipped)")
        return
    trainers = {"batched, on the device": build_auxframe(args, root, "equal"),
                "per image (albumentations)": build_auxframe(args, root, "equal",
                                                             extra=["cifar10/Transforms.batched = False"])}
    assert trainers["batched, on the device"].dataset.batched is not None
    assert trainers["per image (albumentations)"].dataset.batched is None

    def draws(trainer):
        def run(n: int) -> float:
            for _ in range(n):
                trainer._next_train_batch()
            return 0.0
        return run

    times = interleaved({k: draws(t) for k, t in trainers.items()}, args, device)
    report(times, args.batch * SETTINGS[args.setting]["images_per_batch"], reference="per image (albumentations)")
    for t in trainers.values():
        t.close_data()


def _tf32(on: bool) -> Callable[[], None]:
    def set_flags():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return set_flags


def section_precision(args, root: Path, device: torch.device) -> None:
    if device.type != "cuda":
        print("precision: GPU only (skipped)")
        return
    if not supports("precision"):
        print("precision: this checkout has no train.precision (issue 12, item 2); skipped")
        return
    trainers = {"fp32, TF32 off": build_auxframe(args, root, "equal", precision="fp32", tf32=False),
                "fp32, TF32 on": build_auxframe(args, root, "equal", precision="fp32", tf32=True),
                "bf16": build_auxframe(args, root, "equal", precision="bf16", tf32=True)}
    flags = {"fp32, TF32 off": _tf32(False), "fp32, TF32 on": _tf32(True), "bf16": _tf32(True)}
    times = interleaved({k: auxframe_block(t) for k, t in trainers.items()}, args, device, before=flags)
    report(times, args.batch * SETTINGS[args.setting]["images_per_batch"], reference="fp32, TF32 off")
    pair = [r / b for (b, _), (r, _) in zip(times["bf16"], times["fp32, TF32 off"])]
    speedup = statistics.median(pair)
    print(f"{'PASS' if speedup >= GOAL_BF16 else 'BELOW GOAL'}: bf16 images/s / fp32 without TF32 = {speedup:.2f} "
          f"(goal >= {GOAL_BF16})")
    for t in trainers.values():
        t.close_data()


def section_memory(args, root: Path, device: torch.device) -> None:
    if device.type != "cuda":
        print("memory: GPU only (skipped)")
        return
    peaks = {}
    for w in [w for w in args.memory_weightings.split(",") if w]:
        trainer = build_auxframe(args, root, w)
        run = auxframe_block(trainer)
        run(2)
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(args.memory_steps)  # 20: one update of the every-20 weightings (ARML, AuxiLearn)
        _sync(device)
        peaks[w] = (torch.cuda.max_memory_allocated(device), base)
        trainer.close_data()
        del trainer, run
        gc.collect()
        torch.cuda.empty_cache()
    equal = peaks.get("equal", next(iter(peaks.values())))[0]
    k = {"s4l": 2, "celeba": 39, "quickstart": 3}[args.setting]
    print(f"\npeak GPU memory over {args.memory_steps} steps, K = {k} auxiliary tasks, batch {args.batch}:")
    for w, (peak, base) in peaks.items():
        print(f"  {w:12s} {peak / 2**20:9.0f} MiB  ({peak / equal:.2f} x Equal; {base / 2**20:.0f} MiB before the steps)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="s4l")
    p.add_argument("--sections", default="throughput", help="throughput,data,workers,precision,memory")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="train.precision of both sides (needs train.precision in this checkout unless fp32)")
    p.add_argument("--tf32", choices=["on", "off"], default="on", help="TF32 matrix products and convolutions on a GPU")
    p.add_argument("--batch", type=int, default=None, help="labelled batch (S4L: 128, CelebA: 64; smaller on a CPU)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block (default 20: one update of ARML/AuxiLearn)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per side first (default 20)")
    p.add_argument("--time-limit", type=float, default=240.0, help="stop a section's rounds after this many seconds")
    p.add_argument("--workers", default="auto", help="train.num_workers of both sides (default auto)")
    p.add_argument("--workers-list", default="0,1,2", help="workers section: the worker counts compared")
    p.add_argument("--weightings", default=None, help="throughput section (default: S4L equal,arml,auxilearn; CelebA equal)")
    p.add_argument("--memory-weightings", default="equal,arml,auxilearn,gradnorm,pcgrad,gcs,ol_aux,uncertainty,dwa,adaloss")
    p.add_argument("--memory-steps", type=int, default=20)
    p.add_argument("--celeba-images", type=int, default=4_096, help="JPEGs in the CelebA fixture (default 4,096)")
    p.add_argument("--cache", default=None, help="fixture folder (default ~/.cache/auxframe-bench)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--param", action="append", default=[],
                   help="a gin binding for auxframe's side, e.g. \"train.backbone = @backbones.small_cnn\" "
                        "(the hand-written loop copies auxframe's model, so it follows)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.precision != "fp32" and not supports("precision"):
        p.error(f"--precision {args.precision} needs train.precision (issue 12, item 2), which this checkout lacks")
    args.batch = args.batch or SETTINGS[args.setting]["batch"]
    args.weightings = args.weightings or SETTINGS[args.setting]["weightings"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        _tf32(args.tf32 == "on")()
    root = fixture(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"real-size throughput, setting {args.setting}: torch {torch.__version__}, device {device} ({name}), "
          f"{os.cpu_count()} cpus, {torch.get_num_threads()} threads, precision {args.precision}, TF32 {args.tf32}, "
          f"labelled batch {args.batch} ({args.batch * SETTINGS[args.setting]['images_per_batch']} images a step), "
          f"blocks of {args.steps} steps x {args.rounds} rounds after {args.warmup} warm-up steps")
    for section in args.sections.split(","):
        print(f"\n== {section} ==", flush=True)
        {"throughput": section_throughput, "workers": section_workers, "precision": section_precision,
         "memory": section_memory, "data": section_data}[section](args, root, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning data: captions -> checked pairs -> split by image -> batches decoded in worker processes."""

from __future__ import annotations

import hashlib
import random
import signal
from dataclasses import dataclass, field

from ..captions import Pair, read_captions
from ..config import MAX_PIXELS
from ..errors import DataError, DecodeError, UsageError
from ..images import decode_many, open_image
from ..metrics import Gallery, build_gallery


@dataclass
class PreparedData:
    """What training runs on, plus everything that was left out and why (for the report)."""

    source: str
    train: list[Pair]
    val: list[Pair]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    val_source: str | None = None

    def counts(self) -> dict:
        return {
            "train_pairs": len(self.train), "train_images": len({p.path for p in self.train}),
            "val_pairs": len(self.val), "val_images": len({p.path for p in self.val}),
            "skipped": len(self.skipped),
        }

    def fingerprint(self) -> str:
        """Identity of the split, so --resume can refuse data that changed under it."""
        h = hashlib.blake2b(digest_size=12)
        for name, pairs in (("train", self.train), ("val", self.val)):
            h.update(name.encode())
            for p in pairs:
                h.update(f"{p.path}\0{p.caption}\n".encode())
        return h.hexdigest()


def check_images(paths: list[str], draft_size: int, max_pixels: int, workers: int,
                 progress=None) -> dict[str, str]:
    """Decode every image once before training (a corrupt file stops nothing an hour in); {path: reason} of bad ones."""
    bad: dict[str, str] = {}
    if progress:  # the bar starts with the work: its rate then counts the first images too
        progress(0, len(paths))
    results = decode_many(paths, lambda path: open_image(path, draft_size=draft_size, max_pixels=max_pixels), workers)
    for n, (path, result) in enumerate(zip(paths, results), start=1):
        if isinstance(result, DecodeError):
            bad[path] = str(result)
        if progress:
            progress(n, len(paths))
    return bad


def split_by_image(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out a random ``val_fraction`` of the images (with all their captions); no image is in both."""
    images = sorted({p.path for p in pairs})
    random.Random(seed).shuffle(images)
    val_images = set(images[:max(2, round(val_fraction * len(images)))])
    return [p for p in pairs if p.path not in val_images], [p for p in pairs if p.path in val_images]


def prepare(source, *, val_source=None, image_col: str = "path", caption_col: str = "caption",
            val_fraction: float = 0.1, seed: int = 0, batch_size: int = 32, draft_size: int = 448,
            max_pixels: int = MAX_PIXELS, workers: int = 2, progress=None) -> PreparedData:
    """Read, check and split the captions; raise DataError before any training when they cannot work."""
    if val_source is None and not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    main = read_captions(source, image_col=image_col, caption_col=caption_col)
    skipped = list(main.problems)
    val_set = read_captions(val_source, image_col=image_col, caption_col=caption_col) if val_source is not None else None
    if val_set is not None:
        skipped += [(w, f"validation: {r}") for w, r in val_set.problems]
    all_paths = sorted({p.path for p in main.pairs} | ({p.path for p in val_set.pairs} if val_set else set()))
    bad = check_images(all_paths, draft_size, max_pixels, workers, progress)

    def keep(pairs, why_not):
        """The pairs ``why_not(path)`` finds nothing against; the others are listed in ``skipped``."""
        kept = []
        for p in pairs:
            why = why_not(p.path)
            if why:
                skipped.append((f"{main.source}:{p.line}" if p.line else p.path, why))
            else:
                kept.append(p)
        return kept

    pairs = keep(main.pairs, lambda path: path in bad and f"unreadable image {path}: {bad[path]}")
    if not pairs:
        detail = "; ".join(f"{w}: {r}" for w, r in skipped[:3])
        raise DataError(f"no usable image–caption pairs in {source}" + (f" ({detail})" if detail else "")
                        + "; check the paths (relative paths resolve against the captions file's folder) "
                          "and the column names")
    if val_set is not None:
        val = keep(val_set.pairs, lambda path: path in bad and f"validation: unreadable image {path}: {bad[path]}")
        val_images = {p.path for p in val}
        train = keep(pairs, lambda path: path in val_images and "image is also in the validation set; kept out of "
                                                                "training")
    else:
        n_images = len({p.path for p in pairs})
        if n_images < 4:
            raise DataError(f"only {n_images} usable images in {source}: too few to hold out a validation split; "
                            "add images or give a separate --val captions file")
        train, val = split_by_image(pairs, val_fraction, seed)
    if len({p.path for p in val}) < 2:
        raise DataError(f"the validation set has {len({p.path for p in val})} usable image(s); retrieval needs at "
                        "least 2 (raise --val-fraction or add images to --val)")
    if len(train) < 2:
        raise DataError(f"only {len(train)} usable training pair(s); contrastive training needs at least 2")
    if len({p.caption for p in train}) < 2:  # pairs sharing a caption are not negatives: nothing would be learnt
        raise DataError(f"all {len(train)} training pairs have the same caption ({train[0].caption!r}); training "
                        "learns by telling captions apart: give the images captions that say how they differ")
    if len(train) < batch_size:
        raise DataError(f"{len(train)} training pairs cannot fill one batch of {batch_size} "
                        "(--batch-size x --grad-accum); lower --batch-size to at most "
                        f"{max(2, len(train))} in all, or add captions")
    return PreparedData(str(main.source), train, val, skipped, str(val_set.source) if val_set else None)


class PairDataset:
    """Pairs as model inputs: (image tensor, caption tokens, image id, caption id). Items are requested as
    (pair index, augmentation seed), so random crops depend only on the step, not on which worker decodes
    them: a resumed run sees exactly the same inputs."""

    def __init__(self, pairs: list[Pair], transform, tokenizer, draft_size: int, max_pixels: int = MAX_PIXELS):
        import torch

        self.gallery: Gallery = build_gallery(pairs)
        self.transform, self.draft_size, self.max_pixels = transform, draft_size, max_pixels
        tokens = [tokenizer(self.gallery.texts[i:i + 1024]) for i in range(0, len(self.gallery.texts), 1024)]
        self.tokens = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long)
        self.index = torch.tensor(self.gallery.pair_index, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.gallery.pair_index)

    def __getitem__(self, item):
        import torch

        idx, aug_seed = item
        img_id, txt_id = (int(x) for x in self.index[idx])
        path = self.gallery.images[img_id]
        try:
            im, _ = open_image(path, draft_size=self.draft_size, max_pixels=self.max_pixels)
        except DecodeError as e:  # moved or changed since check_images passed it
            raise DecodeError(f"{path}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            x = self.transform(im)
        return x, self.tokens[txt_id], img_id, txt_id


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled pair order of one epoch: a pure function of (seed, epoch)."""
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class StepBatches:
    """Micro-batches for optimizer steps [start, total): epoch e uses epoch_order(seed, e), drop_last.
    One step is ``accum`` micro-batches of ``batch_size`` pairs; an epoch is as many whole steps as fit."""

    def __init__(self, n: int, batch_size: int, accum: int, seed: int, start: int, total: int):
        self.n, self.batch_size, self.accum, self.seed = n, batch_size, accum, seed
        self.start, self.total = start, total
        self.steps_per_epoch = max(1, n // (batch_size * accum))

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.accum

    def __iter__(self):
        per_step = self.batch_size * self.accum
        order, order_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            base = pos * per_step
            for m in range(self.accum):
                lo = base + m * self.batch_size
                # Seeded by (step, slot): independent of workers and of how a step is cut into micro-batches.
                yield [(order[lo + j], (self.seed * 1_000_003 + step * per_step + m * self.batch_size + j)
                        % (2 ** 63)) for j in range(self.batch_size)]


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; only the training process decides what to do with it
    # (finish the step, save a checkpoint), so the decode workers must keep serving batches meanwhile.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, batch_sampler, workers: int, pin_memory: bool = False):
    """A DataLoader that decodes in ``workers`` processes and keeps a few batches ready ahead."""
    from torch.utils.data import DataLoader

    kwargs = {"prefetch_factor": 4, "persistent_workers": False, "worker_init_fn": _ignore_sigint}
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                      **(kwargs if workers > 0 else {}))


def decode_for_eval(paths: list[str], preprocess, draft_size: int, workers: int, batch_size: int = 64,
                    max_pixels: int = MAX_PIXELS, overlap: bool = True):
    """Yield [B,3,H,W] batches in order, decoded by images.decode_many (the indexer's decode path).
    ``overlap`` True: the next batch decodes while the caller encodes this one (at most two batches in
    memory); False: decoding and the caller's encoding take turns (config.thread_budget's CPU policy).
    Raises DecodeError for an image that stopped being readable since check_images passed it."""
    import torch

    def load(path):
        im, _ = open_image(path, draft_size=draft_size, max_pixels=max_pixels)
        return preprocess(im)

    batch = []
    for path, t in zip(paths, decode_many(paths, load, workers, 2 * batch_size if overlap else batch_size, overlap)):
        if isinstance(t, DecodeError):
            raise DecodeError(f"{path}: {t}")
        batch.append(t)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)

"""Reading cached teacher targets during distillation (the torch side of
:mod:`resdistill.teacher_targets`; see its docstring for the layout and for which augmentations
are allowed with cached targets and why).

* :class:`GeometricAugment` - one draw of flips / 90-degree rotation for the student tile and the
  stored feature map together (no colour jitter).
* :class:`CachedTargetStream` - a :class:`resdistill.data.TileStream` of the student tile whose
  samples carry the teacher's stored logits and pooled feature map for their key.
* :func:`make_cached_loader` - the rank's loader, same shard plan and equal steps as
  :func:`resdistill.data.make_loader`; batch ``images`` = ``(x_s, t_logits, t_features)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from resdistill import data as D
from resdistill.teacher_targets import StaleTargetsError, TargetsIndex


class GeometricAugment:
    """One random element of the dihedral group D4 applied to every tensor of a sample:
    horizontal flip (p=0.5), vertical flip (p=0.5), then ``rot90`` by ``k`` uniform in {0..3}, on
    the last two dims. Inputs of any channel count and square size (a uint8 tile and a
    ``(C, h, w)`` feature map alike); the same draw for all. No colour change: the teacher's
    stored outputs belong to the un-jittered tile.

    Exactness: ``adaptive_max_pool2d`` to a square size commutes with every D4 element, so
    ``g(pool(f_t)) == pool(g(f_t))`` bit for bit; the stored map, transformed, is the teacher's
    un-augmented map pooled after the same flip/rotation the student tile got.
    """

    def __init__(self, flips: bool = True) -> None:
        self.flips = flips

    def draw(self) -> tuple[bool, bool, int]:
        """``(hflip, vflip, k)`` from torch's RNG (seeded per loader worker)."""
        if not self.flips:
            return False, False, 0
        u = torch.rand(2).tolist()
        return u[0] < 0.5, u[1] < 0.5, int(torch.randint(0, 4, ()).item())

    @staticmethod
    def apply(x: torch.Tensor, hflip: bool, vflip: bool, k: int) -> torch.Tensor:
        """``rot90(vflip(hflip(x)), k)`` on dims (-2, -1)."""
        if hflip:
            x = torch.flip(x, dims=(-1,))
        if vflip:
            x = torch.flip(x, dims=(-2,))
        if k:
            x = torch.rot90(x, k, dims=(-2, -1))
        return x

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = self.draw()
        return tuple(self.apply(t, *params) for t in tensors)

    def __repr__(self) -> str:
        return f"GeometricAugment(flips={self.flips})"


class CachedTargetStream(D.TileStream):
    """A ``TileStream`` of the student tile whose samples carry the stored teacher outputs.

    Yields ``((x_s, t_logits, t_features), label, key)``: ``x_s`` the normalised student tile
    ``(3, H, W)``, ``t_logits`` ``(K,)`` and ``t_features`` ``(C, h, w)`` float32 from the
    targets of the sample's key; ``augment`` (a :class:`GeometricAugment`) transforms ``x_s``
    (before normalisation, as uint8) and ``t_features`` with one draw. A key without targets
    raises :class:`StaleTargetsError`. Each shard's ``.npz`` is read once per pass.
    """

    def __init__(self, *args: Any, targets: TargetsIndex, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(self.mags) != 1:
            raise ValueError(
                "a cached-target stream reads exactly one (the student's) magnification"
            )
        self.targets = targets
        self.student_mag = self.mags[0]
        self._feat = f"feat_{self.student_mag}"

    def _raw_samples(self, tasks: Sequence[D.ShardTask], rng: Any) -> Iterator[dict]:
        from sharding.storage import open_storage

        store = open_storage(self.info.url)
        by_url = {store.child_url(t.rel): t.rel for t in tasks}
        current: tuple[str, dict[str, int], dict[str, Any]] | None = None
        for sample in super()._raw_samples(tasks, rng):
            rel = by_url[sample["__url__"]]
            if current is None or current[0] != rel:
                arrays = self.targets.read_shard(rel)
                if self._feat not in arrays:
                    raise StaleTargetsError(
                        f"{self.targets.url}: {rel} holds no {self._feat} feature maps"
                    )
                index = {str(k): i for i, k in enumerate(arrays["keys"])}
                current = (rel, index, arrays)
            i = current[1].get(sample["__key__"])
            if i is None:
                raise StaleTargetsError(
                    f"{self.targets.url}: no targets for sample {sample['__key__']} of {rel}"
                )
            sample["__tlogits__"] = current[2]["logits"][i]
            sample["__tfeat__"] = current[2][self._feat][i]
            yield sample

    def _decode(self, sample: Mapping[str, Any]) -> tuple[tuple[torch.Tensor, ...], int, str]:
        aug, self.augment = self.augment, None  # the base class must not augment on its own
        try:
            (img,), label, key = super()._decode(sample)
        finally:
            self.augment = aug
        logits = torch.from_numpy(sample["__tlogits__"].astype("float32"))
        feat = torch.from_numpy(sample["__tfeat__"].astype("float32"))
        if aug is not None:
            # flips/rotations commute with the per-channel normalisation, so transforming the
            # normalised tile equals normalising the transformed one
            img, feat = aug(img, feat)
        return (img.contiguous(), logits, feat.contiguous()), label, key


def make_cached_loader(
    info: D.DatasetInfo,
    splits: Sequence[str],
    student_mag: str,
    targets: TargetsIndex,
    *,
    batch_size: int,
    train: bool = True,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    augment: GeometricAugment | None = None,
    seed: int = 0,
    epoch: int = 0,
    steps: int | None = None,
    pin_memory: bool = False,
    manifest: Any = None,
) -> D.StreamLoader:
    """Like :func:`resdistill.data.make_loader` for one rank (same shard plan, equal steps,
    same seeds), with batches whose ``images`` are ``(x_s (N,3,H,W), t_logits (N,K),
    t_features (N,C,h,w))``. Distillation uses every sample, so no label filtering."""
    if manifest is None:
        manifest = D.read_manifest(info.url)
    keys = D.shard_keys(manifest, splits)
    total = sum(len(v) for v in keys.values())
    plans = D.plan_all_ranks(keys, world_size)
    if train:
        if any(not p for p in plans):
            raise ValueError(
                f"{info.url}: split(s) {', '.join(splits)} hold {total} samples, too few to give "
                f"each of {world_size} ranks at least one: lower --workers"
            )
        if steps is None:
            steps = D.steps_per_epoch(total, world_size, batch_size)
    else:
        steps, augment, shuffle_buffer = None, None, 0
    tasks = plans[rank]
    stream = CachedTargetStream(
        info,
        tasks,
        [student_mag],
        targets=targets,
        repeat=train,
        shuffle_buffer=shuffle_buffer,
        augment=augment,
        seed=D.hash_seed(seed, rank, epoch),
    )
    return D.StreamLoader(
        stream,
        batch_size=batch_size,
        steps=steps,
        num_workers=max(0, min(num_workers, len(tasks))),
        pin_memory=pin_memory,
    )

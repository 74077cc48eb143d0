"""
The datasets and how batches reach the model: torchvision's MNIST and Fashion-MNIST (and Greydanus' MNIST-1D,
generated offline), each split held on the device as one uint8 tensor (DeviceSplit: shuffling, batching and
normalizing happen there, so the hot loop never touches PIL or a DataLoader), and the random affine warp that
augments a batch on its device.

To add a dataset: a class with torchvision's signature and .data / .targets / .classes, and a DATASETS entry.
"""

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset
from torchvision import datasets

from cli import UsageError


@functools.cache
def mnist1d_arrays():
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise UsageError("--dataset mnist1d needs the mnist1d package: pip install mnist1d") from None
    return make_dataset(get_dataset_args())  # its get_dataset would try a download first


class MNIST1D(torch.utils.data.Dataset):
    """Greydanus' MNIST-1D: 10 classes of 1-D signals of 40 steps, 4,000 train / 1,000 test, generated offline by
    the mnist1d package with its default arguments (seed 42: the same set everywhere) and already standardized.
    Items are (1, 1, 40) "images" of one row, so the sequential models read them one value per step. The
    torchvision signature, so that it plugs in beside MNIST."""

    classes = [str(d) for d in range(10)]

    def __init__(self, root=None, train=True, transform=None, download=False):
        d = mnist1d_arrays()
        x, y = (d["x"], d["y"]) if train else (d["x_test"], d["y_test"])
        self.data = torch.tensor(x, dtype=torch.float32)[:, None, :]  # (N, 1, 40)
        self.targets = torch.as_tensor(y)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i][None], int(self.targets[i])  # (1, 1, 40), label


# name -> (dataset class with torchvision's signature, mean, std of its training values (pixels in [0, 1]))
DATASETS = {
    "mnist": (datasets.MNIST, 0.1307, 0.3081),
    "fashion-mnist": (datasets.FashionMNIST, 0.2860, 0.3530),
    "mnist1d": (MNIST1D, 0.0, 1.0),
}


SEQUENCE_DATASETS = {"mnist1d"}  # 1-D: for the sequential tasks only


def load_datasets(name, data_dir, transform):
    cls = DATASETS[name][0]
    try:
        return (cls(data_dir, train=True, transform=transform, download=True),
                cls(data_dir, train=False, transform=transform, download=True))
    except (RuntimeError, OSError) as e:  # torchvision's "Error downloading ..." when offline
        raw = os.path.join(data_dir, cls.__name__, "raw")
        files = ", ".join(f for f, _ in cls.resources)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name} is not in {data_dir!r} and downloading it failed ({reason}): put {files} "
                         f"(or the same files unpacked) in {raw}{os.sep} (torchvision's layout), or run once "
                         f"with internet access") from None


class DeviceSplit:
    """A loader's images as one uint8 tensor on the device; batches are slices of it, normalized on the fly.
    Under torchrun a rank visits the images its loader's sampler would give it (see get_mnist_dataloaders)."""

    def __init__(self, loader, device, mean, std):
        ds, sampler = loader.dataset, loader.sampler
        if isinstance(ds, Subset):
            idx = torch.as_tensor(ds.indices)
            images, labels = ds.dataset.data[idx], torch.as_tensor(ds.dataset.targets)[idx]
        else:
            images, labels = ds.data, ds.targets
        if isinstance(sampler, range):  # this rank's slice of an evaluation split
            images, labels = images[sampler.start:sampler.stop], labels[sampler.start:sampler.stop]
        self.device = device
        self.images = images.unsqueeze(1).to(device)  # (N, 1, H, W) uint8 (47 MB for all of MNIST), or float
        self.labels = torch.as_tensor(labels).to(device)  # (N,)
        self.batch_size, self.mean, self.std = loader.batch_size, mean, std
        # training under torchrun: every rank draws the same permutation and takes every world_size-th image
        # from its rank on, as DistributedSampler deals them
        distributed = isinstance(sampler, DistributedSampler)
        self.rank, self.world_size = (sampler.rank, sampler.num_replicas) if distributed else (0, 1)
        self.num_samples = len(sampler)  # the images this process visits
        self.num_batches = math.ceil(self.num_samples / self.batch_size)

    def batches(self, generator=None, start=0):
        """Iterator over (x, y) from batch `start` on, shuffled by `generator` (drawn now) if given."""
        order = None
        if generator is not None:
            order = torch.randperm(len(self.labels), generator=generator, device=self.device)
            order = order[self.rank:self.num_samples * self.world_size:self.world_size]  # this rank's share
        return self._iterate(order, start)

    def _iterate(self, order, start):
        for i in range(start * self.batch_size, self.num_samples, self.batch_size):
            idx = slice(i, i + self.batch_size) if order is None else order[i:i + self.batch_size]
            x = self.images[idx].to(torch.float32, copy=True)  # a copy (a slice would be a view): edited in place
            if self.images.dtype == torch.uint8:
                x.div_(255)  # as ToTensor
            x.sub_(self.mean).div_(self.std)  # as Normalize
            yield x, self.labels[idx]


def random_affine(x, generator, *, translate, rotate, scale, fill):
    """Randomly shift (pixels), rotate (degrees) and zoom (fraction) each image of a batch, on its device."""
    # x : (B, C, H, W) normalized; fill: the normalized value of a black pixel
    B, _, H, W = x.shape
    u = torch.rand(B, 4, generator=generator, device=x.device) * 2 - 1  # (B, 4) uniform in [-1, 1)
    angle = u[:, 0] * math.radians(rotate)
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = u[:, 2] * (2 * translate / W), u[:, 3] * (2 * translate / H)  # pixels -> grid units ([-1, 1] spans W)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with zeros: shift so the padding is black, not the mean grey
    return F.grid_sample(x - fill, grid, align_corners=False) + fill


"""Helpers shared by the library tests: a closed-form Gaussian denoiser, a CIFAR-style archive."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import torch


class GaussianOracle(torch.nn.Module):
    """The optimal network for data x_0 ~ N(mu, s^2) per pixel, under the ORIGINAL schedule ``abar``.

    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t), and the x_0 and v
    targets that go with it; for ``prediction="edm"`` EDM's F for ``sigma_data``, from the input
    c_in x_t / sqrt(abar_t) that :meth:`ddpm.Diffusion.model_output` gives it. With ``var_value`` set it
    also outputs C learned-range channels. Records the timesteps it is called with.
    """

    def __init__(self, alphas_cumprod, mu=0.3, s=0.5, prediction="eps", var_value=None, sigma_data=0.5):
        super().__init__()
        self.abar, self.mu, self.s, self.prediction, self.var_value = alphas_cumprod, mu, s, prediction, var_value
        self.sigma_data = sigma_data
        self.calls: list[list[int]] = []

    def forward(self, x_t, t):
        self.calls.append(t.tolist())
        a = self.abar.to(x_t)[t].view(-1, *([1] * (x_t.dim() - 1)))
        sigma2, sd2 = (1 - a) / a, self.sigma_data**2  # EDM's sigma_t^2 in the VP process
        if self.prediction == "edm":
            x_t = x_t * (a * (sigma2 + sd2)).sqrt()  # undo c_in / sqrt(abar_t)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        if self.prediction == "edm":  # F = (x_0 - c_skip x_t / sqrt(abar_t)) / c_out
            out = (x0 - sd2 / (sigma2 + sd2) * x_t / a.sqrt()) / (sigma2.sqrt() * self.sigma_data / (sigma2 + sd2).sqrt())
        else:
            out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        if self.var_value is not None:
            out = torch.cat([out, torch.full_like(out, self.var_value)], dim=1)
        return out


def gaussian_ms_eps(alphas_cumprod, s):
    """Gamma_t = E ||eps*(x_t, t)||^2 / d for data N(mu, s^2): (1 - abar_t) / (abar_t s^2 + 1 - abar_t), float64 [T].

    eps* = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a) and Var[x_t] = a s^2 + 1 - a (any mu).
    """
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return (1 - a) / (a * s**2 + 1 - a)


class ProbeNoise:
    """A stand-in :class:`ddpm.noise.NoiseSource` whose k-th draw (x_T is draw 0) is the indicator of
    column k + 1 of a float64 ``[1 x cols x 1 x 1]`` tensor; column 0 never gets any."""

    def __init__(self, cols):
        self.cols, self.draws = cols, 0

    def next(self):
        self.draws += 1
        if self.draws >= self.cols:
            raise RuntimeError(f"more than {self.cols - 1} draws: give exact_moments more cols")
        z = torch.zeros(1, self.cols, 1, 1, dtype=torch.float64)
        z[0, self.draws] = 1.0
        return z


def exact_moments(sampler, oracle, cols=256):
    """(mean, std) of ``sampler``'s samples with the Gaussian ``oracle``, exactly (no clipping).

    Every step is affine in x and the step's noise, so one output pixel is B + A x_T + sum_k c_k z_k
    with independent standard normals: run the sampler's own steps once on probe columns (column 0:
    all draws zero, gives B; column k: draw k - 1 one, gives B + its coefficient), so that
    mean = B and std = sqrt(A^2 + sum_k c_k^2).
    """
    noise = ProbeNoise(cols)
    x = noise.next()
    with torch.no_grad():
        for i in range(len(sampler.timesteps)):
            x, _ = sampler.step(oracle, x, i, noise, False)
    x = x.flatten()[:noise.draws + 1]
    return x[0].item(), (x[1:] - x[0]).pow(2).sum().sqrt().item()


class ClassGaussianOracle(GaussianOracle):
    """A class-conditional optimal network: class c's data is N(mus[c], s^2) per pixel, and the null
    class (label K = len(mus)) is N(mean(mus), s^2) (a Gaussian stand-in for the classes' mixture).

    ``forward(x_t, t, y=None)``; ``y`` None is the null class. eps* is affine in mu, so guidance with
    weight w gives exactly the oracle of N(mu_null + w (mus[c] - mu_null), s^2). ``calls`` records
    the timesteps of each call (so its length is the rows of that call).
    """

    def __init__(self, alphas_cumprod, mus, s=0.5, prediction="eps", var_value=None):
        super().__init__(alphas_cumprod, 0.0, s, prediction, var_value)
        self.num_classes = len(mus)
        self.mus = torch.tensor([*mus, sum(mus) / len(mus)], dtype=torch.float64)  # the last: the null class

    def forward(self, x_t, t, y=None):
        if y is None:
            y = torch.full((x_t.shape[0],), self.num_classes)
        self.mu = self.mus.to(x_t)[y.to(x_t.device)].view(-1, *([1] * (x_t.dim() - 1)))
        return super().forward(x_t, t)


def make_cifar_archive(path, n_per_batch=4, seed=0):
    """A tiny archive in the CIFAR-10 python format (protocol-2 pickles of b"data" and b"labels")."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, n_per_batch).tolist()
            batches[name] = (data, labels)
            raw = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


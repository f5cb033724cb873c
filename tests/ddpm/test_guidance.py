"""Class-conditional models and classifier-free guidance: config, network, training labels, the guided
network (exact outputs and forward passes), a per-class Gaussian oracle, the pipeline, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddpm.checkpoint import export_weights, import_weights
from ddpm.config import ConfigError, ExperimentConfig, UNetConfig
from ddpm.diffusion import Diffusion
from ddpm.guidance import (ClassifierFreeGuidance, balanced_labels, check_class_labels, drop_labels,
                           training_batch)
from ddpm.pipeline import DDPMPipeline
from ddpm.schedules import make_betas
from ddpm.unet import UNet
from tests.ddpm.helpers import ClassGaussianOracle

K = 3  # classes of the small models here; label K is the null class
TINY = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.0, num_classes=K)


def tiny_unet(num_classes: int = K, seed: int = 0) -> UNet:
    """A small UNet with every weight random (the paper's init zeroes the output layer)."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**TINY.__dict__, "num_classes": num_classes})).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(make_betas("linear", 1000), variance="fixed_large")


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_are_unconditional_and_new_keys_round_trip():
    cfg = ExperimentConfig.preset("digits")
    assert (cfg.model.num_classes, cfg.train.label_dropout, cfg.sample.guidance) == (0, 0.1, 1.0)
    cond = cfg.with_values({"model.num_classes": 10, "train.label_dropout": 0.2, "sample.guidance": 2.5})
    assert ExperimentConfig.from_dict(json.loads(cond.to_json())) == cond
    old = cfg.to_dict()  # a config written before these keys existed still loads, unconditional
    del old["model"]["num_classes"], old["train"]["label_dropout"], old["sample"]["guidance"]
    assert ExperimentConfig.from_dict(old) == cfg


@pytest.mark.parametrize("changes, match", [
    ({"model.num_classes": -1}, r"model.num_classes must be >= 0 \(0: unconditional"),
    ({"model.num_classes": 10, "train.label_dropout": 1.0}, r"train.label_dropout must be in \[0, 1\)"),
    ({"model.num_classes": 10, "train.label_dropout": -0.1}, r"train.label_dropout must be in \[0, 1\)"),
    ({"model.num_classes": 10, "sample.guidance": -1.0}, r"sample.guidance must be in \[0, inf\)"),
    ({"sample.guidance": 2.0}, r"sample.guidance=2.0 needs a class-conditional model"),
])
def test_config_refuses_bad_values_naming_the_valid_ones(changes, match):
    with pytest.raises(ConfigError, match=match):
        ExperimentConfig.preset("digits").with_values(changes)


# -- the network --------------------------------------------------------------------------------


def test_unconditional_state_dict_is_unchanged_and_conditional_adds_one_embedding():
    plain, cond = UNet(UNetConfig.digits()), UNet(UNetConfig(**{**UNetConfig.digits().__dict__, "num_classes": 10}))
    extra = set(cond.state_dict()) - set(plain.state_dict())
    assert extra == {"class_embed.weight"} and set(plain.state_dict()) < set(cond.state_dict())
    assert cond.class_embed.weight.shape == (11, 4 * 32)  # 10 classes + the null class
    assert not any("class" in k for k in plain.state_dict())


def test_labels_condition_the_output_and_none_is_the_null_class():
    net = tiny_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 500, 999, 10])
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        null = net(x, t, torch.full((4,), K))
        torch.testing.assert_close(net(x, t), null, rtol=0, atol=0)
        out = net(x, t, y)
        assert ((out - null).flatten(1).abs().amax(1) > 1e-3).all()
        torch.testing.assert_close(net(x[:2], t[:2], y[:2]), out[:2], rtol=0, atol=1e-6)  # per row


def test_the_network_refuses_labels_it_cannot_take():
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"unconditional model \(model.num_classes=0\)"):
        tiny_unet(num_classes=0)(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class labels y of shape \(2,\)"):
        tiny_unet()(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        tiny_unet()(x, t, torch.tensor([0.0, 1.0]))


# -- training labels ----------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Returns zeros; records the extra arguments of every call."""

    def __init__(self):
        super().__init__()
        self.extra: list[tuple] = []

    def forward(self, x, t, *extra):
        self.extra.append(extra)
        return torch.zeros_like(x)


def test_training_loss_passes_labels_and_keeps_the_plain_call_without(diffusion):
    rec, x = Recorder(), torch.randn(3, 1, 2, 2)
    diffusion.training_loss(rec, x)
    labels = torch.tensor([2, 0, K])
    diffusion.training_loss(rec, x, labels=labels)
    assert rec.extra[0] == () and len(rec.extra[1]) == 1 and torch.equal(rec.extra[1][0], labels)


def test_drop_labels_is_a_seeded_bernoulli_share():
    n, p = 20_000, 0.1
    y = torch.arange(n) % K
    out = drop_labels(y, K, p, torch.Generator().manual_seed(7))
    expected = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(7)) < p, K, y)
    assert torch.equal(out, expected)
    share = (out == K).double().mean().item()
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(out[out != K], y[out != K])  # the rest keep their class
    # dropout 0 keeps every label, and draws all the same (the stream after it does not depend on p)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(drop_labels(y, K, 0.0, g), y)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(n + 3, generator=torch.Generator().manual_seed(7))[n:])


@pytest.mark.parametrize("labels, num_classes, match", [
    ([0, -1], 10, r"must lie in \[0, 10\).*-1: an image with no label"),
    ([0, 10], 10, r"must lie in \[0, 10\) \(the model's 10 classes\), got \[10\]"),
    ([0, 1], 0, r"unconditional model \(model.num_classes=0\)"),
    ([[0, 1]], 10, "1-D sequence of integers"),
    ([0.5], 10, "1-D sequence of integers"),
])
def test_training_labels_outside_the_classes_are_refused(labels, num_classes, match):
    with pytest.raises(ValueError, match=match):
        drop_labels(torch.tensor(labels), num_classes, 0.1)


def test_training_batch_unpacks_labels_only_for_a_conditional_model():
    x = torch.randn(4, 1, 2, 2)
    assert training_batch(x, 0, 0.1) == (x, None)
    x2, labels = training_batch((x, torch.tensor([0, 1, 2, 0])), K, 0.0)
    assert x2 is x and labels.tolist() == [0, 1, 2, 0]


def test_a_tiny_conditional_unet_learns_labelled_data(diffusion):
    """Class c is an image of constant value (c - 1) * 0.8 plus a little noise. Predicting x_0 where x_t
    hides it (t >= 700), the class is worth knowing: after 25 steps the loss at fixed (t, noise) has
    fallen, and the true labels predict better than the null class."""
    d = Diffusion(diffusion.betas, prediction="x0", variance="fixed_large")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % K
    x = (labels.float() - 1).mul(0.8).view(-1, 1, 1, 1) + 0.05 * torch.randn(48, 1, 8, 8, generator=gen)
    torch.manual_seed(0)
    net = UNet(TINY)
    t = torch.randint(700, 1000, (48,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)

    def loss(y):
        with torch.no_grad():
            return d.training_loss(net, x, t, noise, labels=y).mean().item()

    before = loss(labels)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(25):
        y = drop_labels(labels, K, 0.1, gen)
        step_loss = d.training_loss(net, x, generator=gen, labels=y).mean()
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    after, unconditional = loss(labels), loss(torch.full_like(labels, K))
    assert after < 0.5 * before, (before, after)
    assert after < 0.5 * unconditional, (after, unconditional)


# -- the guided network -------------------------------------------------------------------------


class Toy(torch.nn.Module):
    """out = x + y per row (and, with ``variance``, C more channels holding 10 y): outputs known in
    closed form for any label. Records the labels of every call."""

    def __init__(self, variance: bool = False):
        super().__init__()
        self.variance, self.calls = variance, []

    def forward(self, x, t, y):
        assert len(t) == len(y) == len(x)
        self.calls.append(y.clone())
        yy = y.to(x).view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([x + yy, 10 * yy], 1) if self.variance else x + yy


@pytest.mark.parametrize("w", [0.0, 1.0, 1.5, 3.0])
def test_guided_output_is_exact_in_one_forward_pass(w):
    toy, x, t = Toy(), torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.tensor([5, 6, 7, 8])
    y = torch.tensor([0, 2, 1, K])
    out = ClassifierFreeGuidance(toy, y, w, K)(x, t)
    want = x + (K + w * (y - K)).to(x).view(-1, 1, 1, 1)  # out_u + w (out_c - out_u), out_c = x + y, out_u = x + K
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert len(toy.calls) == 1  # one forward pass, whatever w
    rows = {0.0: [K] * 4, 1.0: y.tolist()}.get(w, y.tolist() + [K] * 4)  # w = 0, 1: N rows; else 2N
    assert toy.calls[0].tolist() == rows


def test_learned_variance_channels_are_the_conditional_branchs():
    toy, x, t = Toy(variance=True), torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.tensor([1, 2, 3])
    y = torch.tensor([0, 1, 2])
    out = ClassifierFreeGuidance(toy, y, 2.0, K)(x, t)
    torch.testing.assert_close(out[:, :1], x + (K + 2.0 * (y - K)).to(x).view(-1, 1, 1, 1))
    torch.testing.assert_close(out[:, 1:], 10 * y.to(x).view(-1, 1, 1, 1).expand_as(x))


def nonlinear(x, t, y):
    """A network with nothing affine about it."""
    return torch.sin(3 * x * (y.to(x) + 1).view(-1, 1, 1, 1)) + torch.cos(t.to(x) / 300).view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_guiding_the_network_output_guides_eps_and_x0_for_every_parameterization(diffusion, prediction):
    """The docstring's claim: each parameterization maps the output to eps affinely with coefficients
    shared by both branches, so the guided output gives eps_u + w (eps_c - eps_u) (and x_0 likewise)."""
    d = Diffusion(diffusion.betas, prediction=prediction, variance="fixed_large")
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t, y, w = torch.tensor([10, 200, 600, 990]), torch.tensor([0, 1, 2, 0]), 2.5
    null = torch.full_like(y, K)
    cond = d.p_mean_variance(lambda xx, tt: nonlinear(xx, tt, y), x, t, clip_denoised=False)
    uncond = d.p_mean_variance(lambda xx, tt: nonlinear(xx, tt, null), x, t, clip_denoised=False)
    guided = d.p_mean_variance(ClassifierFreeGuidance(nonlinear, y, w, K), x, t, clip_denoised=False)
    for key in ("eps", "pred_xstart", "mean"):
        torch.testing.assert_close(guided[key], uncond[key] + w * (cond[key] - uncond[key]))


# -- a per-class Gaussian oracle ----------------------------------------------------------------

MUS, S = (-0.4, 0.5), 0.5
MU_NULL = sum(MUS) / len(MUS)


@pytest.mark.parametrize("w", [0.0, 1.0, 1.5, 3.0])
def test_guided_samples_of_a_class_gaussian_oracle_have_the_closed_form_moments(diffusion, w):
    """eps* of N(mu, s^2) is affine in mu, so guiding class c against the null class N(mu_null, s^2)
    samples N(mu_null + w (mu_c - mu_null), s^2) exactly: w = 1 is class c's own mean and std, the
    means move linearly towards and past mu_c with w. DDIM over all T steps reproduces the data
    (tests/ddpm/test_samplers.py), so 1024 samples of 4 pixels per class lie within 4 standard errors."""
    oracle = ClassGaussianOracle(diffusion.alphas_cumprod, MUS, S)
    pipe = DDPMPipeline(oracle, diffusion, (4, 1, 1), sampler="ddim", steps=1000, batch_size=2048,
                        num_classes=len(MUS), guidance=w, clip_denoised=False)
    labels = balanced_labels(2048, len(MUS))
    x = pipe(2048, seed=1, class_labels=labels)
    for c, mu_c in enumerate(MUS):
        xc = x[labels == c]
        n, m = xc.numel(), MU_NULL + w * (mu_c - MU_NULL)
        assert abs(xc.mean().item() - m) < 4 * S / math.sqrt(n) + 1e-3, (c, xc.mean().item(), m)
        assert abs(xc.var().item() - S**2) < 4 * S**2 * math.sqrt(2 / (n - 1)) + 2e-3, (c, xc.var().item())
    assert {len(call) for call in oracle.calls} == ({2048} if w in (0.0, 1.0) else {4096})


# -- the pipeline -------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["oracle", "unet"])
def test_a_seed_and_label_give_the_same_image_whatever_the_batch(diffusion, network):
    if network == "oracle":
        model, shape, tol = ClassGaussianOracle(diffusion.alphas_cumprod, (-0.5, 0.1, 0.6)), (2, 1, 1), 1e-6
    else:
        model, shape, tol = tiny_unet(), (1, 8, 8), 1e-5
    labels = [2, 0, 1, 1, 0, 2, 2, 1]

    def run(batch_size, order=range(8)):
        pipe = DDPMPipeline(model, diffusion, shape, sampler="ddpm", steps=6, batch_size=batch_size,
                            num_classes=K, guidance=2.0)
        return pipe.from_seeds([100 + i for i in order], class_labels=[labels[i] for i in order])

    ref = run(8)
    for batch_size in (1, 3):
        torch.testing.assert_close(run(batch_size), ref, rtol=0, atol=tol)
    order = [5, 2, 7, 0, 1, 6, 3, 4]  # (seed, label) pairs travel together
    torch.testing.assert_close(run(3, order), ref[order], rtol=0, atol=tol)
    other = DDPMPipeline(model, diffusion, shape, sampler="ddpm", steps=6, batch_size=8, num_classes=K,
                         guidance=2.0).from_seeds([100 + i for i in range(8)], class_labels=[(v + 1) % K for v in labels])
    assert ((other - ref).flatten(1).abs().amax(1) > 1e-3).all()  # the label is part of the request


def test_no_labels_sample_the_null_class_in_one_pass(diffusion):
    oracle = ClassGaussianOracle(diffusion.alphas_cumprod, (-0.5, 0.1, 0.6))
    pipe = DDPMPipeline(oracle, diffusion, (1, 1, 1), sampler="ddim", steps=5, num_classes=K, guidance=3.0)
    x = pipe(4, seed=0)
    assert {len(c) for c in oracle.calls} == {4}
    unguided = DDPMPipeline(oracle, diffusion, (1, 1, 1), sampler="ddim", steps=5, num_classes=K, guidance=0.0)
    torch.testing.assert_close(x, unguided(4, seed=0, class_labels=[0, 1, 2, 0]), rtol=0, atol=1e-6)


def test_from_config_takes_the_models_classes_and_the_sample_guidance():
    cfg = ExperimentConfig.preset("digits").with_values({"model.num_classes": 10, "sample.guidance": 2.0,
                                                         "diffusion.timesteps": 100})
    pipe = DDPMPipeline.from_config(Recorder(), cfg)
    assert (pipe.num_classes, pipe.guidance) == (10, 2.0)
    assert DDPMPipeline.from_config(Recorder(), cfg, guidance=0.0).guidance == 0.0
    assert "guidance=2.0" in repr(pipe)


@pytest.mark.parametrize("num_classes, guidance, labels, num, match", [
    (0, 1.0, [0, 1, 2], 3, r"class labels given to an unconditional model"),
    (K, 1.0, [0, 1, 3], 3, r"class labels must lie in \[0, 3\) \(the model's 3 classes\), got \[3\]"),
    (K, 1.0, [0, -2, 1], 3, r"must lie in \[0, 3\)"),
    (K, 1.0, [0, 1], 3, r"got 2 class labels for 3 samples"),
    (K, 1.0, [0.0, 1.0, 2.0], 3, r"1-D sequence of integers"),
    (K, -1.0, None, 3, r"guidance must be in \[0, inf\) \(0 unconditional, 1 conditional"),
    (K, float("nan"), None, 3, r"guidance must be in \[0, inf\)"),
    (0, 2.0, None, 3, r"guidance=2.0 needs a class-conditional model"),
])
def test_bad_sampling_requests_are_refused_naming_the_valid_range(diffusion, num_classes, guidance, labels, num,
                                                                   match):
    oracle = ClassGaussianOracle(diffusion.alphas_cumprod, (0.0,) * K)
    with pytest.raises(ValueError, match=match):
        pipe = DDPMPipeline(oracle, diffusion, (1, 1, 1), steps=2, num_classes=num_classes, guidance=guidance)
        pipe(num, class_labels=labels)
    assert oracle.calls == []  # refused before any network call


def test_balanced_labels_share_every_class_evenly_in_a_fixed_order():
    y = balanced_labels(25, 10)
    assert y.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert sorted(torch.bincount(y, minlength=10).tolist()) == [2] * 5 + [3] * 5
    assert torch.equal(check_class_labels(y, 10), y)
    with pytest.raises(ValueError, match="class-conditional"):
        balanced_labels(5, 0)


# -- checkpoints --------------------------------------------------------------------------------


def _cfg(num_classes: int) -> ExperimentConfig:
    return ExperimentConfig.preset("digits").with_values({"model.num_classes": num_classes, "model.ch_mult": [1, 2],
                                                          "model.attn_resolutions": [4]})


def test_conditional_weights_round_trip(tmp_path):
    cfg = _cfg(K)
    net = tiny_unet()
    export_weights(net, str(tmp_path), cfg)
    cfg2, net2 = import_weights(str(tmp_path))
    assert cfg2 == cfg and cfg2.model.num_classes == K
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 2, K])
    with torch.no_grad():
        torch.testing.assert_close(net2(x, t, y), net(x, t, y), rtol=0, atol=0)


def test_an_unconditional_model_exported_before_classes_existed_still_loads(tmp_path):
    cfg, net = _cfg(0), tiny_unet(num_classes=0)
    export_weights(net, str(tmp_path), cfg)
    doc = json.loads((tmp_path / "config.json").read_text())
    old = doc["config"]
    del old["model"]["num_classes"], old["train"]["label_dropout"], old["sample"]["guidance"]
    (tmp_path / "config.json").write_text(json.dumps(doc))
    cfg2, net2 = import_weights(str(tmp_path))
    assert cfg2 == cfg and net2.state_dict().keys() == net.state_dict().keys()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(net2(x, t), net(x, t), rtol=0, atol=0)

"""Canonicalizers (parametrized over the registry): equivariant scores, output contract, options.

The contract: ``scores(g . x)[:, g o k] == scores(x)[:, k]``, exactly (fp32) for 90-degree
elements and flips, so the argmax moves with the input.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from canonwrap.canonicalizers import (
    CANONICALIZERS,
    EquivariantCanonicalizer,
    OrbitCanonicalizer,
    ScoreOutput,
    create_canonicalizer,
    list_canonicalizers,
    orbit_contrastive_loss,
)
from canonwrap.groups import get_group, transform

torch.set_num_threads(1)

SMALL = {"orbit": {"width": 4, "embed_dim": 16}, "equivariant": {"width": 4, "depth": 2}}


def _canon(name: str, group: str, in_chans: int = 3, size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return create_canonicalizer(name, group, in_chans=in_chans, size=size, **SMALL.get(name, {})).eval()


def test_registry_has_both_families():
    assert list_canonicalizers() == ["equivariant", "orbit"]
    assert isinstance(_canon("orbit", "c4"), OrbitCanonicalizer)
    assert isinstance(_canon("Equivariant", "c4"), EquivariantCanonicalizer)


@pytest.mark.parametrize("name", list(CANONICALIZERS))
@pytest.mark.parametrize("group", ["c4", "d4"])
def test_scores_are_equivariant_for_exact_groups(name, group):
    g = get_group(group)
    canon = _canon(name, group)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = canon(x).scores  # (B, G)
        scale = ref.abs().max()
        for e in g.elements():
            got = canon(transform(x, g, e)).scores
            perm = [g.compose(e, k) for k in g.elements()]  # got[:, e o k] == ref[:, k]
            torch.testing.assert_close(got[:, perm], ref, atol=1e-5 * float(scale), rtol=0)


@pytest.mark.parametrize("name", list(CANONICALIZERS))
def test_c8_scores_are_equivariant_under_90_degree_rotations(name):
    g = get_group("c8")
    canon = _canon(name, "c8")
    torch.manual_seed(2)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = canon(x).scores
        for e in (2, 4, 6):
            got = canon(transform(x, g, e)).scores
            perm = [g.compose(e, k) for k in g.elements()]
            torch.testing.assert_close(got[:, perm], ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("name", list(CANONICALIZERS))
def test_output_contract(name):
    canon = _canon(name, "d4", in_chans=2, size=12)
    out = canon(torch.randn(5, 2, 12, 12))
    assert isinstance(out, ScoreOutput)
    assert out.scores.shape == (5, 8) and out.scores.dtype == torch.float32
    if name == "orbit":
        assert out.embeddings.shape == (5, 8, 16)
    else:
        assert out.embeddings is None
    assert canon.name == name and canon.group.name == "d4"
    assert isinstance(canon.config, dict) and canon.config  # serialized in checkpoints
    out.scores.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in canon.parameters() if p.requires_grad)


def test_orbit_accepts_a_module_or_a_timm_name():
    pytest.importorskip("timm")

    class Flat(nn.Module):  # no num_features: width inferred by a dry run
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 8 * 8, 7)

        def forward(self, x):
            return self.lin(x.flatten(1))

    torch.manual_seed(0)
    canon = create_canonicalizer("orbit", "c4", in_chans=3, size=8, network=Flat())
    assert canon.config["network"].endswith("Flat")
    assert canon(torch.randn(2, 3, 8, 8)).embeddings.shape == (2, 4, 7)

    canon = create_canonicalizer("orbit", "c4", in_chans=3, size=16, network="timm:test_resnet")
    assert canon.config["network"] == "timm:test_resnet"
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        ref = canon.eval()(x).scores
        got = canon(transform(x, "c4", 1)).scores
    torch.testing.assert_close(got[:, [1, 2, 3, 0]], ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_bad_canonicalizer_options():
    with pytest.raises(TypeError, match="network"):
        create_canonicalizer("orbit", "c4", in_chans=3, size=8, network=3)

    class Spatial(nn.Module):
        def forward(self, x):
            return x  # (N, C, H, W): not an embedding

    with pytest.raises(ValueError, match=r"\(N, D\)"):
        create_canonicalizer("orbit", "c4", in_chans=3, size=8, network=Spatial())
    with pytest.raises(ValueError, match="odd"):
        create_canonicalizer("equivariant", "c4", in_chans=3, size=8, kernel_size=4)


def test_orbit_contrastive_loss():
    same = torch.ones(2, 4, 3)
    assert torch.isclose(orbit_contrastive_loss(same), torch.tensor(1.0))
    eye = torch.eye(4).expand(2, 4, 4)  # orthogonal embeddings across the orbit
    assert orbit_contrastive_loss(eye) == 0
    canon = _canon("orbit", "c4")
    loss = orbit_contrastive_loss(canon(torch.randn(3, 3, 16, 16)).embeddings)
    assert loss.dim() == 0 and 0 <= float(loss.detach()) <= 1
    loss.backward()
    for name, p in canon.named_parameters():  # the contrastive loss acts on the encoder only
        assert (p.grad is not None) == name.startswith("encoder."), name

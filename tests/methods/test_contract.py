"""What every registered method promises the loop, the registry and the server, and
what every model that can be promoted (a method, or an ensemble of them) promises
serving: the prediction contract (`Predictor`, methods/base.py).

Tiny shapes (28 px, conv4 of width 8: 8 features) keep each method to a second."""

import pytest
import torch

from fewshot.data.episodes import Episode
from fewshot.methods import METHODS
from fewshot.methods.base import split_rows
from fewshot.methods.ensemble import Ensemble
from fewshot.safety import load_weights

N_WAY = 3
# Settings a method needs to run on tiny shapes at all.
FITS = {
    "trml": ["backbone.name=conv4_nopool"],  # needs spatial maps
    "subspace": ["method.n_subspaces=2", "method.subspace_dim=3"],  # S * d <= 8 features
}


# Ensembles of two members: features of different shapes ([B, D], [B, S, d], [B, P, C]),
# and one with a member that does not split, so neither does the ensemble.
ENSEMBLES = ["protonet+subspace", "trml+mtl", "cfn+maml"]


def settings(name: str) -> list[str]:
    """The tiny settings of method `name`."""
    pretrain = ["pretrain.steps=1"] if METHODS[name].pretrains else []
    return [
        "data.image_size=28",
        "backbone.width=8",
        f"method.name={name}",
        f"episode.n_way={N_WAY}",
        "episode.k_shot=2",
        *pretrain,
        *FITS.get(name, []),
    ]


@pytest.fixture(params=sorted(METHODS))
def make(request, make_method):
    return lambda: make_method(*settings(request.param))


@pytest.fixture(params=[*sorted(METHODS), *ENSEMBLES])
def model(request, make_method):
    """Every method, and the ENSEMBLES (members joined by '+'), in eval mode."""
    members = [make_method(*settings(name)) for name in request.param.split("+")]
    return (members[0] if len(members) == 1 else Ensemble(members)).eval()


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def task(n_way: int, shots: list[int], queries: int = 4, seed: int = 1):
    """support_x, support_y (class i with shots[i] images) and query_x."""
    support_y = torch.repeat_interleave(torch.arange(n_way), torch.tensor(shots))
    return images(len(support_y), seed), support_y, images(queries, seed + 1)


def test_the_loss_is_finite_and_reaches_every_trainable_parameter(make):
    method = make().train()
    support_x, support_y, query_x = task(N_WAY, [2] * N_WAY, queries=2 * N_WAY)
    episode = Episode(support_x, support_y, query_x, torch.arange(N_WAY).repeat(2), support_y)
    loss = method.loss(episode)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in trainable:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_predict_answers_ragged_supports(make):
    method = make().eval()
    logits = method.predict(*task(N_WAY, [1, 3, 2], queries=5))
    assert logits.shape == (5, N_WAY)
    assert torch.isfinite(logits).all()


def test_the_state_dict_round_trips_through_a_file(make, tmp_path):
    method = make().eval()
    torch.save(method.state_dict(), tmp_path / "model.pt")
    other = make().eval()
    for value in other.state_dict().values():  # other weights, which the file must replace
        if value.is_floating_point():
            value.add_(1.0)
    other.load_state_dict(load_weights(tmp_path / "model.pt"))
    for (name, a), b in zip(method.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    inputs = task(N_WAY, [2] * N_WAY)
    torch.testing.assert_close(other.predict(*inputs), method.predict(*inputs))


@pytest.mark.parametrize("n_way", [2, N_WAY, 4])
def test_supports_way_is_honoured(make, n_way):
    method = make().eval()
    inputs = task(n_way, [2] * n_way)
    if method.supports_way(n_way, N_WAY, method.params):
        assert method.predict(*inputs).shape == (4, n_way)
    else:  # it cannot: it fails, or answers in its training way
        try:
            shape = method.predict(*inputs).shape
        except (RuntimeError, IndexError):
            return
        assert shape != (4, n_way)


def test_a_prepared_support_set_answers_queries_as_predict_does(model):
    """What the server's support cache relies on: supports prepared alone, queries embedded
    alone, in any batch, score as the whole episode does (eval mode)."""
    support_x, support_y, query_x = task(N_WAY, [1, 3, 2], queries=5)
    if not model.splits_prediction:
        with pytest.raises(NotImplementedError, match="maml does not split"):
            model.prepare(model.features(support_x), support_y)
        return
    with torch.no_grad():
        expected = model.predict(support_x, support_y, query_x)
        prepared = model.prepare(model.features(support_x), support_y)
        one_by_one = torch.cat([model.score(prepared, model.features(q[None])) for q in query_x])
        # One batch of supports and queries, split per image (Ray Serve's batching).
        both = torch.cat([support_x, query_x])
        support_z, query_z = split_rows(model.features(both), [len(support_x), len(query_x)])
        batched = model.score(model.prepare(support_z, support_y), query_z)
    torch.testing.assert_close(one_by_one, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)

import pytest
import torch
import torch.nn.functional as F

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError
from fewshot.methods.subspace import (
    class_bases,
    class_decorrelation,
    class_supports,
    feature_decorrelation,
    projection_distances,
)

# conv4 of width 16 at 16 px: 16 features; S = 2 subspaces of d = 6 > 5 shots.
TINY = [
    "data.image_size=16",
    "backbone.width=16",
    "method.name=subspace",
    "method.n_subspaces=2",
    "method.subspace_dim=6",
]


@pytest.fixture
def make(make_method):
    return lambda overrides=(): make_method(*TINY, *overrides)


def projector(x: torch.Tensor) -> torch.Tensor:
    """[d, K] -> the orthogonal projector onto X's column space, by the SVD (the spec's way)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    u = u[:, s > 1e-6 * s.max()]
    return u @ u.T


def test_support_vectors_have_zero_distance_to_their_own_class():
    # One subspace, d = 3: class 0 spans (1,0,1) and (0,2,0); class 1 spans e1 and e2.
    x = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]])
    bases = class_bases(x)  # [1, 2, 3, 2]
    queries = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    distances = projection_distances(queries.unsqueeze(1), bases)  # [3, 2]
    # (3,4,5): ||q||^2 = 50; onto class 0: (8/sqrt 2)^2 + 4^2 = 48, residual 2;
    # onto class 1: 9 + 16 = 25, residual 25. (1,0,1) has residual 1 to class 1.
    expected = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 25.0]])
    # The ridge eps = 1e-5 ||X||_F^2 = 6e-5 shrinks the weight of a direction of singular
    # value sigma by eps / sigma^2: (3,4,5) loses 32 * 3e-5 + 16 * 1.5e-5 = 1.2e-3.
    torch.testing.assert_close(distances, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(
        projection_distances(queries.unsqueeze(1), class_bases(x, ridge=0.0)), expected
    )


def test_distances_add_over_subspaces():
    torch.manual_seed(0)
    x, queries = torch.randn(2, 3, 5, 2), torch.randn(4, 2, 5)  # S=2, N=3, d=5, K=2; M=4
    expected = torch.zeros(4, 3)
    for s in range(2):
        for n in range(3):
            residual = queries[:, s] - queries[:, s] @ projector(x[s, n])  # [M, d]
            expected[:, n] += residual.pow(2).sum(1)
    torch.testing.assert_close(
        projection_distances(queries, class_bases(x)), expected, rtol=1e-4, atol=1e-4
    )


def test_class_supports_group_vectors_by_label_and_pad_ragged_classes():
    z = torch.arange(10.0).view(5, 1, 2)  # 5 vectors, S = 1, d = 2
    x = class_supports(z, torch.tensor([1, 0, 1, 0, 0]), n_way=2)  # [1, 2, 2, 3]
    torch.testing.assert_close(x[0, 0], torch.tensor([[2.0, 6.0, 8.0], [3.0, 7.0, 9.0]]))
    torch.testing.assert_close(x[0, 1], torch.tensor([[0.0, 4.0, 0.0], [1.0, 5.0, 0.0]]))
    # The zero column of the padded class leaves its projector unchanged.
    padded, unpadded = class_bases(x)[0, 1], class_bases(x[..., :2])[0, 1]
    torch.testing.assert_close(padded @ padded.T, unpadded @ unpadded.T)


def test_qr_projector_equals_the_svd_projector():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 3, dtype=torch.float64)  # S=2, N=3, d=8, K=3
    for ridge, tolerance in [(0.0, 1e-10), (1e-5, 1e-3)]:
        u = class_bases(x, ridge=ridge)
        for s in range(2):
            for n in range(3):
                torch.testing.assert_close(
                    u[s, n] @ u[s, n].T, projector(x[s, n]), rtol=0, atol=tolerance
                )
    u = class_bases(x, ridge=0.0)
    torch.testing.assert_close(u.transpose(-2, -1) @ u, torch.eye(3).expand(2, 3, 3, 3).double())


def test_feature_decorrelation_is_zero_only_for_disjoint_subspace_coordinates():
    """L1 compares coordinates of different subspaces (Z_s^T Z_t = X P_s^T P_t X^T), so it
    vanishes when P_s^T P_t = 0: subspaces with orthogonal row spaces in R^D *and*
    disjoint output coordinates in R^d. Orthogonal row spaces alone are not enough."""
    torch.manual_seed(0)
    data = torch.randn(6, 4)  # N*K = 6 support vectors, D = 4
    a, b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, -2.0])  # a . b = 0
    zero = torch.zeros(4)
    disjoint = torch.stack([torch.stack([a, zero]), torch.stack([zero, b])])  # P [S=2, d=2, D]
    shared = torch.stack([torch.stack([a, zero]), torch.stack([b, zero])])
    l1 = feature_decorrelation(torch.einsum("sed,bd->bse", disjoint, data))
    assert l1.item() == pytest.approx(0.0, abs=1e-6)
    l1 = feature_decorrelation(torch.einsum("sed,bd->bse", shared, data))
    # Z_1^T Z_2 = (X a)(X b)^T; two ordered pairs; c1 = 1 / (2 * 1 * 6^2).
    by_hand = 2 * (data @ a).pow(2).sum() * (data @ b).pow(2).sum() / (2 * 36)
    assert l1.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert by_hand > 0
    assert feature_decorrelation(torch.randn(6, 1, 3)).item() == 0.0  # S = 1


def test_class_decorrelation_of_orthogonal_and_overlapping_class_subspaces():
    # Three classes in d = 6, each spanning its own pair of coordinates.
    x = torch.zeros(1, 3, 6, 2)
    for n in range(3):
        x[0, n, 2 * n : 2 * n + 2] = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert class_decorrelation(class_bases(x)).item() == pytest.approx(0.0, abs=1e-7)
    # Lines (1,0) and (1,1)/sqrt 2: ||U_0^T U_1||^2 = 1/2 for each of the 2 ordered pairs,
    # c2 = 1 / (1 * 2 * 1): L2 = 1/2.
    u = torch.tensor([[[[1.0], [0.0]], [[2**-0.5], [2**-0.5]]]])
    assert class_decorrelation(u).item() == pytest.approx(0.5, rel=1e-6)
    x = torch.tensor([[[[1.0], [0.0]], [[3.0], [3.0]]]])
    assert class_decorrelation(class_bases(x)).item() == pytest.approx(0.5, rel=1e-4)


def episode(n_way=5, k_shot=5, q_query=2) -> Episode:
    torch.manual_seed(1)
    support_x = torch.randn(n_way * k_shot, 1, 16, 16)
    support_x[n_way] = support_x[0]  # two identical support images of class 0
    return Episode(
        support_x=support_x,
        support_y=torch.arange(n_way).repeat(k_shot),
        query_x=torch.randn(n_way * q_query, 1, 16, 16),
        query_y=torch.arange(n_way).repeat(q_query),
        classes=torch.arange(n_way),
    )


def test_loss_is_ce_plus_weighted_penalties(make):
    method = make(["method.lambda1=0.3", "method.lambda2=2.0"])
    ep = episode()
    loss = method.loss(ep)
    parts = loss.parts
    torch.testing.assert_close(parts["ce"], F.cross_entropy(loss.logits, ep.query_y))
    torch.testing.assert_close(
        loss.total, parts["ce"] + 0.3 * parts["decorr_features"] + 2.0 * parts["decorr_classes"]
    )
    assert parts["decorr_features"] > 0 and parts["decorr_classes"] > 0


def test_logits_are_minus_summed_distances_to_svd_class_subspaces(make):
    method = make().eval()
    ep = episode(n_way=3, k_shot=2, q_query=2)
    ep.support_x[3] = torch.randn(1, 16, 16)  # no duplicates here: full-rank classes
    logits = method.predict(ep.support_x, ep.support_y, ep.query_x)
    with torch.no_grad():
        z = method.projection(method.backbone(torch.cat([ep.support_x, ep.query_x])))
        z = z.view(len(z), 2, 6)
    support_z, query_z = z[:6], z[6:]
    expected = torch.zeros(6, 3)
    for s in range(2):
        for n in range(3):
            m = projector(support_z[ep.support_y == n, s].T)
            expected[:, n] -= (query_z[:, s] - query_z[:, s] @ m).pow(2).sum(1)
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)


def test_gradients_stay_finite_and_moderate_with_a_duplicated_support_image(make):
    method = make()
    ep = episode()
    ep.support_x.requires_grad_(True)
    loss = method.loss(ep)
    loss.total.backward()
    grads = torch.cat([p.grad.flatten() for p in method.parameters()])
    assert torch.isfinite(loss.total) and torch.isfinite(grads).all()
    assert torch.isfinite(ep.support_x.grad).all()
    # Plain QR (ridge 0) gives the two duplicates input gradients of ~2e4 here (measured;
    # in the parameters' gradients they cancel, up to float32 rounding); the ridge, ~5e-3.
    assert ep.support_x.grad.abs().max() < 1.0


def test_too_many_subspace_dimensions_are_refused(make):
    with pytest.raises(ConfigError, match=r"2 x 6 = 12 exceeds the backbone's 4 features"):
        make(["backbone.width=4"])


@pytest.mark.parametrize("key", ["episode", "evaluate"])
def test_class_subspaces_as_large_as_the_shots_are_refused(key, method_config):
    with pytest.raises(ConfigError, match=rf"raise method.subspace_dim above {key}.k_shot"):
        method_config(*TINY, f"{key}.k_shot=6")

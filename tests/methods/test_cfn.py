import pytest
import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError
from fewshot.methods.cfn import CIM, FRM, SRM
from fewshot.methods.protonet import prototypes


@pytest.fixture
def make(make_method):
    return lambda *overrides: make_method(
        "method.name=cfn", "pretrain.steps=1", "episode.n_way=3", *overrides
    )


def episode(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(6, 1, 16, 16, generator=g),
        torch.tensor([0, 1, 2, 0, 1, 2]),
        torch.randn(4, 1, 16, 16, generator=g),
    )


A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, 1.0]])


def test_cim_is_w_times_a():
    cim = CIM(3, 3)
    with torch.no_grad():
        cim.weight.copy_(torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))
    expected = torch.stack([A[0] + 0.5 * A[1], 2 * A[1], A[0] + A[1] + A[2]])
    torch.testing.assert_close(cim(A), expected)


def test_srm_with_alpha_one_beta_zero_is_the_identity_and_has_the_stated_structure():
    srm = SRM(3, 3)
    torch.testing.assert_close(srm(A), A)  # initialised to alpha = 1, beta = 0
    with torch.no_grad():
        srm.net[2].bias.copy_(torch.tensor([2.0, 3.0]))  # alpha = 2, beta = 3 for every row
    matrix = srm.fusion_matrix(A)
    assert torch.allclose(matrix.diag(), torch.full((3,), 2.0 + 3.0 / 3))
    assert torch.allclose(matrix[0, 1], torch.tensor(1.0)) and torch.allclose(
        matrix[2, 0], torch.tensor(1.0)
    )
    torch.testing.assert_close(srm(A), 2 * A + 3 * A.mean(0, keepdim=True))


def test_frm_predicts_the_fusion_matrix_from_the_gram_matrix():
    frm = FRM(3, 3)
    torch.testing.assert_close(frm(A), A)  # initialised to the identity
    seen = []
    frm.net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    frm(A)
    torch.testing.assert_close(seen[0], (A @ A.T).flatten())


def test_untrained_cfn_is_the_no_fusion_baseline(make):
    for fusion in ("cim", "srm", "frm"):
        method = make(f"method.fusion={fusion}").eval()
        support_x, support_y, query_x = episode()
        with torch.no_grad():
            logits = method.predict(support_x, support_y, query_x)
            z = F.normalize(method.backbone(torch.cat([support_x, query_x])), dim=1)
        centres = prototypes(z[:6], support_y, 3)
        torch.testing.assert_close(logits, 10.0 * z[6:] @ centres.T, rtol=1e-4, atol=1e-4)


def test_ensemble_averages_the_three_modules_probabilities(make):
    method = make("method.fusion=ensemble").eval()
    with torch.no_grad():
        for module in method.fusions.values():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
        support_x, support_y, query_x = episode()
        logits = method.predict(support_x, support_y, query_x)
        z = F.normalize(method.backbone(torch.cat([support_x, query_x])), dim=1)
        centres = prototypes(z[:6], support_y, 3)
        probs = [
            (10.0 * z[6:] @ method.classifier(centres, name).T).softmax(1)
            for name in ("cim", "srm", "frm")
        ]
    torch.testing.assert_close(logits.exp(), torch.stack(probs).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("finetune", [False, True])
def test_frozen_extractor_gets_no_gradient(finetune, make):
    method = make(f"method.finetune_extractor={str(finetune).lower()}").train()
    support_x, support_y, query_x = episode()
    loss = F.cross_entropy(
        method.predict(support_x, support_y, query_x), torch.tensor([0, 1, 2, 0])
    )
    loss.backward()
    backbone_grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is None for g in backbone_grads) != finetune
    assert method.fusions["cim"].weight.grad.abs().sum() > 0
    assert method.predictor.weight.grad.abs().sum() > 0
    assert method.backbone.training == finetune  # frozen: batch-norm keeps its statistics


def test_bad_combinations_are_refused(make):
    with pytest.raises(ConfigError, match="evaluate.n_way"):
        make("method.fusion=cim", "evaluate.n_way=5")
    make("method.fusion=srm", "evaluate.n_way=5")  # SRM has no n_way-sized parameter
    with pytest.raises(ConfigError, match="pretrain.steps"):
        make("pretrain.steps=0")

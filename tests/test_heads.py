"""Identity classifier and cross-modal MLM head: shapes, initialisation, gradient flow, argument checks."""

import pytest
import torch

from model.heads import CrossModalMLMHead, IdentityClassifier


def test_identity_classifier_shape_and_irra_init():
    torch.manual_seed(0)
    head = IdentityClassifier(64, 500)
    assert head(torch.randn(3, 64)).shape == (3, 500)
    assert head.fc.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.all(head.fc.bias == 0)


def test_identity_classifier_gradient_flows_to_weights_and_features():
    head = IdentityClassifier(8, 4)
    feats = torch.randn(5, 8, requires_grad=True)
    head(feats).logsumexp(dim=1).sum().backward()
    assert feats.grad.abs().sum() > 0 and head.fc.weight.grad.abs().sum() > 0


def _head() -> CrossModalMLMHead:
    torch.manual_seed(0)
    return CrossModalMLMHead(32, 50, num_heads=4, depth=2)


def test_mlm_head_output_shape_with_different_text_and_image_lengths():
    head = _head()
    assert head(torch.randn(2, 7, 32), torch.randn(2, 11, 32)).shape == (2, 7, 50)
    assert len(head.cross_modal_transformer.layers) == 2


def test_mlm_head_gradient_reaches_every_parameter_and_both_inputs():
    head = _head()
    text = torch.randn(2, 5, 32, requires_grad=True)
    image = torch.randn(2, 9, 32, requires_grad=True)
    head(text, image).pow(2).mean().backward()
    assert text.grad.abs().sum() > 0 and image.grad.abs().sum() > 0
    missing = [name for name, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_mlm_head_prediction_depends_on_the_image():
    head = _head().eval()
    text = torch.randn(1, 5, 32)
    with torch.no_grad():
        a = head(text, torch.randn(1, 9, 32))
        b = head(text, torch.randn(1, 9, 32))
    assert not torch.allclose(a, b)


def test_mlm_head_uses_clip_style_init_scaled_by_width_and_depth():
    torch.manual_seed(0)
    head = CrossModalMLMHead(256, 10, num_heads=8, depth=4)
    assert head.cross_attn.in_proj_weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    expected_proj = 256**-0.5 * 8**-0.5
    assert head.cross_modal_transformer.layers[0].linear2.weight.std().item() == pytest.approx(expected_proj, rel=0.05)


@pytest.mark.parametrize("num_heads", [5, 0])
def test_mlm_head_rejects_heads_that_do_not_divide_the_width(num_heads):
    with pytest.raises(ValueError, match="num_heads"):
        CrossModalMLMHead(32, 50, num_heads=num_heads)


def test_mlm_head_rejects_zero_depth():
    with pytest.raises(ValueError, match="depth"):
        CrossModalMLMHead(32, 50, num_heads=4, depth=0)

import torch

from hwctl.model import ResNetCifar, analog_layers, analog_weight_count, resnet32


def test_reference_network_weight_count():
    model = resnet32()
    assert analog_weight_count(model) == 361_722
    assert 2 * analog_weight_count(model) == 723_444


def test_reference_network_layers_match_design():
    model = resnet32()
    layers = dict(analog_layers(model))
    # stem + 30 block convolutions + 2 shortcuts + linear
    assert len(layers) == 34
    assert layers["layer2.0.shortcut.0"].weight.shape == (28, 16, 1, 1)
    assert layers["layer3.0.shortcut.0"].weight.shape == (56, 28, 1, 1)
    assert layers["linear"].weight.shape == (10, 56)
    assert all(module.bias is None for name, module in layers.items() if name != "linear")


def test_weight_count_matches_independent_formula():
    # Count from the layer shapes alone: 3x3 convs, 1x1 shortcuts, linear with bias.
    w1, w2, w3 = 16, 28, 56
    convs = 3 * w1 * 9 + 10 * w1 * w1 * 9
    convs += w1 * w2 * 9 + 9 * w2 * w2 * 9 + w1 * w2
    convs += w2 * w3 * 9 + 9 * w3 * w3 * 9 + w2 * w3
    assert analog_weight_count(resnet32()) == convs + w3 * 10 + 10


def test_padding_shortcut_network_has_published_size():
    # The standard ResNet-32 (16/32/64, option A shortcuts) has 461,882 weights.
    model = ResNetCifar((16, 32, 64), 5, 10, "pad")
    assert analog_weight_count(model) == 461_882


def test_forward_output_shape():
    logits = resnet32().eval()(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10)

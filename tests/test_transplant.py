import torch

from hwctl.model import ResNetCifar
from hwctl.transplant import transplant


def test_transplant_same_widths_keeps_function():
    # Keeping every channel must turn padding shortcuts into 1x1 convolutions exactly.
    torch.manual_seed(0)
    source = ResNetCifar((8, 16, 32), 2, 10, "pad")
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    target = ResNetCifar((8, 16, 32), 2, 10, "conv")
    transplant(source.eval(), target)
    inputs = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(target.eval()(inputs), source(inputs), rtol=1e-4, atol=1e-4)


def test_transplant_narrower_keeps_strongest_channels():
    torch.manual_seed(1)
    source = ResNetCifar((8, 16, 32), 1, 10, "pad")
    with torch.no_grad():
        source.linear.weight.zero_()
        source.linear.weight[:, 5] = 3.0  # channel 5 of the last stage is the only one read
    target = ResNetCifar((8, 12, 24), 1, 10, "conv")
    transplant(source, target)
    kept = target.linear.weight.abs().sum(dim=0)
    assert kept.max() == 30.0
    assert int((kept > 0).sum()) == 1

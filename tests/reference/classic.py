"""Torch models written as torchvision (VGG, AlexNet) and the WRN authors write them;
torchvision itself cannot be installed here. Only names and shapes matter to the tests
that use these, so they define no forward."""
import torch.nn as nn


def _bn(c, eps=1e-5):
    return nn.BatchNorm2d(c, eps=eps)


VGG_CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):   # torchvision.models.vgg.VGG with make_layers(cfg "D")
    def __init__(self, cfg=VGG_CFG_D, batch_norm=False, num_classes=1000):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1)] + ([_bn(v)] if batch_norm else []) + [nn.ReLU(True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, num_classes))


class AlexNet(nn.Module):   # torchvision.models.alexnet
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(True),
                                        nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True),
                                        nn.Linear(4096, num_classes))


class WideBasic(nn.Module):   # the WRN authors' pre-activation block
    def __init__(self, cin, c, stride):
        super().__init__()
        self.bn1, self.conv1 = _bn(cin), nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = _bn(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        if stride != 1 or cin != c:
            self.shortcut = nn.Conv2d(cin, c, 1, stride, bias=False)


class WideResNet(nn.Module):
    def __init__(self, depth, k, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin = 16
        for i, c in enumerate((16 * k, 32 * k, 64 * k)):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[WideBasic(cin if j == 0 else c, c, 2 if i and not j else 1)
                                                           for j in range(n)]))
            cin = c
        self.bn1, self.fc = _bn(cin), nn.Linear(cin, num_classes)

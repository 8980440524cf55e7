"""Built-in architecture names for `build_arch` (and `--arch` on the command line).

Each factory takes `num_classes` (and `in_channels`), so a saved model's JSON only needs the name
to rebuild the network its weights belong to.
"""
from __future__ import annotations

from ..io.arch import register_arch
from .face import DeepIDFace
from .resnet_cifar import CifarResNet, resnet20
from .small import SmallCNN
from .speech import SpeechAlexNet
from .traffic import TrafficVGG


@register_arch("face-deepid")
def face_deepid(num_classes: int = 38, in_channels: int = 1) -> DeepIDFace:
    """DeepID-style face network for 64x56 crops (prunes conv3's ReLU)."""
    return DeepIDFace(num_classes=num_classes, in_channels=in_channels)


@register_arch("face-deepid-bn")
def face_deepid_bn(num_classes: int = 38, in_channels: int = 1) -> DeepIDFace:
    """face-deepid with BatchNorm after every conv (earlier fineprune versions' face model)."""
    return DeepIDFace(num_classes=num_classes, in_channels=in_channels, batchnorm=True)


@register_arch("speech-alexnet")
def speech_alexnet(num_classes: int = 10, in_channels: int = 1) -> SpeechAlexNet:
    """AlexNet-style CNN reading 8 kHz waveforms through a log spectrogram."""
    return SpeechAlexNet(num_classes=num_classes, in_channels=in_channels)


@register_arch("traffic-vgg")
def traffic_vgg(num_classes: int = 43, in_channels: int = 3) -> TrafficVGG:
    """Small VGG-style CNN for 32x32 traffic signs."""
    return TrafficVGG(num_classes=num_classes, in_channels=in_channels)


@register_arch("traffic-resnet20")
def traffic_resnet20(num_classes: int = 43, in_channels: int = 3) -> CifarResNet:
    """CIFAR-style ResNet-20 (BatchNorm, option-A shortcuts) for 32x32 traffic signs (prunes `layer3`)."""
    return resnet20(num_classes=num_classes, in_channels=in_channels)


@register_arch("demo-cnn")
def demo_cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """The demo's MNIST-sized CNN (28x28, width 16)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes)

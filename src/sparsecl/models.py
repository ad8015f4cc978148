"""Reference models. Any ``nn.Module`` ending in an ``nn.Linear`` works with the engine (the
weight-level methods take any such module; the neuron-level ones need a unit graph,
``sparsecl.graph``); these are the ones the CLI builds.

Every builder in ``MODELS`` is called as ``builder(input_shape, num_classes, **options)`` and
returns a plain ``nn.Module`` that ``torch.fx`` can trace, ending in a final ``nn.Linear``
producing the logits (the head prototype that ``ContinualNetwork`` replaces by one head per task).
The convolutional nets and the MLP use convolutions (depthwise in ``mobilenetv2``), BatchNorm
(tracking running statistics), ReLU/ReLU6, ``nn.Dropout``, pooling, one flatten before the first
Linear and residual ``out = out + shortcut`` adds, which the unit graph follows; ``vit`` uses
LayerNorm and ``nn.MultiheadAttention``, for the weight-level methods. ``mlp`` keeps its own positional order
``mlp(input_shape, hidden, num_classes, dropout, bias)``; ``MODELS["mlp"]`` adapts it.

Bad options raise ``ConfigError`` naming the option, including an ``input_shape`` too small for a
model's convolutions and pooling.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


def mlp(input_shape: Sequence[int], hidden: Sequence[int] = (2000, 2000), num_classes: int = 10,
        dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """Flatten → [Linear → ReLU → Dropout] per hidden width → Linear head.

    ``bias=False`` leaves the biases out of every Linear (head included), as the WSN and GPM
    reference code's Permuted-MNIST MLP.

    The Permuted-MNIST network of CLNP and EideticNets is ``mlp((1, 28, 28), (2000, 2000), 10)``
    (EideticNets uses dropout 0.1). The final Linear is the head prototype that
    ``ContinualNetwork`` replaces by one head per task. Layers are named ``flatten``, then
    ``fc1``, ``relu1``, ``drop1``, ``fc2``, … per hidden layer, and ``head``, so that reports name
    the hidden layers ``fc1``, ``fc2``, …
    """
    if not 0 <= dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {dropout}")
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    width = math.prod(input_shape)
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"], layers[f"relu{i}"] = nn.Linear(width, h, bias=bias), nn.ReLU()
        if dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        width = h
    layers["head"] = nn.Linear(width, num_classes, bias=bias)
    return nn.Sequential(OrderedDict(layers))


# --- option checks -------------------------------------------------------------------------------

def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"{model}: input_shape must be three positive integers (C, H, W), "
                          f"got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _positive(name: str, value: int, model: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{model}: {name} must be a positive integer, got {value!r}")
    return value


def _rate(name: str, value: float, model: str) -> float:
    if not 0 <= value < 1:
        raise ConfigError(f"{model}: {name} must be in [0, 1), got {value}")
    return value


def _dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


class _Spatial:
    """Tracks the (H, W) of a feature map through convolutions and pooling, so that a too-small
    ``input_shape`` is refused by name instead of failing inside the first forward pass."""

    def __init__(self, input_shape: tuple[int, int, int], model: str):
        self.hw = input_shape[1:]
        self.input_shape = input_shape
        self.model = model

    def apply(self, what: str, kernel: int, stride: int = 1, padding: int = 0) -> None:
        out = tuple((d + 2 * padding - kernel) // stride + 1 for d in self.hw)
        if min(d + 2 * padding for d in self.hw) < kernel or min(out) < 1:
            raise ConfigError(f"{self.model}: input_shape {self.input_shape} is too small: {what} "
                              f"({kernel}x{kernel}, stride {stride}, padding {padding}) gets a "
                              f"{self.hw[0]}x{self.hw[1]} map")
        self.hw = out

    @property
    def area(self) -> int:
        return self.hw[0] * self.hw[1]


# --- CLNP (Golkar, Kagan & Cho 2019, arXiv 1903.04476, Sec. 3.2) ----------------------------------

def clnp_cifar_narrow(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                      width: int = 32, hidden: int = 512, conv_dropout: float = 0.25,
                      dropout: float = 0.5) -> nn.Sequential:
    """CLNP's narrow multi-head split CIFAR-10/100 network (paper Table 2, from Zenke et al. 2017).

    Paper Table 2 ("Convolutional layers and Dense 1 are followed by ReLU activation")::

        Layer            Chan.  Ker.  Str.  Pad.  Dropout
        32x32 input      3
        Conv 1           32     3x3   1     1
        Conv 2           32     3x3   1     1
        MaxPool                 3x3   2     1     0.25
        Conv 3           64     3x3   1     1
        Conv 4           64     3x3   1     1
        MaxPool                 3x3   2     1     0.25
        Dense 1          512                      0.5
        Task t: Dense    10

    Built as Conv(w)→ReLU→Conv(w)→ReLU→MaxPool(3,2,1)→Dropout(conv_dropout)→
    Conv(2w)→ReLU→Conv(2w)→ReLU→MaxPool(3,2,1)→Dropout(conv_dropout)→Flatten→
    Linear(2w·8·8, hidden)→ReLU→Dropout(dropout)→Linear(hidden, num_classes) (head), with biases
    everywhere (the table has no normalisation). On 32x32 input the maps are 32→16→8, so Dense 1
    reads 64·8·8 = 4096 features; 2,168,362 parameters with a 10-class head.

    The table is followed as printed. (Zenke et al.'s Keras code, ganguli-lab/pathint
    ``fig_transfer_cifar/train.py``, pads only Conv 1/3, leaves Conv 2/4 unpadded and pools 2x2,
    giving 64·6·6 = 2304 features; the paper's "95% of the parameters are in the dense layer" fits
    that variant, this one has 96.7%.)

    Options: ``width`` (channels of Conv 1-2; Conv 3-4 have twice as many), ``hidden`` (Dense 1),
    ``conv_dropout`` (after each MaxPool), ``dropout`` (after Dense 1); a rate of 0 omits the layer.
    """
    name = "clnp-cifar-narrow"
    shape = _image_shape(input_shape, name)
    for option, value in (("width", width), ("hidden", hidden), ("num_classes", num_classes)):
        _positive(option, value, name)
    _rate("conv_dropout", conv_dropout, name)
    _rate("dropout", dropout, name)
    size = _Spatial(shape, name)
    layers: list[nn.Module] = []
    in_ch = shape[0]
    for stage, out_ch in enumerate((width, 2 * width), start=1):
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
                   nn.MaxPool2d(3, stride=2, padding=1), *_dropout(conv_dropout)]
        size.apply(f"MaxPool {stage}", 3, 2, 1)
        in_ch = out_ch
    layers += [nn.Flatten(), nn.Linear(in_ch * size.area, hidden), nn.ReLU(), *_dropout(dropout),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def clnp_cifar_wide(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                    width: int = 128) -> nn.Sequential:
    """CLNP's wide single-head all-convolutional split CIFAR-10/100 network (paper Table 3).

    Paper Table 3 ("Convolutions 1-5 are followed by BatchNorm then ReLU activation")::

        Layer            Chan.  Ker.  Str.  Pad.
        32x32 input      3
        Conv 1           128    3x3   1     1
        Conv 2           256    3x3   2     0
        Conv 3           512    3x3   1     0
        Conv 4           1024   3x3   2     1
        Conv 5           2048   3x3   1     0
        Conv 6           10     3x3   1     0
        AvgPool

    Built as [Conv(bias=False)→BatchNorm2d→ReLU] for Conv 1-5 with the table's channels (``width``
    times 1, 2, 4, 8, 16), strides and paddings; maps 32→32→15→13→7→5. No dropout (the table has
    none).

    Deviations, both keeping the function class:

    * Conv 6 + global AvgPool is built as ``AvgPool2d(k, stride=1)`` → Flatten →
      ``Linear(16w·3·3, num_classes)`` with ``k`` = Conv 6's output size (3 on 32x32 input), because
      the engine needs a final ``nn.Linear`` head. The two are the same map: averaging a 3x3
      convolution's outputs over its k x k positions equals applying the 3x3 kernel to the k x k
      box averages of its input, so the Linear's weight reshaped to (num_classes, 16w, 3, 3) *is*
      Conv 6's kernel (same parameter count, 184,330 for 10 classes).
    * The paper does not say whether Conv 1-5 have biases; they are left out because each feeds a
      BatchNorm whose shift makes a bias redundant. BatchNorm tracks running statistics.

    25,263,242 parameters with a 10-class head. Option: ``width`` (Conv 1's channels).
    """
    name = "clnp-cifar-wide"
    shape = _image_shape(input_shape, name)
    _positive("width", width, name)
    _positive("num_classes", num_classes, name)
    size = _Spatial(shape, name)
    layers: list[nn.Module] = []
    in_ch = shape[0]
    for i, (stride, padding) in enumerate(((1, 1), (2, 0), (1, 0), (2, 1), (1, 0))):
        out_ch = width * 2 ** i
        layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding, bias=False),
                   nn.BatchNorm2d(out_ch), nn.ReLU()]
        size.apply(f"Conv {i + 1}", 3, stride, padding)
        in_ch = out_ch
    conv5_hw = size.hw
    size.apply("Conv 6", 3)
    pool = size.hw  # Conv 6's output size, averaged over globally
    layers += [nn.AvgPool2d(pool, stride=1), nn.Flatten(),
               nn.Linear(in_ch * (conv5_hw[0] - pool[0] + 1) * (conv5_hw[1] - pool[1] + 1),
                         num_classes)]
    return nn.Sequential(*layers)


# --- GPM (Saha et al. 2021) / WSN (Kang et al. 2022) ----------------------------------------------

def alexnet_like(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                 conv_dropout: float = 0.2, dropout: float = 0.5, batch_norm: bool = True,
                 bn_affine: bool = True) -> nn.Sequential:
    """The 5-layer AlexNet-like CIFAR-100 network of GPM and WSN.

    Source: ``AlexNet`` in sahagobinda/GPM ``main_cifar100.py`` (the same layers as
    ``GPMAlexNet_norm`` / ``SubnetAlexNet_norm`` in ihaeyong/WSN ``networks/alexnet.py``)::

        Conv 64  4x4 (no bias) → BN → ReLU → Dropout 0.2 → MaxPool 2x2     32→29→14
        Conv 128 3x3 (no bias) → BN → ReLU → Dropout 0.2 → MaxPool 2x2     14→12→6
        Conv 256 2x2 (no bias) → BN → ReLU → Dropout 0.5 → MaxPool 2x2      6→5→2
        Flatten (256·2·2 = 1024)
        FC 2048 (no bias) → BN1d → ReLU → Dropout 0.5
        FC 2048 (no bias) → BN1d → ReLU → Dropout 0.5
        FC num_classes (no bias)  ← head

    Convolutions are unpadded, stride 1. 6,528,896 parameters with a 10-class head (GPM).

    Deviation: the references build BatchNorm with ``track_running_stats=False`` (they normalise
    with the test batch's own statistics at evaluation); here BatchNorm tracks running statistics
    and evaluation uses them, since sparsecl never uses test-batch statistics.

    Options: ``conv_dropout`` (after Conv 1-2), ``dropout`` (after Conv 3 and both FCs),
    ``batch_norm=False`` drops the five BatchNorms (WSN's ``SubnetAlexNet``), ``bn_affine=False``
    gives them no scale/shift (WSN's ``SubnetAlexNet_norm``: 6,519,808 parameters).
    """
    name = "alexnet-like"
    shape = _image_shape(input_shape, name)
    _positive("num_classes", num_classes, name)
    _rate("conv_dropout", conv_dropout, name)
    _rate("dropout", dropout, name)
    size = _Spatial(shape, name)

    def norm(kind: type[nn.Module], n: int) -> list[nn.Module]:
        return [kind(n, affine=bn_affine)] if batch_norm else []

    layers: list[nn.Module] = []
    in_ch = shape[0]
    for i, (out_ch, kernel, p) in enumerate(((64, 4, conv_dropout), (128, 3, conv_dropout),
                                             (256, 2, dropout)), start=1):
        size.apply(f"Conv {i}", kernel)
        size.apply(f"MaxPool {i}", 2, 2)
        layers += [nn.Conv2d(in_ch, out_ch, kernel, bias=False), *norm(nn.BatchNorm2d, out_ch),
                   nn.ReLU(), *_dropout(p), nn.MaxPool2d(2)]
        in_ch = out_ch
    layers.append(nn.Flatten())
    features = in_ch * size.area
    for _ in range(2):
        layers += [nn.Linear(features, 2048, bias=False), *norm(nn.BatchNorm1d, 2048), nn.ReLU(),
                   *_dropout(dropout)]
        features = 2048
    layers.append(nn.Linear(features, num_classes, bias=False))
    return nn.Sequential(*layers)


# --- ResNet-18 ------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv3x3(stride)→BN→ReLU→conv3x3→BN, plus the input
    (identity) or, when the stride or width changes, a 1x1 conv (stride, no bias)→BN of it; then
    ReLU. Convolutions have no bias (each feeds a BatchNorm)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, bn_affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes, affine=bn_affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem conv→BN→ReLU, four stages of ``BasicBlock`` with
    widths w, 2w, 4w, 8w and strides 1, 2, 2, 2, ``AvgPool2d(pool)``, flatten, ``Linear`` head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int, pool: int,
                 blocks: Sequence[int], head_bias: bool, bn_affine: bool, model: str):
        super().__init__()
        shape = _image_shape(input_shape, model)
        _positive("width", width, model)
        _positive("num_classes", num_classes, model)
        size = _Spatial(shape, model)
        self.conv1 = nn.Conv2d(shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, affine=bn_affine)
        in_planes = width
        stages = []
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            planes = width * 2 ** i
            size.apply(f"stage {i + 1}", 3, stride, 1)
            stages.append(nn.Sequential(*(BasicBlock(in_planes if j == 0 else planes, planes,
                                                     stride if j == 0 else 1, bn_affine)
                                          for j in range(n))))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        size.apply("the final average pooling", pool, pool)
        self.pool = nn.AvgPool2d(pool)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_planes * size.area, num_classes, bias=head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))


def reduced_resnet18(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                     width: int = 20, bn_affine: bool = True) -> ResNet:
    """Reduced ResNet-18 of GPM and WSN (GPM's 5-datasets / WSN's ResNet-18 experiments).

    Source: ``ResNet18(taskcla, 20)`` in sahagobinda/GPM ``main_five_dataset.py`` (same layers as
    ``GPMResNet18`` / ``SubnetResNet18`` in ihaeyong/WSN ``networks/resnet18.py``)::

        Conv 3x3, nf, stride 1, pad 1 (no bias) → BN → ReLU           32x32
        Stage 1: 2 x BasicBlock(nf),  stride 1                        32x32
        Stage 2: 2 x BasicBlock(2nf), stride 2                        16x16
        Stage 3: 2 x BasicBlock(4nf), stride 2                         8x8
        Stage 4: 2 x BasicBlock(8nf), stride 2                         4x4
        AvgPool 2x2 → Flatten (8nf·2·2 = 640 for nf = 20)
        Linear(640, num_classes, no bias)  ← head

    nf = ``width`` = 20. Note the pooling is a 2x2 average (not global), so on 32x32 input the
    head reads 4·8nf features, as in GPM. 1,099,540 parameters with a 10-class head.

    Deviation: the references build BatchNorm with ``track_running_stats=False`` (test-batch
    statistics at evaluation); here BatchNorm tracks running statistics and evaluation uses them,
    since sparsecl never uses test-batch statistics. ``bn_affine=False`` gives the BatchNorms no
    scale/shift, as WSN's ``SubnetResNet18`` (GPM's have them).
    """
    return ResNet(input_shape, num_classes, width, pool=2, blocks=(2, 2, 2, 2), head_bias=False,
                  bn_affine=bn_affine, model="reduced-resnet18")


def resnet18(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
             width: int = 64) -> ResNet:
    """Standard CIFAR ResNet-18, as ``ResNet18()`` in kuangliu/pytorch-cifar ``models/resnet.py``::

        Conv 3x3, 64, stride 1, pad 1 (no bias) → BN → ReLU           32x32
        Stages of 2 x BasicBlock: 64 (stride 1), 128 (2), 256 (2), 512 (2)   → 4x4
        AvgPool 4x4 → Flatten (512)
        Linear(512, num_classes) (with bias)  ← head

    11,173,962 parameters with a 10-class head. Option: ``width`` (stem/stage-1 channels; 64).
    """
    return ResNet(input_shape, num_classes, width, pool=4, blocks=(2, 2, 2, 2), head_bias=True,
                  bn_affine=True, model="resnet18")


# --- Vision Transformer (Dosovitskiy et al. 2021) at CIFAR scale --------------------------------

class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block (ViT, Dosovitskiy et al. 2021, Eq. 2-3)::

        x = x + MSA(LN(x))          nn.MultiheadAttention, batch_first
        x = x + MLP(LN(x))          Linear(dim, mlp_dim) → GELU → Dropout → Linear(mlp_dim, dim) → Dropout
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=nn.GELU(), drop1=nn.Dropout(dropout),
                                             fc2=nn.Linear(mlp_dim, dim), drop2=nn.Dropout(dropout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer for CIFAR-sized images: the design of "An Image is Worth 16x16
    Words: Transformers for Image Recognition at Scale" (Dosovitskiy et al., ICLR 2021, Sec. 3.1,
    Eq. 1-4) at CIFAR scale (4x4 patches of a 32x32 image, as the CIFAR ViTs trained from
    scratch do)::

        patch embedding   Conv2d(C, dim, patch, stride=patch) → (N, P, dim), P = (H/patch)·(W/patch)
        [class token; patches] + position embedding (1, P + 1, dim) → Dropout
        depth x EncoderBlock (pre-norm: LN → multi-head self-attention, LN → MLP with GELU)
        LayerNorm → the class token's features → Linear head

    The class token and the position embedding are marked per task (``sparsecl_per_task``):
    weight-level methods give every task its own copy, as they do for the LayerNorm parameters
    and the biases. With the defaults (width 192, depth 6, 3 heads, MLP 384) and a 10-class head,
    1,806,538 parameters."""

    sparsecl_per_task = ("cls_token", "pos_embed")

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        name = "vit"
        shape = _image_shape(input_shape, name)
        for option, value in (("patch_size", patch_size), ("width", dim), ("depth", depth), ("heads", heads),
                              ("mlp_dim", mlp_dim), ("num_classes", num_classes)):
            _positive(option, value, name)
        _rate("dropout", dropout, name)
        if shape[1] % patch_size or shape[2] % patch_size:
            raise ConfigError(f"{name}: input_shape {shape} is not a whole number of {patch_size}x{patch_size} "
                              "patches (patch_size)")
        if dim % heads:
            raise ConfigError(f"{name}: width {dim} is not divisible by heads {heads}")
        patches = (shape[1] // patch_size) * (shape[2] // patch_size)
        self.patch_embed = nn.Conv2d(shape[0], dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.drop(x))
        return self.head(self.norm(x)[:, 0])


def vit(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, width: int = 192, depth: int = 6,
        heads: int | None = None, mlp_dim: int | None = None, patch_size: int = 4, dropout: float = 0.0) -> ViT:
    """``ViT`` (see the class): options ``width`` (the embedding size, 192; ``--width``),
    ``depth`` (6 blocks), ``heads`` (default ``width // 64``, at least 1: 64 features per head),
    ``mlp_dim`` (default ``2 · width``), ``patch_size`` (4) and ``dropout`` (0; ``--dropout``)."""
    _positive("width", width, "vit")
    heads = max(1, width // 64) if heads is None else heads
    return ViT(input_shape, num_classes, patch_size, width, depth, heads, 2 * width if mlp_dim is None else mlp_dim,
               dropout)


# --- MobileNetV2 (Sandler et al. 2018) at CIFAR scale ---------------------------------------------

def _conv_bn(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = OrderedDict(conv=nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         bn=nn.BatchNorm2d(out))
    if act:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual block (Sandler et al. 2018, Table 1): 1x1 expansion to
    ``t·inp`` channels → BN → ReLU6 (left out when t = 1), 3x3 depthwise convolution (stride s)
    → BN → ReLU6, 1x1 linear projection → BN; plus the input when s = 1 and the widths match."""

    def __init__(self, inp: int, out: int, stride: int, expansion: int):
        super().__init__()
        hidden = inp * expansion
        self.expand = _conv_bn(inp, hidden, 1) if expansion != 1 else None
        self.dw = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, out, 1, act=False)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x) if self.expand is not None else x))
        return x + out if self.residual else out


#: MobileNetV2's stages (t, c, n, s) of Table 2; the CIFAR variant keeps stride 1 in the stem and
#: the second stage (as kuangliu/pytorch-cifar's MobileNetV2), so 32x32 maps shrink to 4x4.
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


def _round_channels(c: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never 10% below ``c`` (the reference
    implementation's ``_make_divisible``)."""
    out = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * c else out


class MobileNetV2(nn.Module):
    """MobileNetV2 ("MobileNetV2: Inverted Residuals and Linear Bottlenecks", Sandler et al.,
    CVPR 2018) for CIFAR-sized images::

        Conv 3x3, 32·m, stride 1 → BN → ReLU6
        inverted residual stages (t, c, n, s) = MOBILENETV2_STAGES, channels c·m
        Conv 1x1, max(1280, 1280·m) → BN → ReLU6 → global average pool → Flatten → Dropout → Linear

    ``multiplier`` (m, the paper's width multiplier) scales every layer's channels (rounded to
    multiples of 8); ``dropout`` precedes the head. Depthwise convolutions have
    ``groups = channels``; the neuron-level methods trace each one as coupled with the layer that
    feeds it. 2,236,682 parameters with m = 1 and a 10-class head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, multiplier: float, dropout: float):
        super().__init__()
        name = "mobilenetv2"
        shape = _image_shape(input_shape, name)
        _positive("num_classes", num_classes, name)
        _rate("dropout", dropout, name)
        size = _Spatial(shape, name)
        stem = _round_channels(32 * multiplier)
        self.stem = _conv_bn(shape[0], stem, 3)
        size.apply("the stem", 3, 1, 1)
        blocks, inp = [], stem
        for t, c, n, s in MOBILENETV2_STAGES:
            out = _round_channels(c * multiplier)
            for i in range(n):
                stride = s if i == 0 else 1
                size.apply(f"a stride-{stride} depthwise convolution", 3, stride, 1)
                blocks.append(InvertedResidual(inp, out, stride, t))
                inp = out
        self.blocks = nn.Sequential(*blocks)
        last = _round_channels(1280 * max(1.0, multiplier))
        self.last = _conv_bn(inp, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.head(self.drop(self.flatten(self.pool(x))))


def mobilenetv2(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, width: int = 32,
                dropout: float = 0.2) -> MobileNetV2:
    """``MobileNetV2`` (see the class) with the stem's ``width`` channels (32; ``--width``):
    the width multiplier is ``width / 32`` (``--width 8``: 0.25). ``dropout`` before the head
    (0.2; ``--dropout``)."""
    _positive("width", width, "mobilenetv2")
    return MobileNetV2(input_shape, num_classes, width / 32, dropout)


# --- registry -------------------------------------------------------------------------------------

def _mlp(input_shape: Sequence[int], num_classes: int = 10, *, hidden: Sequence[int] = (2000, 2000),
         dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """``mlp`` in the common ``builder(input_shape, num_classes, **options)`` convention."""
    if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
        raise ConfigError(f"mlp: hidden widths must be positive integers, got {tuple(hidden)}")
    _positive("num_classes", num_classes, "mlp")
    if not isinstance(bias, bool):
        raise ConfigError(f"mlp: bias must be True or False, got {bias!r}")
    return mlp(input_shape, hidden, num_classes, dropout, bias)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "clnp-cifar-narrow": clnp_cifar_narrow,
    "clnp-cifar-wide": clnp_cifar_wide,
    "alexnet-like": alexnet_like,
    "reduced-resnet18": reduced_resnet18,
    "resnet18": resnet18,
    "vit": vit,
    "mobilenetv2": mobilenetv2,
}


def build(name: str, input_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """``MODELS[name](input_shape, num_classes, **options)``, refusing an unknown model name or an
    option the builder does not take with a ``ConfigError`` that names it."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    builder = MODELS[name]
    accepted = [p.name for p in inspect.signature(builder).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
                          f"its options are {', '.join(accepted) or 'none'}")
    return builder(input_shape, num_classes, **options)

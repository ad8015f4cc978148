"""The reference CIFAR models: shapes, parameter counts, fx-traceability and the head contract."""

import pytest
import torch
import torch.fx as fx
from torch import nn

from sparsecl.errors import ConfigError
from sparsecl.models import MODELS, build, clnp_cifar_wide, mlp


# Parameter counts worked out by hand from each architecture (10-class head, 3x32x32 input);
# never from the models' own code. conv(i, o, k) = i·o·k² weights, BN(n) = 2n (scale, shift).

def _block(cin: int, cout: int, stride: int) -> int:
    """BasicBlock: two bias-free 3x3 convs + 2 BN, plus a 1x1 conv + BN shortcut on change."""
    shortcut = cin * cout + 2 * cout if stride != 1 or cin != cout else 0
    return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout + shortcut


def _resnet_body(nf: int) -> int:
    stem = 3 * nf * 9 + 2 * nf
    stages = 0
    cin = nf
    for i, stride in enumerate((1, 2, 2, 2)):
        cout = nf * 2 ** i
        stages += _block(cin, cout, stride) + _block(cout, cout, 1)
        cin = cout
    return stem + stages


def _vit(d: int = 192, depth: int = 6, m: int = 384, patches: int = 64) -> int:
    """Patch embedding (4x4 conv, 3 channels) + class token + position embedding (P + 1 rows),
    per block LN, attention (packed q/k/v 3d x d + 3d, output d x d + d), LN, MLP d→m→d, final
    LN, head."""
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    return (3 * 16 * d + d) + d + (patches + 1) * d + depth * block + 2 * d + (d * 10 + 10)


def _mobilenetv2() -> int:
    """Sandler et al. 2018, Table 2 at width 1: bias-free convs + BN (2n), depthwise 3x3 kernels
    of 9 weights per channel, expansion t, 1x1 projection; 1280-channel 1x1 conv, head."""
    total, cin = 3 * 32 * 9 + 64, 32
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for _ in range(n):
            hidden = cin * t
            expand = cin * hidden + 2 * hidden if t != 1 else 0
            total += expand + (hidden * 9 + 2 * hidden) + (hidden * c + 2 * c)
            cin = c
    return total + (320 * 1280 + 2 * 1280) + (1280 * 10 + 10)


EXPECTED = {
    # Table 2: four 3x3 convs with bias; 32→16→8 after the two 3x3/2/pad-1 max-pools.
    "clnp-cifar-narrow": (3 * 32 * 9 + 32) + (32 * 32 * 9 + 32) + (32 * 64 * 9 + 64)
                         + (64 * 64 * 9 + 64) + (64 * 8 * 8 * 512 + 512) + (512 * 10 + 10),
    # Table 3: bias-free convs + BN; Conv 6 (2048→10, 3x3, with bias) as the Linear head.
    "clnp-cifar-wide": (3 * 128 * 9 + 256) + (128 * 256 * 9 + 512) + (256 * 512 * 9 + 1024)
                       + (512 * 1024 * 9 + 2048) + (1024 * 2048 * 9 + 4096) + (2048 * 9 * 10 + 10),
    # GPM AlexNet: bias-free convs 4x4/3x3/2x2 + BN, 32→29→14→12→6→5→2, FCs 1024→2048→2048 + BN.
    "alexnet-like": (3 * 64 * 16 + 128) + (64 * 128 * 9 + 256) + (128 * 256 * 4 + 512)
                    + (256 * 2 * 2 * 2048 + 4096) + (2048 * 2048 + 4096) + 2048 * 10,
    # GPM reduced ResNet-18, nf = 20; 2x2 avg pool of the 4x4 map → 160·4 = 640, bias-free head.
    "reduced-resnet18": _resnet_body(20) + 640 * 10,
    # kuangliu ResNet-18; 4x4 avg pool → 512, head with bias.
    "resnet18": _resnet_body(64) + 512 * 10 + 10,
    "mlp": 3072 * 2000 + 2000 + 2000 * 2000 + 2000 + 2000 * 10 + 10,
    "vit": _vit(),
    "mobilenetv2": _mobilenetv2(),
}
LITERAL = {  # the same sums written out, as quoted in the docstrings
    "clnp-cifar-narrow": 2_168_362,
    "clnp-cifar-wide": 25_263_242,
    "alexnet-like": 6_528_896,
    "reduced-resnet18": 1_099_540,
    "resnet18": 11_173_962,
    "mlp": 10_168_010,
    "vit": 1_806_538,
    "mobilenetv2": 2_236_682,
}
CIFAR_MODELS = [name for name in MODELS if name != "mlp"]
UNIT_GRAPH_MODELS = [name for name in MODELS if name != "vit"]  # the ViT is for the weight-level methods


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names():
    assert list(MODELS) == ["mlp", "clnp-cifar-narrow", "clnp-cifar-wide", "alexnet-like",
                            "reduced-resnet18", "resnet18", "vit", "mobilenetv2"]
    assert EXPECTED == LITERAL


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_shape_and_parameter_count(name):
    torch.manual_seed(0)
    model = MODELS[name]((3, 32, 32), 10)
    assert _params(model) == EXPECTED[name]
    for mode in (model.train, model.eval):
        mode()
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert MODELS[name]((3, 32, 32), 7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", UNIT_GRAPH_MODELS)
def test_fx_traces_and_ends_with_a_linear_head(name):
    model = MODELS[name]((3, 32, 32), 10).eval()
    gm = fx.symbolic_trace(model)
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    head = output.args[0]
    assert head.op == "call_module" and type(gm.get_submodule(head.target)) is nn.Linear
    assert list(head.users) == [output]  # the logits feed nothing else
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert modules[-1] is head
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))
    # Only the constructs the engine follows: no cat, no in-place ops, no functional dropout.
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert getattr(node.target, "__name__", "") in {"relu", "add"}, node.format_node()
        assert node.op != "call_method", node.format_node()


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_batchnorm_tracks_running_stats_and_dropout_is_a_module(name):
    model = MODELS[name]((3, 32, 32), 10)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.track_running_stats for m in norms)
    # plain or depthwise convolutions only: what the unit graph traces
    assert all(m.groups in (1, m.in_channels) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_mlp_layers_have_names_a_reader_knows():
    model = mlp((1, 28, 28), (100, 50), 10, dropout=0.1)
    assert [n for n, _ in model.named_children()] == ["flatten", "fc1", "relu1", "drop1", "fc2", "relu2", "drop2",
                                                      "head"]


def test_vit_layers():
    """Dosovitskiy et al. 2021 at CIFAR scale: 4x4 patches, class token, pre-norm blocks with
    nn.MultiheadAttention and GELU, LayerNorm, head on the class token."""
    model = build("vit", (3, 32, 32), 10)
    assert model.patch_embed.kernel_size == (4, 4) and model.patch_embed.stride == (4, 4)
    assert model.pos_embed.shape == (1, 65, 192) and model.cls_token.shape == (1, 1, 192)
    assert len(model.blocks) == 6 and model.blocks[0].attn.num_heads == 3
    assert isinstance(model.blocks[0].mlp.act, nn.GELU) and model.blocks[0].mlp.fc1.out_features == 384
    assert model.sparsecl_per_task == ("cls_token", "pos_embed")
    small = build("vit", (3, 32, 32), 10, width=64, depth=2)
    assert small.blocks[0].attn.num_heads == 1 and len(small.blocks) == 2
    assert _params(small) == _vit(64, 2, 128)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fx.symbolic_trace(small.eval())(x), small(x))


def test_mobilenetv2_layers():
    model = build("mobilenetv2", (3, 32, 32), 10)
    assert [b.dw.conv.stride[0] for b in model.blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert [b.residual for b in model.blocks].count(True) == 10
    assert model.blocks[0].expand is None and model.blocks[1].expand.conv.out_channels == 96
    assert all(b.dw.conv.groups == b.dw.conv.in_channels == b.dw.conv.out_channels for b in model.blocks)
    assert isinstance(model.blocks[1].dw.act, nn.ReLU6) and not hasattr(model.blocks[1].project, "act")
    quarter = build("mobilenetv2", (3, 32, 32), 10, width=8)  # width multiplier 8/32
    assert quarter.stem[0].out_channels == 8 and quarter.head.in_features == 1280


def test_layer_lists():
    narrow = MODELS["clnp-cifar-narrow"]((3, 32, 32), 10)
    convs = [m for m in narrow if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == \
        [(32, (3, 3), (1, 1), (1, 1))] * 2 + [(64, (3, 3), (1, 1), (1, 1))] * 2
    pools = [m for m in narrow if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 2
    assert [m.p for m in narrow if isinstance(m, nn.Dropout)] == [0.25, 0.25, 0.5]
    assert [m.out_features for m in narrow if isinstance(m, nn.Linear)] == [512, 10]

    wide = MODELS["clnp-cifar-wide"]((3, 32, 32), 10)
    convs = [m for m in wide if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0], c.padding[0]) for c in convs] == \
        [(128, 1, 1), (256, 2, 0), (512, 1, 0), (1024, 2, 1), (2048, 1, 0)]
    assert not any(isinstance(m, nn.Dropout) for m in wide.modules())

    alex = MODELS["alexnet-like"]((3, 32, 32), 10)
    convs = [m for m in alex if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(64, 4), (128, 3), (256, 2)]
    assert all(m.bias is None for m in alex if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert [m.p for m in alex if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.5, 0.5, 0.5]
    assert [m.in_features for m in alex if isinstance(m, nn.Linear)] == [1024, 2048, 2048]

    reduced = MODELS["reduced-resnet18"]((3, 32, 32), 10)
    assert reduced.conv1.out_channels == 20 and reduced.conv1.stride == (1, 1)
    assert [s[0].conv1.out_channels for s in (reduced.layer1, reduced.layer2, reduced.layer3,
                                              reduced.layer4)] == [20, 40, 80, 160]
    assert reduced.linear.in_features == 640 and reduced.linear.bias is None
    assert reduced.layer1[0].shortcut is None and reduced.layer2[0].shortcut is not None
    assert MODELS["resnet18"]((3, 32, 32), 10).linear.in_features == 512


def test_wide_head_equals_conv6_then_global_avgpool():
    """Table 3's Conv 6 (3x3, 10 channels) + global AvgPool is exactly the built AvgPool2d(3, 1)
    → Flatten → Linear head, with the Linear's weight read as Conv 6's kernel."""
    torch.manual_seed(0)
    model = clnp_cifar_wide((3, 32, 32), 10, width=4).eval()
    body, head = model[:-3], model[-1]
    conv6 = nn.Conv2d(64, 10, 3)
    with torch.no_grad():
        conv6.weight.copy_(head.weight.view(10, 64, 3, 3))
        conv6.bias.copy_(head.bias)
    x = torch.randn(2, 3, 32, 32)
    features = body(x)
    assert features.shape == (2, 64, 5, 5)
    reference = conv6(features).mean(dim=(2, 3))
    torch.testing.assert_close(model(x), reference)


def test_other_input_shapes():
    assert MODELS["clnp-cifar-narrow"]((1, 28, 28), 10)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    wide = MODELS["clnp-cifar-wide"]((3, 40, 40), 5, width=8)
    assert wide(torch.randn(2, 3, 40, 40)).shape == (2, 5)
    assert MODELS["alexnet-like"]((3, 64, 64), 4)(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    assert MODELS["reduced-resnet18"]((3, 64, 64), 3, width=4)(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_variants():
    # WSN's SubnetAlexNet_norm: BatchNorm without scale/shift (9,088 fewer parameters).
    assert _params(build("alexnet-like", (3, 32, 32), 10, bn_affine=False)) == LITERAL["alexnet-like"] - 9088
    no_bn = build("alexnet-like", (3, 32, 32), 10, batch_norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in no_bn.modules())
    narrow = build("clnp-cifar-narrow", (3, 32, 32), 10, conv_dropout=0.0, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in narrow)
    assert build("mlp", (1, 28, 28), 10, hidden=(100,), dropout=0.1)[3].p == 0.1
    # mlp keeps its positional convention
    assert _params(mlp((1, 28, 28), (100, 100), 2)) == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 2 + 2


@pytest.mark.parametrize("name, shape, options, option", [
    ("clnp-cifar-narrow", (3, 32, 32), {"width": 0}, "width"),
    ("clnp-cifar-narrow", (3, 32, 32), {"hidden": -1}, "hidden"),
    ("clnp-cifar-narrow", (3, 32, 32), {"dropout": 1.0}, "dropout"),
    ("clnp-cifar-narrow", (32, 32), {}, "input_shape"),
    ("clnp-cifar-wide", (3, 16, 16), {}, "input_shape"),
    ("clnp-cifar-wide", (3, 32, 32), {"width": 0}, "width"),
    ("alexnet-like", (3, 16, 16), {}, "input_shape"),
    ("alexnet-like", (3, 32, 32), {"conv_dropout": -0.1}, "conv_dropout"),
    ("reduced-resnet18", (3, 8, 8), {}, "input_shape"),
    ("reduced-resnet18", (3, 32, 32), {"width": 0}, "width"),
    ("resnet18", (3, 16, 16), {}, "input_shape"),
    ("mlp", (3, 32, 32), {"hidden": (0,)}, "hidden"),
    ("resnet18", (3, 32, 32), {"depth": 34}, "depth"),
    ("vit", (3, 30, 30), {}, "patches"),
    ("vit", (3, 32, 32), {"width": 100, "heads": 3}, "heads"),
    ("vit", (3, 32, 32), {"depth": 0}, "depth"),
    ("mobilenetv2", (3, 32, 32), {"width": 0}, "width"),
])
def test_bad_options_raise_config_error_naming_the_option(name, shape, options, option):
    with pytest.raises(ConfigError, match=option):
        build(name, shape, 10, **options)


def test_bad_num_classes_and_unknown_model():
    with pytest.raises(ConfigError, match="num_classes"):
        build("resnet18", (3, 32, 32), 0)
    with pytest.raises(ConfigError, match="vgg"):
        build("vgg", (3, 32, 32), 10)

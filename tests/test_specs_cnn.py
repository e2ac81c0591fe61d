"""The CNN specs of the catalogue, held to published numbers.

Reference numbers and where they come from:
- torchvision's model documentation (num_params, GFLOPS = conv/linear multiply-adds at
  224x224): AlexNet, VGG-16/19 (+bn), GoogLeNet, ResNet-18...152, Wide ResNet-50-2,
  ResNeXt-50 32x4d. GoogLeNet with its two auxiliary heads (13,004,888) is torchvision's
  model built with aux_logits=True.
- the notes' AlexNet table (227x227 input, one tower): its output volumes, and the
  62,378,344 parameters those layers hold (often quoted as "62.3M").
- WRN-28-10: 36.5M in Zagoruyko & Komodakis, table 4; the exact 36,479,194 is the
  authors' layout, rebuilt below from torch.nn modules.
- CIFAR ResNet-20 (option A): 0.27M in He et al. table 6, exactly 269,722.
- NiN for CIFAR-10: 966,986 for the authors' Caffe layout (see the spec's comment).
The layer names of ResNet-50, VGG-16, GoogLeNet and torchvision's AlexNet are checked
against torch.nn models written here the way torchvision writes them (torchvision is not
installed), so that later issues can load torchvision weights by name.
"""
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import SPECS, cli, compile_spec
from reference.cifar_resnet import CifarResNet
from reference.classic import VGG, AlexNet, WideResNet
from reference.googlenet import GoogLeNet
from reference.resnet import Bottleneck, ResNet
from netdsl import report
from netdsl.errors import NetdslError
from netdsl.lang.elaborate import elaborate

CNN_SPECS = ["alexnet", "alexnet_torchvision", "vgg16", "vgg19", "vgg16_bn", "vgg19_bn", "googlenet",
             "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
             "resnext50_32x4d", "wrn28_10", "nin_cifar10", "resnet20_cifar", "digits_cnn", "fashion_cnn"]


@functools.lru_cache(maxsize=None)
def _cli_json_all():
    """`netdsl compile --json` of every CNN spec, run once, in parallel."""
    def run(name):
        return name, cli("compile", "--json", SPECS / f"{name}.net")
    with ThreadPoolExecutor(4) as ex:
        return dict(ex.map(run, CNN_SPECS))


def cli_json(name):
    r = _cli_json_all()[name]
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------- every spec compiles

@pytest.mark.parametrize("name", CNN_SPECS)
def test_cli_compiles(name):
    r = _cli_json_all()[name]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    # every CNN spec is a classifier trained with cross-entropy on integer labels
    assert out["inputs"]["label"] == {"shape": "[N]", "dtype": "i64"}
    assert any(n["op"] == "cross_entropy" for n in out["nodes"])
    assert "train" in out and out["train"]["optimizer"]["name"] in ("sgd", "adam")


@pytest.mark.parametrize("name", CNN_SPECS)
def test_cli_table(name):
    r = cli("compile", SPECS / f"{name}.net")
    assert r.returncode == 0, r.stderr
    assert "params" in r.stdout


# ---------------------------------------------------------------- parameter counts

PARAMS = [
    ("alexnet", {}, 62_378_344),
    ("alexnet_torchvision", {}, 61_100_840),
    ("vgg16", {}, 138_357_544),
    ("vgg19", {}, 143_667_240),
    ("vgg16_bn", {}, 138_365_992),
    ("vgg19_bn", {}, 143_678_248),
    ("googlenet", {}, 13_004_888),
    ("googlenet", {"aux": False}, 6_624_904),
    ("resnet18", {}, 11_689_512),
    ("resnet34", {}, 21_797_672),
    ("resnet50", {}, 25_557_032),
    ("resnet101", {}, 44_549_160),
    ("resnet152", {}, 60_192_808),
    ("wide_resnet50_2", {}, 68_883_240),
    ("resnext50_32x4d", {}, 25_028_904),
    ("wrn28_10", {}, 36_479_194),
    ("wrn28_10", {"dropout_p": 0.0}, 36_479_194),
    ("nin_cifar10", {}, 966_986),
    ("resnet20_cifar", {}, 269_722),
]


@pytest.mark.parametrize("name,sets,expected", PARAMS, ids=[f"{n}-{s}" if s else n for n, s, _ in PARAMS])
def test_param_count(name, sets, expected):
    assert compile_spec(f"{name}.net", **sets).param_count() == expected


def test_running_statistics_are_buffers_not_parameters():
    g = compile_spec("resnet50.net")
    bn = [n for n in g.nodes if n.op == "bn"]
    buffers = sum(p.shape[0] for p in g.params.values() if p.role == "buffer")
    assert buffers == 2 * sum(n.outputs[0].shape[1] for n in bn)
    assert g.param_count(trainable_only=False) == 25_557_032 + buffers


@pytest.mark.parametrize("name,sets,make", [
    ("resnet20_cifar", {"n": 5}, lambda: CifarResNet(5)),    # ResNet-32
    ("resnet20_cifar", {"n": 9}, lambda: CifarResNet(9)),    # ResNet-56: 0.85M in He et al. table 6
    ("vgg16", {"classes": 10}, lambda: VGG(num_classes=10)),
    ("wrn28_10", {"depth": 16, "widen": 8}, lambda: WideResNet(16, 8)),   # WRN-16-8: 11.0M in the paper
])
def test_overrides_reshape_the_network(name, sets, make):
    assert compile_spec(f"{name}.net", **sets).param_count() == sum(p.numel() for p in make().parameters())


# ---------------------------------------------------------------- multiply-adds

@pytest.mark.parametrize("name,giga", [
    ("resnet50", 4.089), ("vgg16", 15.470), ("alexnet_torchvision", 0.714),
    # further torchvision GFLOPS figures
    ("resnet18", 1.814), ("resnet34", 3.664), ("resnet101", 7.801), ("resnet152", 11.514),
    ("vgg19", 19.632), ("wide_resnet50_2", 11.398), ("resnext50_32x4d", 4.230),
    ("googlenet", 1.498),
])
def test_macs_match_torchvision(name, giga):
    sets = {"aux": False} if name == "googlenet" else {}   # published for the inference model
    macs = int(report.to_json(compile_spec(f"{name}.net", **sets))["macs_per_example"])
    assert round(macs / 1e9, 3) == giga


def test_macs_per_example_in_cli_json():
    assert round(int(cli_json("resnet50")["macs_per_example"]) / 1e9, 3) == 4.089


@pytest.mark.parametrize("name", ["googlenet", "resnet20_cifar", "alexnet", "vgg16_bn", "nin_cifar10"])
def test_only_conv_and_linear_count_macs(name):
    """Pooling, normalisation, elementwise and structural ops count 0, as torchvision's figures."""
    for n in compile_spec(f"{name}.net").nodes:
        assert (n.macs != 0) == (n.op in ("conv", "linear")), (n.path, n.op, n.macs)


# ---------------------------------------------------------------- AlexNet of the notes

# the notes' table: layer -> output volume H x W x C (FC layers: a vector)
ALEXNET_VOLUMES = [
    ("conv1", (55, 55, 96)), ("pool1", (27, 27, 96)), ("norm1", (27, 27, 96)),
    ("conv2", (27, 27, 256)), ("pool2", (13, 13, 256)), ("norm2", (13, 13, 256)),
    ("conv3", (13, 13, 384)), ("conv4", (13, 13, 384)), ("conv5", (13, 13, 256)),
    ("pool3", (6, 6, 256)), ("fc6", (4096,)), ("fc7", (4096,)), ("fc8", (1000,)),
]


@pytest.mark.parametrize("layer,volume", ALEXNET_VOLUMES)
def test_alexnet_volumes(layer, volume):
    g = compile_spec("alexnet.net")
    node = next(n for n in g.nodes if n.path == layer)
    shape = node.outputs[0].shape
    assert str(shape[0]) == "N"
    want = (volume[2], volume[0], volume[1]) if len(volume) == 3 else volume   # NCHW
    assert tuple(shape[1:]) == want
    if layer.startswith("norm"):
        assert node.op == "lrn"


def test_alexnet_input_and_layer_order():
    g = compile_spec("alexnet.net")
    assert g.inputs["image"].shape[1:] == (3, 227, 227)
    order = [n.path for n in g.nodes if n.path in dict(ALEXNET_VOLUMES)]
    assert order == [name for name, _ in ALEXNET_VOLUMES]


# ---------------------------------------------------------------- GoogLeNet auxiliary heads

def test_googlenet_aux_heads_are_train_only():
    g = compile_spec("googlenet.net")
    phase = g.phase_of_nodes()
    aux = [n for n in g.nodes if n.path.startswith(("aux1.", "aux2."))]
    assert {n.path.split(".")[0] for n in aux} == {"aux1", "aux2"}
    assert all(phase[id(n)] == "train" for n in aux)
    # and every node outside the heads and their losses is needed at inference
    aux_losses = {id(l.value) for l in g.losses if l.name != "ce"}
    rest = [n for n in g.nodes if n not in aux and not any(id(o) in aux_losses for o in n.outputs)]
    assert all(phase[id(n)] == "all" for n in rest)
    losses = {l.name: (l.weight, l.phase) for l in g.losses}
    assert losses == {"ce": (1.0, "all"), "aux1": (0.3, "train"), "aux2": (0.3, "train")}
    # the heads hang off inception4a (512 channels) and inception4d (528 channels)
    convs = {n.path: n for n in aux if n.op == "conv"}
    assert convs["aux1.conv.conv"].inputs[0].shape[1:] == (512, 4, 4)
    assert convs["aux2.conv.conv"].inputs[0].shape[1:] == (528, 4, 4)


def test_googlenet_without_aux_has_no_heads():
    g = compile_spec("googlenet.net", aux=False)
    assert [l.name for l in g.losses] == ["ce"]
    assert not any(n.path.startswith("aux") for n in g.nodes)
    assert set(g.phase_of_nodes().values()) == {"all"}


def test_googlenet_cli_reports_train_only_losses():
    out = cli_json("googlenet")
    assert {l["name"]: (l["weight"], l["phase"]) for l in out["losses"]} == {
        "ce": (1.0, "all"), "aux1": (0.3, "train"), "aux2": (0.3, "train")}
    assert {r["phase"] for r in out["nodes"] if r["path"].startswith("aux")} == {"train"}


# ---------------------------------------------------------------- names, against torch.nn

TORCH_REFS = {
    "resnet50": (lambda: ResNet(Bottleneck, [3, 4, 6, 3]), 25_557_032),
    "resnext50_32x4d": (lambda: ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4), 25_028_904),
    "wide_resnet50_2": (lambda: ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=128), 68_883_240),
    "vgg16": (lambda: VGG(), 138_357_544),
    "vgg16_bn": (lambda: VGG(batch_norm=True), 138_365_992),
    "googlenet": (lambda: GoogLeNet(), 13_004_888),
    "alexnet_torchvision": (lambda: AlexNet(), 61_100_840),
    "resnet20_cifar": (lambda: CifarResNet(3), 269_722),
    "wrn28_10": (lambda: WideResNet(28, 10), 36_479_194),
}


@pytest.mark.parametrize("name", sorted(TORCH_REFS))
def test_names_and_shapes_match_torch(name):
    make, count = TORCH_REFS[name]
    ref = make()
    assert sum(p.numel() for p in ref.parameters()) == count   # the reference itself is right
    params = {k: list(p.shape) for k, p in ref.named_parameters()}
    buffers = {k: list(b.shape) for k, b in ref.named_buffers() if not k.endswith("num_batches_tracked")}
    out = cli_json(name)
    assert out["param_tensors"] == params
    assert out["buffers"] == buffers


# ---------------------------------------------------------------- the small trainable CNNs

@pytest.mark.parametrize("name,shape,data", [
    ("digits_cnn", (1, 8, 8), "digits"), ("fashion_cnn", (1, 28, 28), "fashion_mnist")])
def test_small_cnns(name, shape, data):
    g = compile_spec(f"{name}.net")
    assert g.inputs["image"].shape[1:] == shape
    assert g.outputs["logits"].shape[1:] == (10,)
    assert g.train["data"].name == data


# ---------------------------------------------------------------- ops added for these specs

def test_pad_and_adaptive_pool_shapes():
    g = compile_spec("resnet20_cifar.net")
    pads = {n.path: n.outputs[0].shape[1:] for n in g.nodes if n.op == "pad"}
    assert pads == {"layer2.0.shortcut.1": (32, 16, 16), "layer3.0.shortcut.1": (64, 8, 8)}
    assert not any(n.params for n in g.nodes if n.path.endswith(("shortcut.0", "shortcut.1")))


@pytest.mark.parametrize("body,message", [
    ("y = x -> pad(-1, 2)", "pad: attribute 'before' must not be negative"),
    ("y = x -> adaptive_avgpool(16)", "cannot pool a 8x8 input up to 16x16"),
])
def test_new_op_errors_are_positioned(tmp_path, body, message):
    p = tmp_path / "t.net"
    p.write_text(f"network t() {{\n  input x: f32[N, 3, 8, 8]\n  {body}\n  output y\n}}\n")
    with pytest.raises(NetdslError) as e:
        elaborate(str(p))
    assert message in e.value.message
    assert e.value.pos is not None and e.value.pos.line == 3


def test_computed_layer_names(tmp_path):
    p = tmp_path / "t.net"
    p.write_text('network t() {\n  input x: f32[N, 3, 8, 8]\n  y = x\n'
                 '  for i in [0, 2] { y = y -> conv(4, k=1, name="features." + str(i)) }\n  output y\n}\n')
    g, _ = elaborate(str(p))
    assert [n.path for n in g.nodes] == ["features.0", "features.2"]


# ---------------------------------------------------------------- elaboration speed

def test_resnet152_elaboration_time(capsys):
    """Reported, not asserted: elaborating ResNet-152 (after imports are warm; the
    elaborator itself, not a hit in the graph cache)."""
    from netdsl.lang.elaborator import elaborate_uncached
    elaborate_uncached(str(SPECS / "resnet152.net"))
    t0 = time.perf_counter()
    g, _ = elaborate_uncached(str(SPECS / "resnet152.net"))
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nresnet152: elaborated {len(g.nodes)} nodes in {dt * 1000:.0f} ms")
    assert len(g.nodes) > 500

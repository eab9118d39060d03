import re

import torch
import torch.nn as nn

from conftest import ROOT, exp, trains

PER_LAYER = {"conv1 + bn1": 480, "sep_conv1 + bn_sep1": 768, "dil_conv1 + bn_dil1": 9312,
             "conv2 + bn2": 9312, "sep_conv2 + bn_sep2": 1440, "dil_conv2 + bn_dil2": 9312,
             "conv3 + bn3": 18624, "dil_conv3 + bn_dil3": 37056, "gap + fc": 650}
SHAPES = {"conv1 + bn1": (16, 32, 32), "sep_conv1 + bn_sep1": (32, 32, 32),
          "dil_conv1 + bn_dil1": (32, 32, 32), "conv2 + bn2": (32, 16, 16),
          "sep_conv2 + bn_sep2": (32, 16, 16), "dil_conv2 + bn_dil2": (32, 16, 16),
          "conv3 + bn3": (64, 8, 8), "dil_conv3 + bn_dil3": (64, 8, 8), "gap + fc": (10,)}
RECEPTIVE = [3, 5, 9, 11, 15, 23, 27, 67]


def test_parameter_counts_total_and_per_layer():
    model = exp.Net()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 86_954
    assert {name: params for name, _, params, _ in exp.layer_table(model)} == PER_LAYER
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.bias is not None for conv in convs)


def test_a_few_steps_fit_a_batch():
    torch.manual_seed(0)
    model = exp.Net()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.1 * losses[0]


def test_shapes_through_every_block():
    model = exp.Net()
    assert {name: shape for name, shape, _, _ in exp.layer_table(model)} == SHAPES
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_every_block_ends_in_a_relu():
    model = exp.Net().eval()
    later = [conv for conv, _ in model.conv_bn_pairs()][1:] + [model.fc]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for m in later]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert len(inputs) == 8 and all((x >= 0).all() and (x > 0).any() for x in inputs)


def test_receptive_field_grows_past_44_pixels():
    rfs = [rf for _, _, _, rf in exp.layer_table(exp.Net())][:-1]
    assert rfs == RECEPTIVE and rfs[-1] > 44


def test_readme_table_is_the_summary_output():
    readme = (ROOT / "README.md").read_text()
    assert exp.summary_text(exp.Net()) in readme
    assert "86,954" in readme and "201,802" not in readme.replace("claimed 201,802", "")


def test_flops_per_training_image_is_about_115_mflop():
    assert 114e6 < exp.train_flops_per_image(exp.Net()) < 116e6


def test_summary_flag_prints_table_without_touching_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --data-dir, ./data, would be downloaded to
    out = trains(["--summary"])
    assert "Total trainable parameters: 86,954" in out
    assert re.search(r"\| dil_conv3 \+ bn_dil3 \| 64x8x8 \| 37,056 \| 67x67 \|", out)
    assert list(tmp_path.iterdir()) == []

"""Variant -> parameter set S, by module type, on many timm families and on transformers models."""
import pytest
import timm
import torch.nn as nn

from timm_mltp import MLTPConfigError, select_parameters, summarize_selection

ARCHS = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050",
         "efficientnet_cc_b0_4e", "mixnet_s", "vgg11", "regnetx_002", "dm_nfnet_f0", "deit_tiny_distilled_patch16_224",
         "test_byobnet", "test_maxvit", "test_coatnet"]


def owner(model, name):
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return timm.create_model(request.param, pretrained=False, num_classes=7)


def test_conv_and_fc_are_disjoint_and_cover_every_kernel(model):
    conv, fc = select_parameters(model, "conv"), select_parameters(model, "fc")
    assert conv and fc and not set(conv) & set(fc)
    for name, p in model.named_parameters():
        if p.dim() == 4:                        # every 4-d kernel belongs to a convolution
            assert name in conv, name
        if p.dim() == 2 and p.shape[0] == 7:    # the 7-class output layer is fully connected
            assert name in fc, name
    assert select_parameters(model, "full") == [n for n, p in model.named_parameters() if p.requires_grad]
    assert select_parameters(model, "none") == []


def test_conv_and_fc_on_known_architectures():
    """Counted by hand from the architectures' definitions."""
    resnet = timm.create_model("resnet18")
    conv = select_parameters(resnet, "conv")
    # the stem, 2 per basic block (8 blocks) and 3 downsample projections; no conv biases
    assert len(conv) == 1 + 16 + 3 and all(n.endswith(("conv1.weight", "conv2.weight", "downsample.0.weight"))
                                           for n in conv)
    assert select_parameters(resnet, "fc") == ["fc.weight", "fc.bias"]
    vit = timm.create_model("vit_tiny_patch16_224")
    assert select_parameters(vit, "conv") == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    fc = select_parameters(vit, "fc")
    # 12 blocks x (qkv, proj, mlp.fc1, mlp.fc2) x (weight, bias), and the head
    assert len(fc) == 12 * 4 * 2 + 2 and fc[:2] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"]
    assert fc[-2:] == ["head.weight", "head.bias"]


def test_head_is_the_timm_classifier(model):
    head = select_parameters(model, "head")
    classifier = model.pretrained_cfg["classifier"]
    classifier = (classifier,) if isinstance(classifier, str) else classifier
    expected = [n for n, _ in model.named_parameters() if any(n.startswith(c + ".") for c in classifier)]
    assert head == expected and head
    # the head's output layer is the one that maps to num_classes
    assert any(p.shape[0] == 7 for n, p in model.named_parameters() if n in head)


def test_special_convolutions_are_found():
    cond = timm.create_model("efficientnet_cc_b0_4e")
    cond_names = [n + "." + p for n, m in cond.named_modules() if type(m).__name__ == "CondConv2d"
                  for p, _ in m.named_parameters(recurse=False)]
    assert cond_names and set(cond_names) <= set(select_parameters(cond, "conv"))
    mixed = timm.create_model("mixnet_s")
    mixed_names = [n for n, _ in mixed.named_parameters() if any(
        n.startswith(m + ".") for m, mod in mixed.named_modules() if type(mod).__name__ == "MixedConv2d")]
    assert mixed_names and set(mixed_names) <= set(select_parameters(mixed, "conv"))
    distilled = timm.create_model("deit_tiny_distilled_patch16_224")
    assert {"head.weight", "head_dist.weight"} <= set(select_parameters(distilled, "head"))


def test_patterns_select_by_name_and_module_prefix():
    model = timm.create_model("resnet18")
    chosen = select_parameters(model, "layer4.*,fc.*")
    assert chosen == [n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))]
    assert select_parameters(model, "layer4, fc") == chosen
    assert select_parameters(model, "*.bn1.weight") == [n for n, _ in model.named_parameters()
                                                        if n.endswith(".bn1.weight")]
    # layer4: 9 tensors in its first block (2 convs, 2 BNs, the downsample conv and BN), 6 in its second; fc: 2.
    # parameters: 3,673,088 + 4,720,640 in layer4 and 513,000 in fc, of resnet18's 11,689,512
    assert summarize_selection(model, chosen).startswith(
        "17 tensors, 8,906,728 of 11,689,512 trainable parameters (76.2%): layer4.0.conv1.*, layer4.0.bn1.*")


def test_frozen_parameters_are_never_selected():
    model = timm.create_model("resnet18")
    for p in model.layer4.parameters():
        p.requires_grad_(False)
    assert not any(n.startswith("layer4.") for n in select_parameters(model, "conv"))
    with pytest.raises(MLTPConfigError, match="layer4"):
        select_parameters(model, "layer4.*")


def test_errors_name_model_and_patterns():
    model = timm.create_model("resnet18")
    with pytest.raises(MLTPConfigError, match=r"'layer5\.\*' matches no trainable parameter of ResNet \(resnet18\)"):
        select_parameters(model, "layer5.*")
    with pytest.raises(MLTPConfigError, match="did you mean variant 'conv'"):
        select_parameters(model, "cnv")
    with pytest.raises(MLTPConfigError, match="selects no trainable parameter of Sequential: looked for convolution"):
        select_parameters(nn.Sequential(nn.Linear(2, 2)), "conv")
    with pytest.raises(MLTPConfigError, match="non-empty string"):
        select_parameters(model, "")


def test_transformers_models():
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    fc = select_parameters(bert, "fc")
    assert all(isinstance(owner(bert, n), nn.Linear) for n in fc) and "classifier.weight" in fc
    assert select_parameters(bert, "head") == ["classifier.weight", "classifier.bias"]
    with pytest.raises(MLTPConfigError, match="BertForSequenceClassification"):
        select_parameters(bert, "conv")
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, num_labels=3))
    fc = select_parameters(gpt2, "fc")
    conv1d = [n for n, _ in gpt2.named_parameters() if type(owner(gpt2, n)).__name__ == "Conv1D"]
    assert conv1d and set(conv1d) <= set(fc) and "score.weight" in fc
    assert select_parameters(gpt2, "head") == ["score.weight"]
    with pytest.raises(MLTPConfigError):      # GPT-2's Conv1D is a linear layer, not a convolution
        select_parameters(gpt2, "conv")


def test_multihead_attention_projection_counts_as_fc():
    mha = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    fc = select_parameters(mha, "fc")
    assert "self_attn.in_proj_weight" in fc and "self_attn.out_proj.weight" in fc and "linear1.weight" in fc

#!/usr/bin/env python3
"""Tiny random torchvision classifiers, test images, and torchvision's and Pillow's own
answers for them: the fixtures the image handler is held to (issue 35).

Writes handlers/tests/fixtures/images/:
  inputs/         small synthetic images in each format the handler decodes (a PNG and a
                  JPEG of the same scene, grayscale, RGBA, palette GIF, WebP, BMP)
  resample.json   Pillow's bytes for a small random RGB image resized with each filter
  preprocess.json TorchServe's image_classifier transform (Resize(256), CenterCrop(224),
                  ToTensor, Normalize) of each input: per-channel sums and sampled values
  <family>/tensors.json   the weights as a recipe (make-decoder-fixtures.py's generator:
                  no weights are committed; handlers' testing module rebuilds them)
  <family>/reference.json softmax probabilities of each input through the transform
                  and the torchvision model (eval, f32)
  architectures.json      real-size torchvision networks' state-dict shapes (weights and
                  running means only), to hold the names recognition gives them

Families: torchvision's constructors at small widths where the constructor allows it,
with VGG's and AlexNet's 4096-wide classifiers swapped for narrow ones (the state dict
names stay torchvision's; recognition reads shapes). The DenseNet fixture stores the
legacy names of the published weights (`denselayer1.norm.1.weight`).

Regenerate (needs torch, torchvision, numpy, Pillow; not needed by the tests):
  python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch torchvision numpy pillow safetensors transformers
  /tmp/tvenv/bin/python scripts/make-image-fixtures.py            # everything
  /tmp/tvenv/bin/python scripts/make-image-fixtures.py efficientnet  # only the families named
                  (the inputs already written; another host's torch may move the other
                  families' references in the 7th decimal)
"""

import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import torch
import torchvision
import PIL
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models import efficientnet, resnet, vgg

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent / "handlers/tests/fixtures/images"

_spec = importlib.util.spec_from_file_location("decoders", HERE / "make-decoder-fixtures.py")
decoders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoders)

TRANSFORM = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
CLASSES = 10


def scene(width, height, seed):
    """A smooth synthetic photo: gradients, rings and a few soft blobs (compresses well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 100 * np.sin(x / 17.0 + seed) * np.cos(y / 23.0)
    g = 255 * x / width
    b = 127 + 120 * np.cos(np.hypot(x - width * 0.6, y - height * 0.4) / 9.0)
    for _ in range(4):
        cx, cy, s = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 40)
        blob = 90 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
        r, g, b = r + blob, g - blob, b + blob * 0.5
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def write_inputs():
    big = Image.fromarray(scene(400, 300, 1))
    small = Image.fromarray(scene(160, 120, 2))
    inputs = {
        "scene.png": (big, "PNG", {}),
        "scene.jpg": (big, "JPEG", {"quality": 90}),
        "small.webp": (small, "WEBP", {"lossless": True}),
        "small.bmp": (small, "BMP", {}),
        "gray.png": (small.convert("L"), "PNG", {}),
        "rgba.png": (Image.merge("RGBA", (*small.split(), small.convert("L"))), "PNG", {}),
        "palette.gif": (small.quantize(64), "GIF", {}),
        # Portrait, a side not a multiple of anything: the crop offset rounds.
        "tall.png": (Image.fromarray(scene(117, 251, 3)), "PNG", {}),
    }
    for name, (image, fmt, options) in inputs.items():
        image.save(OUT / "inputs" / name, fmt, **options)
    return sorted(inputs)


def write_resample():
    rng = np.random.default_rng(7)
    source = Image.fromarray(rng.integers(0, 256, (17, 29, 3), dtype=np.uint8))
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
               "box": Image.BOX, "hamming": Image.HAMMING}
    cases = []
    for name, code in filters.items():
        for size in [(12, 7), (45, 30), (29, 9), (8, 17)]:
            out = source.resize(size, code)
            cases.append({"filter": name, "size": list(size),
                          "bytes": out.tobytes().hex()})
    (OUT / "resample.json").write_text(json.dumps({
        "pillow": PIL.__version__,
        "size": [29, 17], "source": source.tobytes().hex(),
        "cases": cases}, indent=1) + "\n")


def load(name):
    return Image.open(OUT / "inputs" / name).convert("RGB")


def write_preprocess(names):
    rng = np.random.default_rng(11)
    positions = sorted(rng.choice(3 * 224 * 224, 256, replace=False).tolist())
    images = {}
    for name in names:
        x = TRANSFORM(load(name)).numpy().reshape(-1)
        images[name] = {
            "channel_sums": [float(s) for s in x.reshape(3, -1).sum(1, dtype=np.float64)],
            "values": [float(x[i]) for i in positions],
        }
    (OUT / "preprocess.json").write_text(json.dumps(
        {"torchvision": torchvision.__version__, "positions": positions, "images": images}) + "\n")


def narrow_classifier(model, widths, first_in):
    """VGG's or AlexNet's classifier with its Linear layers at the same indices, narrower."""
    layers = list(model.classifier)
    dims = [first_in, *widths, CLASSES]
    k = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            layers[i] = nn.Linear(dims[k], dims[k + 1])
            k += 1
    model.classifier = nn.Sequential(*layers)
    return model


def families():
    tiny_vgg = [8, "M", 16, "M", 16, 16, "M", 32, "M", 32, "M"]
    plain_vgg = [8, 8, "M", 16, "M", 16, "M", 32, 32, "M", 32, "M"]
    return {
        "densenet": torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3),
                                                num_init_features=16, bn_size=2,
                                                num_classes=CLASSES),
        "resnet": resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES),
        "resnext": resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
                                 num_classes=CLASSES),
        "vgg_bn": narrow_classifier(vgg.VGG(vgg.make_layers(tiny_vgg, batch_norm=True)),
                                    [24, 24], 32 * 49),
        "vgg": narrow_classifier(vgg.VGG(vgg.make_layers(plain_vgg)), [24, 24], 32 * 49),
        "alexnet": narrow_classifier(torchvision.models.alexnet(), [24, 24], 256 * 36),
        "squeezenet1_0": torchvision.models.squeezenet1_0(num_classes=CLASSES),
        "squeezenet1_1": torchvision.models.squeezenet1_1(num_classes=CLASSES),
        "mobilenet_v2": torchvision.models.mobilenet_v2(num_classes=CLASSES, width_mult=0.25),
        "mobilenet_v3_large": torchvision.models.mobilenet_v3_large(num_classes=CLASSES,
                                                                    width_mult=0.25),
        "mobilenet_v3_small": torchvision.models.mobilenet_v3_small(num_classes=CLASSES,
                                                                    width_mult=0.25),
        # B0's stages at a quarter of its widths and half its depths (1, 1, 1, 2, 2, 2, 1
        # blocks): the first stage without an expansion, later ones with residuals.
        "efficientnet": efficientnet.EfficientNet(
            *efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25,
                                             depth_mult=0.5)[:1],
            dropout=0.2, num_classes=CLASSES),
    }


def recipe(name, shape, norms, gain):
    """(offset, scale): batch norms away from identity with positive variances, biases
    small, weights Kaiming-uniform (the bound for std sqrt(2 / fan_in)) times `gain`."""
    module = name.rsplit(".", 1)[0]
    if module in norms:
        return {"running_var": (1.0, 0.5), "running_mean": (0.0, 0.2),
                "weight": (1.0, 0.3)}.get(name.rsplit(".", 1)[1], (0.0, 0.2))
    if len(shape) == 1:
        return 0.0, 0.1
    return 0.0, gain * float(np.sqrt(6.0 / int(np.prod(shape[1:]))))


def legacy_densenet_name(name):
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", name)


def head_name(model):
    """The last layer with weights: the one whose scale spreads the probabilities."""
    return [n for n, p in model.named_parameters() if n.endswith("weight")][-1]


def build(family, model, gain, head_scale=None):
    """The model with recipe weights and the recipe manifest (names as stored). The head's
    scale, when not given, is chosen so that the logits spread with a deviation near 2."""
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    head = head_name(model)
    manifest, values = [], {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        stored = legacy_densenet_name(name) if family == "densenet" else name
        shape = tuple(tensor.shape)
        offset, scale = recipe(name, shape, norms, gain)
        if name == head and head_scale is not None:
            scale = head_scale
        values[name] = torch.from_numpy(decoders.weights(family, stored, shape, offset, scale))
        manifest.append({"name": stored, "shape": list(shape), "offset": offset, "scale": scale})
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not unexpected and all(m.endswith("num_batches_tracked") for m in missing), missing
    model.eval()
    if head_scale is None:
        with torch.no_grad():
            batch = torch.stack([TRANSFORM(load(n)) for n in sorted(p.name for p in (OUT / "inputs").iterdir())])
            spread = float(model(batch).std(1).mean())
        base = next(m["scale"] for m in manifest if m["name"] == head)
        return build(family, model, gain, float(f"{base * 2.0 / spread:.4g}"))
    return model, manifest


# Weight gain per family: activations neither dead nor saturated, images told apart.
GAIN = {"mobilenet_v2": 1.0, "resnet": 0.5, "resnext": 0.5}


def labelled(family):
    """A config's labels: `<family>_label_<i>`."""
    return {"num_labels": CLASSES,
            "id2label": {i: f"{family}_label_{i}" for i in range(CLASSES)},
            "label2id": {f"{family}_label_{i}": i for i in range(CLASSES)}}


def conv_recipe(shapes):
    """recipe() for a Hugging Face convolutional checkpoint, by tensor name: norms (batch
    and layer) away from identity, ConvNeXt's layer scales near 0.5, weights
    Kaiming-uniform so that activations neither vanish nor blow up with depth."""
    def by_name(name):
        leaf = name.rsplit(".", 1)[1]
        if "normalization" in name or "layernorm" in name:
            return {"running_var": (1.0, 0.5), "running_mean": (0.0, 0.2),
                    "weight": (1.0, 0.3)}.get(leaf, (0.0, 0.2))
        if leaf == "layer_scale_parameter":
            return 0.5, 0.3
        shape = shapes[name]
        if len(shape) == 1:
            return 0.0, 0.1
        return 0.0, float(np.sqrt(6.0 / int(np.prod(shape[1:]))))
    return by_name


def hugging_face_models():
    """family → (model class, config, image processor), tiny. The convolutional ones'
    references go through the processors' Pillow backend (what the handler reproduces
    byte for byte); transformers 5's default torchvision backend resizes with bicubic
    weights of its own, a few 1e-4 away in probability."""
    import transformers
    return {
        "vit": (transformers.ViTForImageClassification,
                transformers.ViTConfig(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64,
                                       image_size=32, patch_size=8, **labelled("vit")),
                transformers.ViTImageProcessor(size={"height": 32, "width": 32})),
        # Bottleneck layers with the stride in the first 1x1 (downsample_in_bottleneck)
        # and a strided first stage: the switches a checkpoint's config can set.
        "hf_resnet": (transformers.ResNetForImageClassification,
                      transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 24, 32],
                                                depths=[1, 2, 1], layer_type="bottleneck",
                                                downsample_in_first_stage=True,
                                                downsample_in_bottleneck=True,
                                                **labelled("resnet")),
                      transformers.ConvNextImageProcessorPil(size={"shortest_edge": 64},
                                                          crop_pct=0.875)),
        "hf_resnet_basic": (transformers.ResNetForImageClassification,
                            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                      depths=[2, 1], layer_type="basic",
                                                      **labelled("resnet")),
                            transformers.ConvNextImageProcessorPil(size={"shortest_edge": 64},
                                                                crop_pct=0.875)),
        "convnext": (transformers.ConvNextForImageClassification,
                     transformers.ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3,
                                                 layer_scale_init_value=0.5,
                                                 **labelled("convnext")),
                     transformers.ConvNextImageProcessorPil(size={"shortest_edge": 64},
                                                         crop_pct=0.875)),
    }


def write_hugging_face(family, names):
    """A tiny Hugging Face image classifier with its image processor's config, as
    transformers saves them, and transformers' probabilities through that processor."""
    import transformers
    model_class, config, processor = hugging_face_models()[family]
    out = OUT / family
    out.mkdir(exist_ok=True)
    model = model_class(config)
    recipe = decoders.recipe if family == "vit" else conv_recipe(
        {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model = decoders.recipe_checkpoint(out, family, model, model_class, recipe)
    processor.save_pretrained(out)
    probabilities = {}
    with torch.no_grad():
        for name in names:
            pixels = processor(images=load(name), return_tensors="pt")["pixel_values"]
            p = torch.softmax(model(pixel_values=pixels).logits, 1)[0]
            probabilities[name] = [round(float(v), 7) for v in p]
    (out / "reference.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "probabilities": probabilities}, indent=1) + "\n")
    print(f"{family:14} top {[int(np.argmax(p)) for p in probabilities.values()]} "
          f"p {[round(max(p), 3) for p in probabilities.values()]}")


# Real sizes whose names recognition must give (B1/B2 and B5's eps differ only there),
# and one it must refuse (EfficientNet V2's fused blocks).
NAMED = ["efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b5",
         "efficientnet_b7", "efficientnet_v2_s"]


def write_architecture_shapes():
    shapes = {}
    with torch.device("meta"):
        for name in NAMED:
            model = torchvision.models.get_model(name)
            shapes[name] = {k: list(v.shape) for k, v in model.state_dict().items()
                            if v.is_floating_point()
                            and (k.endswith(".weight") or k.endswith(".running_mean"))}
    (OUT / "architectures.json").write_text(
        "{\n" + ",\n".join(f"{json.dumps(n)}: {json.dumps(s, separators=(',', ':'))}"
                            for n, s in shapes.items()) + "\n}\n")


def main(only):
    if not only or "architectures" in only:
        write_architecture_shapes()
    if only:
        names = sorted(p.name for p in (OUT / "inputs").iterdir())
        for family in hugging_face_models():
            if family in only:
                write_hugging_face(family, names)
    else:
        (OUT / "inputs").mkdir(parents=True, exist_ok=True)
        names = write_inputs()
        write_resample()
        write_preprocess(names)
        for family in hugging_face_models():
            write_hugging_face(family, names)
    for family, model in families().items():
        if only and family not in only:
            continue
        model, manifest = build(family, model, GAIN.get(family, 1.0))
        out = OUT / family
        out.mkdir(exist_ok=True)
        (out / "tensors.json").write_text(json.dumps(
            {"generator": "splitmix64-fnv1a-v1", "dtype": "F32", "tensors": manifest}, indent=1) + "\n")
        probabilities = {}
        with torch.no_grad():
            for name in names:
                p = torch.softmax(model(TRANSFORM(load(name)).unsqueeze(0)), 1)[0]
                probabilities[name] = [round(float(v), 7) for v in p]
        (out / "reference.json").write_text(json.dumps(
            {"torchvision": torchvision.__version__, "probabilities": probabilities}, indent=1) + "\n")
        top = {n: (int(np.argmax(p)), round(max(p), 3)) for n, p in probabilities.items()}
        params = sum(int(np.prod(t["shape"])) for t in manifest)
        print(f"{family:14} {params / 1e6:5.2f} M parameters  top {top}")


if __name__ == "__main__":
    main(set(sys.argv[1:]))

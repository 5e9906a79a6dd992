import io
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import FOOD_QUERIES, make_images
from similar_finder import backbones
from similar_finder._torchfile import UnsafeCheckpointError, load_state_dict
from similar_finder.images import load_image


@pytest.mark.parametrize(
    "name, pooling, size, dim",
    [
        ("resnet50", "avg", 64, 2048),
        ("resnet50", "max", 64, 2048),
        ("vgg19", "avg", 64, 512),
        ("vgg19", "flatten", 224, 25088),  # the classic VGG19 recipe: 7 x 7 x 512
        ("efficientnet_lite0", "avg", 64, 1280),
        ("efficientnet_lite0", "flatten", 64, 2 * 2 * 1280),
        ("efficientnet_lite0", "gem", 64, 1280),
        ("efficientnet_lite2", "avg", 64, 1280),
        ("resnet50", "gem", 64, 2048),
    ],
)
def test_backbone_dimensions(name, pooling, size, dim):
    model = backbones.build_backbone(name, pooling=pooling, input_size=size, weights=None)
    assert model.dim == dim
    out = model.embed(np.zeros((2, size, size, 3), np.uint8))
    assert out.shape == (2, dim) and out.dtype == np.float32


def test_backbone_is_built_once_per_configuration():
    a = backbones.build_backbone("efficientnet_lite0", input_size=64, weights=None)
    b = backbones.build_backbone("efficientnet_lite0", input_size=64, weights=None)
    assert a is b


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'"):
        backbones.build_backbone("alexnet")
    with pytest.raises(ValueError, match="unknown pooling"):
        backbones.build_backbone("resnet50", pooling="median")
    with pytest.raises(ValueError, match="unknown pooling 'cls' for efficientnet_lite0; choose one of avg, max, gem"):
        backbones.build_backbone("efficientnet_lite0", pooling="cls")
    with pytest.raises(ValueError, match="unknown pooling 'gem' for dinov2_small; choose one of cls, mean"):
        backbones.build_backbone("dinov2_small", pooling="gem")
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'"):
        backbones.build_backbone("efficientnet_lite0+alexnet")
    with pytest.raises(ValueError, match="one weights path for 2 backbones"):
        backbones.build_backbone("efficientnet_lite0+efficientnet_lite2", weights="/models/lite.pth")
    with pytest.raises(ValueError, match="2 backbones but 3 pooling values"):
        backbones.build_backbone("efficientnet_lite0+efficientnet_lite2", pooling="avg+max+gem")
    with pytest.raises(backbones.WeightsUnavailableError, match="does not exist"):
        backbones.build_backbone("resnet50", weights="/nonexistent/resnet.h5")


def test_default_falls_back_to_an_offline_lite_when_resnet_weights_cannot_be_had(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        if kwargs.get("weights") == "imagenet":
            raise Exception("URL fetch failure on https://storage.googleapis.com/...: Name or service not known")
        raise AssertionError("only the ImageNet download is expected here")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    backbones.clear_cache()
    try:
        with pytest.warns(UserWarning, match="instead of the default resnet50") as caught:
            model = backbones.build_backbone(input_size=64)
        assert model.name == backbones.OFFLINE_BACKBONE == "efficientnet_lite2" and model.weights_source == "imagenet"
        assert "weights=PATH" in str(caught[0].message)
        # Named explicitly, it is an error, never a silent swap.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(backbones.WeightsUnavailableError, match="resnet50_weights_tf_dim_ordering"):
                backbones.build_backbone("resnet50", input_size=64)
    finally:
        backbones.clear_cache()


def _imagenet_top1(picture, name: str = "efficientnet_lite0") -> int:
    state = backbones.lite_state_dict(backbones.lite_weights_path(name))
    size = backbones.LITE_SIZES[name]
    model = backbones.efficientnet_lite(backbones.lite_layout(state), size, include_top=True, name=name)
    backbones.load_lite_weights(model, state)
    if isinstance(picture, str):
        import skimage.data

        picture = Image.fromarray(getattr(skimage.data, picture)())
    pixels = picture.convert("RGB").resize((size, size), Image.BILINEAR)
    logits = model.predict_on_batch(backbones.lite_preprocess(np.asarray(pixels)[None]))
    return int(np.argmax(logits[0]))


def test_lite0_port_classifies_scikit_image_photos_like_imagenet():
    assert 281 <= _imagenet_top1("chelsea") <= 285  # the ImageNet cat classes
    assert _imagenet_top1("coffee") in (967, 968)  # espresso, cup


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_label_a_cheeseburger_photo_as_imagenet_class_933(name):
    photo = FOOD_QUERIES / "burger_test.jpeg"  # a real photo, never trained on
    assert photo.is_file(), f"the shared photos are missing: expected {photo}"
    with Image.open(photo) as picture:
        assert _imagenet_top1(picture, name) == 933  # cheeseburger


# The hand-written Lite0 port this project shipped before the layout was read from the weights:
# (kernel, stride, expand ratio, output channels, repeats) per stage, as in the TF reference.
_LITE0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                 (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


def _hand_written_lite0(input_size: int):
    import keras
    from keras import layers

    def conv_bn(x, filters, kernel, stride, prefix, conv, bn, act=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{prefix}{conv}")(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}{conv}")(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=f"{prefix}{bn}")(x)
        return layers.ReLU(6.0, name=f"{prefix}{bn}_relu6")(x) if act else x

    inputs = keras.Input((input_size, input_size, 3))
    x = conv_bn(inputs, 32, 3, 2, "", "_conv_stem", "_bn0")
    channels, index = 32, 0
    for kernel, stride, expand, out_channels, repeats in _LITE0_STAGES:
        for repeat in range(repeats):
            block_stride = stride if repeat == 0 else 1
            prefix = f"_blocks.{index}."
            h = x
            if expand != 1:
                h = conv_bn(h, channels * expand, 1, 1, prefix, "_expand_conv", "_bn0")
            h = conv_bn(h, None, kernel, block_stride, prefix, "_depthwise_conv", "_bn1", depthwise=True)
            h = conv_bn(h, out_channels, 1, 1, prefix, "_project_conv", "_bn2", act=False)
            if block_stride == 1 and channels == out_channels:
                h = layers.Add(name=f"{prefix}add")([x, h])
            x, channels, index = h, out_channels, index + 1
    x = conv_bn(x, 1280, 1, 1, "", "_conv_head", "_bn1")
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x))


def test_layout_read_from_the_weights_is_the_hand_written_lite0():
    layout = backbones.lite_layout(backbones.lite_state_dict(backbones.lite0_weights_path()))
    expected, channels = [], 32
    for kernel, stride, expand, out_channels, repeats in _LITE0_STAGES:
        for repeat in range(repeats):
            expected.append((kernel, stride if repeat == 0 else 1, channels * expand, out_channels, expand != 1))
            channels = out_channels
    assert [(b.kernel, b.stride, b.expanded, b.outputs, b.has_expansion) for b in layout.blocks] == expected
    assert (layout.stem, layout.head, layout.classes) == (32, 1280, 1000)


def test_generic_builder_reproduces_the_hand_written_lite0_features(food_db):
    photos = sorted(p for p in food_db.rglob("*") if p.is_file())[::6]
    pixels = np.stack([load_image(p, 224)[0] for p in photos])
    reference = _hand_written_lite0(224)
    backbones.load_lite_weights(reference, backbones.lite0_weights_path())
    expected = reference.predict_on_batch(backbones.lite_preprocess(pixels))
    model = backbones.build_backbone("efficientnet_lite0")
    assert model.input_size == 224 and model.pooling == "avg"
    assert np.abs(model.embed(pixels) - expected).max() <= 5e-6
    assert expected.std() > 0.1  # real features, not zeros


def test_native_sizes_and_default_poolings_are_filled_in():
    config = backbones.requested_config
    assert config("efficientnet_lite0")["input_size"] == 224
    assert config("efficientnet_lite1")["input_size"] == 240
    assert config("efficientnet_lite2") == {"backbone": "efficientnet_lite2", "pooling": "avg", "input_size": 260,
                                            "weights": "imagenet"}
    assert config("EfficientNet-Lite2", input_size=300, pooling="gem")["input_size"] == 300
    assert config("resnet50")["input_size"] == 224
    assert config("siglip_base_patch16_384")["input_size"] == 384
    assert config("dinov2_small")["pooling"] == "cls" and config("clip_vit_base_patch16")["pooling"] == "pooled"
    # An ensemble decodes once, at the largest native size of its members; poolings differing are "+"-joined.
    assert config("efficientnet_lite0+efficientnet_lite2") == {
        "backbone": "efficientnet_lite0+efficientnet_lite2", "pooling": "avg", "input_size": 260, "weights": "imagenet"}
    assert config(["efficientnet_lite0", "dinov2_small"], weights=[None, "/presets/dino"]) == {
        "backbone": "efficientnet_lite0+dinov2_small", "pooling": "avg+cls", "input_size": 224,
        "weights": "random+/presets/dino"}


def test_lite2_keeps_the_layer_names_fine_tuning_cuts_at():
    model = backbones.build_backbone("efficientnet_lite2", weights=None, input_size=64)
    assert len({layer.name.split(".")[1] for layer in model.model.layers if layer.name.startswith("_blocks.")}) == 21
    cut, tail = model.tail(2)
    assert cut == "_blocks.19.add" and tail[0].name == "_blocks.20._expand_conv"
    assert tail[-1].name == "avg_pool"


def test_gem_pooling_is_the_generalised_mean_of_the_last_feature_map(food_db):
    from similar_finder.pooling import GeMPooling2D

    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype("float32")  # negatives: clamped to eps
    expected = np.mean(np.maximum(x, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    assert np.allclose(np.asarray(GeMPooling2D(3.0)(x)), expected, rtol=1e-5)
    assert np.allclose(np.asarray(GeMPooling2D(1.0)(np.abs(x))), np.abs(x).mean(axis=(1, 2)), rtol=1e-5)
    model = backbones.build_backbone("efficientnet_lite0", pooling="gem", input_size=96)
    pixels = np.stack([load_image(p, 96)[0] for p in sorted(food_db.rglob("*.jp*g"))[:3]])
    feature_map = model.embed_trunk(pixels, "_bn1_relu6")  # the head's activations, (3, 3, 3, 1280)
    expected = np.mean(np.maximum(feature_map, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    gem = model.embed(pixels)
    assert np.allclose(gem, expected, rtol=1e-4, atol=1e-6)
    average = feature_map.mean(axis=(1, 2))
    assert (gem >= average - 1e-5).all() and (gem > average + 1e-3).any()  # power mean: above the average
    assert model.config["pooling"] == "gem"


def test_an_ensemble_concatenates_unit_length_halves_and_is_recorded_as_one_backbone(tmp_path):
    from similar_finder import extract_features
    from similar_finder.embedding import embed_file
    from similar_finder.store import FeaturesError

    ensemble = backbones.build_backbone("efficientnet_lite0+efficientnet_lite1", weights=None, input_size=64)
    assert ensemble is backbones.build_backbone(["efficientnet_lite0", "efficientnet_lite1"], weights=None,
                                                input_size=64)
    assert ensemble.members[0] is backbones.build_backbone("efficientnet_lite0", weights=None, input_size=64)
    out = ensemble.embed(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    assert out.shape == (3, 2560) and ensemble.dim == 2560
    assert np.allclose(np.linalg.norm(out[:, :1280], axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(out[:, 1280:], axis=1), 1, atol=1e-5)
    with pytest.raises(backbones.BackboneError, match="ensemble"):
        ensemble.tail(1)

    photos = make_images(tmp_path / "photos", 4)
    csv = tmp_path / "features.csv"
    library = extract_features(tmp_path / "photos", csv, "efficientnet_lite0+efficientnet_lite1", weights=None,
                               input_size=64, progress=False)
    assert library.config == {"backbone": "efficientnet_lite0+efficientnet_lite1", "weights": "random",
                              "input_size": 64, "pooling": "avg", "dim": 2560}
    assert np.allclose(embed_file(photos[1], library.meta), library.matrix[library.paths.index(photos[1].name)],
                       atol=1e-5)
    # The same ensemble again is incremental; another backbone is refused, as for any backbone.
    again = extract_features(tmp_path / "photos", csv, "efficientnet_lite0+efficientnet_lite1", weights=None,
                             input_size=64, progress=False)
    assert again.stats.embedded == 0
    with pytest.raises(FeaturesError, match="cannot be mixed"):
        extract_features(tmp_path / "photos", csv, "efficientnet_lite0", weights=None, input_size=64, progress=False)


def test_state_dict_reader_returns_real_arrays():
    state = load_state_dict(backbones.lite0_weights_path())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert np.isfinite(state["_fc.weight"]).all() and state["_fc.weight"].std() > 0.01


def test_state_dict_reader_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    buffer = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, buffer)
    pickle.dump({"weight": Evil()}, buffer)
    path = tmp_path / "evil.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_state_dict(path)

import io
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from similar_finder import backbones
from similar_finder._torchfile import UnsafeCheckpointError, load_state_dict


@pytest.mark.parametrize(
    "name, pooling, size, dim",
    [
        ("resnet50", "avg", 64, 2048),
        ("resnet50", "max", 64, 2048),
        ("vgg19", "avg", 64, 512),
        ("vgg19", "flatten", 224, 25088),  # the classic VGG19 recipe: 7 x 7 x 512
        ("efficientnet_lite0", "avg", 64, 1280),
        ("efficientnet_lite0", "flatten", 64, 2 * 2 * 1280),
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
    with pytest.raises(backbones.WeightsUnavailableError, match="does not exist"):
        backbones.build_backbone("resnet50", weights="/nonexistent/resnet.h5")


def test_default_falls_back_to_lite0_when_resnet_weights_cannot_be_had(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        if kwargs.get("weights") == "imagenet":
            raise Exception("URL fetch failure on https://storage.googleapis.com/...: Name or service not known")
        raise AssertionError("only the ImageNet download is expected here")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    backbones._build_cached.cache_clear()
    try:
        with pytest.warns(UserWarning, match="instead of the default resnet50") as caught:
            model = backbones.build_backbone(input_size=64)
        assert model.name == "efficientnet_lite0" and model.weights_source == "imagenet"
        assert "weights=PATH" in str(caught[0].message)
        # Named explicitly, it is an error, never a silent swap.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(backbones.WeightsUnavailableError, match="resnet50_weights_tf_dim_ordering"):
                backbones.build_backbone("resnet50", input_size=64)
    finally:
        backbones._build_cached.cache_clear()


def _imagenet_top1(name: str) -> np.ndarray:
    import skimage.data

    model = backbones.efficientnet_lite0(include_top=True)
    backbones.load_lite0_weights(model, backbones.lite0_weights_path())
    pixels = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((224, 224), Image.BILINEAR)
    logits = model.predict_on_batch(backbones.lite0_preprocess(np.asarray(pixels)[None]))
    return int(np.argmax(logits[0]))


def test_lite0_port_classifies_scikit_image_photos_like_imagenet():
    assert 281 <= _imagenet_top1("chelsea") <= 285  # the ImageNet cat classes
    assert _imagenet_top1("coffee") in (967, 968)  # espresso, cup


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

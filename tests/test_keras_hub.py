"""KerasHub backbones, offline: tiny models with random weights saved as preset folders, loaded back
through the same path a user's downloaded preset takes (``--backbone NAME --weights DIR``)."""
import numpy as np
import pytest

from conftest import make_images
from similar_finder import backbones
from similar_finder.backbones import BackboneError, WeightsUnavailableError

keras_hub = pytest.importorskip("keras_hub")

SIZE = 56  # 4 x 4 patches of 14 px
SCALE, OFFSET = 1 / 127.5, -1.0


def _pixels(count: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """Preset folders: a tiny DINOv2 (2 register tokens, with its image converter), CLIP and SigLIP (without)."""
    root = tmp_path_factory.mktemp("presets")
    dino = keras_hub.models.DINOV2Backbone(patch_size=14, num_layers=2, hidden_dim=16, num_heads=2,
                                           intermediate_dim=32, num_register_tokens=2, image_shape=(SIZE, SIZE, 3),
                                           position_embedding_shape=(SIZE, SIZE, 3))
    dino.save_to_preset(str(root / "dino"))
    keras_hub.layers.DINOV2ImageConverter(image_size=(SIZE, SIZE), scale=SCALE,
                                          offset=OFFSET).save_to_preset(str(root / "dino"))
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                                intermediate_dim=32, image_shape=(32, 32, 3))
    text = keras_hub.models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1,
                                            num_heads=2, intermediate_dim=32, max_sequence_length=8)
    keras_hub.models.CLIPBackbone(vision_encoder=vision, text_encoder=text,
                                  projection_dim=8).save_to_preset(str(root / "clip"))
    vision = keras_hub.models.SigLIPVisionEncoder(patch_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                                  intermediate_dim=32, image_shape=(32, 32, 3))
    text = keras_hub.models.SigLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1,
                                              num_heads=2, intermediate_dim=32, max_sequence_length=8)
    keras_hub.models.SigLIPBackbone(vision_encoder=vision, text_encoder=text).save_to_preset(str(root / "siglip"))
    return root


def test_a_dinov2_preset_folder_embeds_with_its_class_token_or_mean_patch_token(presets):
    folder = str(presets / "dino")
    model = backbones.build_backbone("dinov2_small", weights=folder, input_size=SIZE)
    assert model.config == {"backbone": "dinov2_small", "weights": folder, "input_size": SIZE, "pooling": "cls",
                            "dim": 16}
    assert model is backbones.build_backbone("dinov2-small", weights=folder, input_size=SIZE)  # built once
    pixels = _pixels(3)
    x = pixels.astype("float32") * SCALE + OFFSET  # the preset's own image converter
    assert np.allclose(model.preprocess(pixels), x)
    tokens = np.asarray(keras_hub.models.DINOV2Backbone.from_preset(folder)({"images": x}))  # 1 + 2 + 16
    assert tokens.shape == (3, 19, 16)
    out = model.embed(pixels)
    assert out.shape == (3, 16) and out.dtype == np.float32
    assert np.allclose(out, tokens[:, 0], atol=1e-5)
    assert np.array_equal(out, model.embed(pixels))  # deterministic
    mean = backbones.build_backbone("dinov2_small", weights=folder, input_size=SIZE, pooling="mean")
    assert np.allclose(mean.embed(pixels), tokens[:, 3:].mean(axis=1), atol=1e-5)  # patches only, not registers
    with pytest.raises(BackboneError, match="only the CNN backbones"):
        model.tail(1)


def test_the_weights_come_from_the_folder_not_from_a_random_start(presets):
    folder = str(presets / "dino")
    first = backbones.build_backbone("dinov2_small", weights=folder, input_size=SIZE).embed(_pixels(2))
    backbones.clear_cache()
    try:
        again = backbones.build_backbone("dinov2_small", weights=folder, input_size=SIZE).embed(_pixels(2))
    finally:
        backbones.clear_cache()
    assert np.allclose(first, again, atol=1e-6) and first.std() > 0


def test_clip_and_siglip_pool_the_way_they_were_trained(presets):
    pixels = _pixels(2, 32)
    clip = keras_hub.models.CLIPBackbone.from_preset(str(presets / "clip"))
    model = backbones.build_backbone("clip_vit_base_patch16", weights=str(presets / "clip"), input_size=32)
    assert model.config["pooling"] == "pooled" and model.dim == 8  # the projected image embedding
    x = model.preprocess(pixels)
    assert np.allclose(x[0, 0, 0], (pixels[0, 0, 0] / 255 - np.array([0.48145466, 0.4578275, 0.40821073]))
                       / np.array([0.26862954, 0.26130258, 0.27577711]), atol=1e-5)  # no converter: CLIP's own
    assert np.allclose(model.embed(pixels), np.asarray(clip.get_vision_embeddings(x)), atol=1e-5)
    cls = backbones.build_backbone("clip_vit_base_patch16", weights=str(presets / "clip"), input_size=32,
                                   pooling="cls")
    assert cls.dim == 16
    siglip = backbones.build_backbone("siglip_base_patch16_224", weights=str(presets / "siglip"), input_size=32)
    expected = keras_hub.models.SigLIPBackbone.from_preset(str(presets / "siglip")).vision_encoder(
        {"images": siglip.preprocess(pixels)})
    assert np.allclose(siglip.embed(pixels), np.asarray(expected), atol=1e-5)
    with pytest.raises(BackboneError, match="takes 32 px images only"):
        backbones.build_backbone("clip_vit_base_patch16", weights=str(presets / "clip"))  # 224 by its name


def test_extraction_records_the_preset_and_refuses_to_mix_poolings(presets, tmp_path):
    from similar_finder import extract_features
    from similar_finder.embedding import embed_file
    from similar_finder.store import FeaturesError

    folder = str(presets / "dino")
    photos = make_images(tmp_path / "photos", 3)
    csv = tmp_path / "features.csv"
    library = extract_features(tmp_path / "photos", csv, "dinov2_small", weights=folder, input_size=SIZE,
                               progress=False)
    assert library.config == {"backbone": "dinov2_small", "weights": folder, "input_size": SIZE, "pooling": "cls",
                              "dim": 16}
    assert np.allclose(embed_file(photos[0], library.meta), library.matrix[0], atol=1e-5)
    with pytest.raises(FeaturesError, match="cannot be mixed"):
        extract_features(tmp_path / "photos", csv, "dinov2_small", weights=folder, input_size=SIZE, pooling="mean",
                         progress=False)
    # In an ensemble with an offline CNN: each member's weights, joined with '+'.
    ensemble = extract_features(tmp_path / "photos", tmp_path / "ensemble.csv", "efficientnet_lite0+dinov2_small",
                                weights=f"none+{folder}", input_size=SIZE, progress=False)
    assert ensemble.config == {"backbone": "efficientnet_lite0+dinov2_small", "weights": f"random+{folder}",
                               "input_size": SIZE, "pooling": "avg+cls", "dim": 1296}
    assert np.allclose(np.linalg.norm(ensemble.matrix[:, 1280:], axis=1), 1, atol=1e-5)


def test_a_missing_or_unreachable_preset_says_what_to_do(presets, tmp_path, monkeypatch, capsys):
    with pytest.raises(WeightsUnavailableError, match=r"preset folder .*nowhere does not exist.*save_hub_preset"):
        backbones.build_backbone("dinov2_small", weights=tmp_path / "nowhere")
    with pytest.raises(BackboneError, match="does not hold a DINOV2Backbone"):
        backbones.build_backbone("dinov2_small", weights=str(presets / "clip"), input_size=32)
    with pytest.raises(ValueError, match="not a KerasHub DINOV2Backbone preset; choose one of dinov2_small"):
        backbones.build_backbone("dinov2_tiny")

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.DINOV2Backbone, "from_preset", offline)
    with pytest.raises(WeightsUnavailableError, match=r"could not load the KerasHub preset dinov2_base .*"
                                                      r"api.kaggle.com.*--weights DIR"):
        backbones.build_backbone("dinov2_base")
    from similar_finder.cli import main

    make_images(tmp_path / "photos", 2)
    assert main(["extract", str(tmp_path / "photos"), "--out", str(tmp_path / "f.csv"), "--backbone",
                 "dinov2_base", "--quiet"]) == 2
    assert "error: could not load the KerasHub preset dinov2_base" in capsys.readouterr().err


def test_a_dinov3_preset_runs_at_the_size_asked_for(tmp_path):
    keras_hub.models.DINOV3Backbone(patch_size=16, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
                                    num_register_tokens=4, image_shape=(64, 64, 3)).save_to_preset(str(tmp_path))
    small = backbones.build_backbone("dinov3_vit_small_lvd1689m", weights=tmp_path, input_size=64)
    large = backbones.build_backbone("dinov3_vit_small_lvd1689m", weights=tmp_path, input_size=96, pooling="mean")
    assert small.embed(_pixels(2, 64)).shape == large.embed(_pixels(2, 96)).shape == (2, 16)
    assert (small.config["pooling"], large.config["input_size"]) == ("cls", 96)

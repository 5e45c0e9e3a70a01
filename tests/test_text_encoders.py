"""The frozen text towers: all-MiniLM-L6-v2 from the package, BiomedCLIP through open_clip's local-dir schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from config.settings import TextEncoderSettings
from text_encoder_fixtures import TINY_EMBED_DIM, build_tiny_biomedclip_folder, write_open_clip_config
from trainer.model.text_encoders import (
    BiomedCLIPTextEncoder,
    FrozenTextEncoder,
    MiniLMTextEncoder,
    TextEncoderError,
    build_text_encoder,
)

REPORTS = [
    "Bilateral pleural effusions with compressive atelectasis of the lower lobes.",
    "No pulmonary embolism. Heart size is normal.",
    "A 6 mm ground glass nodule in the right upper lobe, stable compared with the prior CT.",
    "Mild centrilobular emphysema. Mediastinal lymph nodes are not enlarged. " * 30,  # > 256 word-pieces
    "",
]


# ---------------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def test_minilm_interface(minilm: MiniLMTextEncoder) -> None:
    assert isinstance(minilm, FrozenTextEncoder)
    assert (minilm.name, minilm.feature_dim, minilm.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    input_ids, attention_mask = minilm.tokenize(REPORTS[:3])
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == 3
    lengths = attention_mask.sum(dim=1)
    assert input_ids.shape[1] == int(lengths.max())  # padded to the longest, not to a fixed length
    assert (input_ids[attention_mask == 0] == minilm.pad_token_id).all()
    long_ids, long_mask = minilm.tokenize(REPORTS[3:4])
    assert long_ids.shape == (1, 256) and long_ids[0, -1].item() == minilm.tokenizer.token_to_id("[SEP]")
    empty_ids, empty_mask = minilm.tokenize([])
    assert empty_ids.shape == (0, 0) and minilm.encode([]).shape == (0, 384)


def test_minilm_matches_sentence_transformers(minilm: MiniLMTextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.folder), device="cpu")
    expected = reference.encode(REPORTS, convert_to_tensor=True, normalize_embeddings=True).float()
    ours = minilm.encode(REPORTS)
    assert ours.shape == (len(REPORTS), 384) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(REPORTS)))
    assert (ours * expected).sum(dim=1).min().item() > 0.9999


def test_minilm_frozen_eval_and_batching(minilm: MiniLMTextEncoder) -> None:
    parent = torch.nn.Module()
    parent.text = minilm
    parent.train()
    assert not minilm.training and not any(module.training for module in minilm.modules())
    assert all(not param.requires_grad for param in minilm.parameters())
    input_ids, attention_mask = minilm.tokenize(REPORTS[:3])
    first, second = minilm(input_ids, attention_mask), minilm(input_ids, attention_mask)
    assert torch.equal(first, second) and not first.requires_grad  # dropout stays off
    one_by_one = minilm.encode(REPORTS, batch_size=1)
    batched = minilm.encode(REPORTS, batch_size=32)
    torch.testing.assert_close(one_by_one, batched, atol=1e-5, rtol=0)  # order restored, padding masked


def test_minilm_tokenizer_files_rebuild_same_tokens(minilm: MiniLMTextEncoder, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    files = minilm.tokenizer_files(tmp_path)
    assert set(files) == {"tokenizer.json"} and files["tokenizer.json"].parent == tmp_path
    serving = Tokenizer.from_file(str(files["tokenizer.json"]))
    encodings = serving.encode_batch(REPORTS)
    input_ids, attention_mask = minilm.tokenize(REPORTS)
    assert torch.equal(input_ids, torch.tensor([e.ids for e in encodings]))
    assert torch.equal(attention_mask, torch.tensor([e.attention_mask for e in encodings]))
    assert minilm.text_preprocessing == "none"
    default = minilm.tokenizer_files()["tokenizer.json"]
    assert default.is_file() and default.read_text() == files["tokenizer.json"].read_text()


def test_minilm_short_max_tokens_and_bad_folder(minilm: MiniLMTextEncoder, tmp_path: Path) -> None:
    short = MiniLMTextEncoder(max_tokens=16)
    input_ids, _ = short.tokenize(REPORTS[:3])
    assert input_ids.shape[1] == 16
    assert short.encode(REPORTS[:1]).shape == (1, 384)

    partial = tmp_path / "minilm"
    partial.mkdir()
    shutil.copy(minilm.folder / "config.json", partial / "config.json")
    with pytest.raises(TextEncoderError, match=r"missing: tokenizer\.json, model\.safetensors or pytorch_model\.bin"):
        MiniLMTextEncoder(partial)
    with pytest.raises(TextEncoderError, match="not found"):
        MiniLMTextEncoder(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------- BiomedCLIP
@pytest.fixture(scope="module")
def tiny_biomedclip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_biomedclip_folder(tmp_path_factory.mktemp("biomedclip") / "BiomedCLIP")


@pytest.fixture(scope="module")
def biomedclip(tiny_biomedclip_dir: Path) -> BiomedCLIPTextEncoder:
    return BiomedCLIPTextEncoder(tiny_biomedclip_dir)


def _copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    write_open_clip_config(target)  # its own path in hf_model_name / hf_tokenizer_name
    return target


def test_biomedclip_loads_text_tower_only(biomedclip: BiomedCLIPTextEncoder) -> None:
    assert (biomedclip.name, biomedclip.feature_dim, biomedclip.max_tokens) == ("BiomedCLIP", TINY_EMBED_DIM, 256)
    assert all(key.startswith("text.") for key in biomedclip.state_dict())
    assert all(not param.requires_grad for param in biomedclip.parameters())
    biomedclip.train()
    assert not any(module.training for module in biomedclip.modules())

    features = biomedclip.encode(REPORTS)
    assert features.shape == (len(REPORTS), TINY_EMBED_DIM) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(REPORTS)))
    assert torch.equal(features, biomedclip.encode(REPORTS))
    assert (features[0] @ features[1]).item() < 0.999  # different texts, different vectors


def test_biomedclip_matches_open_clip(biomedclip: BiomedCLIPTextEncoder, tiny_biomedclip_dir: Path) -> None:
    import open_clip

    folder = f"local-dir:{tiny_biomedclip_dir}"
    clip = open_clip.create_model(folder).eval()
    open_clip_tokenizer = open_clip.get_tokenizer(folder)
    texts = REPORTS + ["Effusion “small” &amp; unchanged;  Émphysème."]  # ftfy quotes, HTML entity, accents
    reference_ids = open_clip_tokenizer(texts)  # padded to context_length 256
    input_ids, attention_mask = biomedclip.tokenize(texts)
    for row in range(len(texts)):
        length = int(attention_mask[row].sum())
        assert torch.equal(input_ids[row, :length], reference_ids[row, :length])
        assert (reference_ids[row, length:] == 0).all()
    with torch.no_grad():
        expected = clip.encode_text(reference_ids, normalize=True)
    ours = biomedclip.encode(texts)
    assert (ours * expected).sum(dim=1).min().item() > 0.9999

    again = BiomedCLIPTextEncoder(tiny_biomedclip_dir)  # a second load gives the same vectors
    torch.testing.assert_close(again.encode(texts), ours)


def test_biomedclip_tokenizer_files(biomedclip: BiomedCLIPTextEncoder, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = biomedclip.tokenizer_files(tmp_path)["tokenizer.json"]
    assert not (biomedclip.folder / "tokenizer.json").exists()  # built from vocab.txt, written elsewhere
    serving = Tokenizer.from_file(str(path))
    texts = [biomedclip.preprocess_text(text) for text in REPORTS]
    encodings = serving.encode_batch(texts)
    input_ids, attention_mask = biomedclip.tokenize(REPORTS)
    assert torch.equal(input_ids, torch.tensor([e.ids for e in encodings]))
    assert torch.equal(attention_mask, torch.tensor([e.attention_mask for e in encodings]))
    assert biomedclip.text_preprocessing != "none"
    assert biomedclip.preprocess_text("  “a”   &amp;\n b ") == '"a" & b'


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        (["open_clip_pytorch_model.bin"], "open_clip_pytorch_model.bin"),
        (["vocab.txt", "tokenizer_config.json"], "vocab.txt, tokenizer_config.json"),
        (["config.json", "open_clip_config.json"], "open_clip_config.json"),
    ],
)
def test_biomedclip_incomplete_folder_names_missing_files(
    tiny_biomedclip_dir: Path, tmp_path: Path, removed: list[str], named: str
) -> None:
    folder = _copy_folder(tiny_biomedclip_dir, tmp_path / "partial")
    for name in removed:
        (folder / name).unlink()
    with pytest.raises(TextEncoderError, match="missing: ") as caught:
        BiomedCLIPTextEncoder(folder)
    assert named in str(caught.value)
    for name in removed:
        assert name in str(caught.value)


def test_biomedclip_special_tokens_map_is_optional(tiny_biomedclip_dir: Path, tmp_path: Path) -> None:
    folder = _copy_folder(tiny_biomedclip_dir, tmp_path / "no_special_map")
    (folder / "special_tokens_map.json").unlink()
    assert BiomedCLIPTextEncoder(folder).encode(REPORTS[:2]).shape == (2, TINY_EMBED_DIM)


def test_biomedclip_config_must_point_to_local_folder(tiny_biomedclip_dir: Path, tmp_path: Path) -> None:
    hub_id = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    folder = _copy_folder(tiny_biomedclip_dir, tmp_path / "hub")
    write_open_clip_config(folder, hf_model_name=hub_id, hf_tokenizer_name=hub_id)
    with pytest.raises(TextEncoderError, match="hub id") as caught:
        BiomedCLIPTextEncoder(folder)
    message = str(caught.value)
    assert "hf_model_name" in message and "hf_tokenizer_name" in message and str(folder) in message

    write_open_clip_config(folder, hf_tokenizer_name="")
    with pytest.raises(TextEncoderError, match="hf_tokenizer_name is missing"):
        BiomedCLIPTextEncoder(folder)

    write_open_clip_config(folder, hf_model_name=str(tmp_path / "nowhere"))
    with pytest.raises(TextEncoderError, match="not a folder"):
        BiomedCLIPTextEncoder(folder)

    # A path relative to the folder works whatever the working directory.
    write_open_clip_config(folder, hf_model_name=".", hf_tokenizer_name=".")
    assert BiomedCLIPTextEncoder(folder).feature_dim == TINY_EMBED_DIM

    config = json.loads((folder / "open_clip_config.json").read_text())
    del config["model_cfg"]["text_cfg"]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(TextEncoderError, match="text_cfg"):
        BiomedCLIPTextEncoder(folder)


def test_biomedclip_max_tokens_limit(tiny_biomedclip_dir: Path) -> None:
    with pytest.raises(TextEncoderError, match="position embeddings"):
        BiomedCLIPTextEncoder(tiny_biomedclip_dir, max_tokens=600)
    short = BiomedCLIPTextEncoder(tiny_biomedclip_dir, max_tokens=8)
    assert short.tokenize(REPORTS[:2])[0].shape[1] == 8


# ---------------------------------------------------------------------------------------------- factory
def test_build_text_encoder(tiny_biomedclip_dir: Path) -> None:
    encoder = build_text_encoder(TextEncoderSettings(kind="biomedclip", path=tiny_biomedclip_dir, max_tokens=64))
    assert isinstance(encoder, BiomedCLIPTextEncoder) and encoder.max_tokens == 64
    minilm = build_text_encoder(TextEncoderSettings(max_tokens=128))
    assert isinstance(minilm, MiniLMTextEncoder) and (minilm.feature_dim, minilm.max_tokens) == (384, 128)

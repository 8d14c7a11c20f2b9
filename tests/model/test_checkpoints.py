"""The model on checkpoints shaped like the ones users bring (``tests/checkpoints.py``): a Llama
stored in bf16 with a BOS-adding SentencePiece tokenizer, a Llama-3 style byte-level tokenizer, a
Qwen2 with spare embedding rows, a SigLIP tower at 384 px, a whole CLIP checkpoint with a CLS
token. Each test checks a property that broke on them: one compute dtype, the tower's own image
geometry, BOS kept, placeholder rows at the mean, n_v/n_m positions under either padding side.
"""

import copy
import logging
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model import ModelConfig, NoteInput, NoteLLM2, build_model, encode
from model.collator import NoteCollator
from model.loss import notellm2_loss
from model.prompts import IMG, IMG_EMB, special_affixes
from model.saliency import image_text_saliency
from tests import checkpoints as ck

SMALL = dict(num_query_tokens=4, max_tokens=96, qformer_layers=1, qformer_hidden_size=32,
             qformer_heads=4, qformer_cross_attention_frequency=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "llama": ck.llama_checkpoint(str(root / "llama-bf16")),
        "llama3": ck.llama_checkpoint(str(root / "llama3-fp16"), tokenizer="llama3",
                                      dtype=torch.float16),
        "qwen2": ck.qwen2_checkpoint(str(root / "qwen2-bf16")),
        "siglip": ck.siglip_checkpoint(str(root / "siglip-384")),
        "clip": ck.clip_checkpoint(str(root / "clip-b32")),
    }


@pytest.fixture(scope="module")
def llama_siglip(folders) -> NoteLLM2:
    return build_model(ModelConfig(llm=folders["llama"], vision=folders["siglip"], **SMALL))


@pytest.fixture(scope="module")
def qwen_clip(folders) -> NoteLLM2:
    return build_model(ModelConfig(llm=folders["qwen2"], vision=folders["clip"], **SMALL))


def notes(n=4):
    return [NoteInput(f"title {i}", "note about a bunny at the lake " * (1 + i), ("Pets",),
                      Image.new("RGB", (64 + 8 * i, 48), (50 * i, 200 - 40 * i, 90)))
            for i in range(n)]


def test_the_generated_folders_are_what_they_claim(folders):
    assert ck.stored_dtype(folders["llama"]) == "BF16"
    assert ck.stored_dtype(folders["llama3"]) == "F16"
    assert ck.stored_dtype(folders["qwen2"]) == "BF16"
    assert os.path.exists(os.path.join(folders["siglip"], "preprocessor_config.json"))


# -- 1. stored dtype ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_part_follows_one_compute_dtype(folders, dtype):
    """A bf16-stored LLM next to fp32-created connector, gate and head once failed at the first
    matmul on CPU; now every parameter is in the compute dtype, whatever was stored."""
    m = build_model(ModelConfig(llm=folders["llama"], vision=folders["siglip"], **SMALL),
                    dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {dtype}


@pytest.mark.parametrize("pair", ["llama_siglip", "qwen_clip"])
def test_a_training_step_on_cpu_reaches_every_trainable_part(pair, request):
    model = copy.deepcopy(request.getfixturevalue(pair)).train()
    out = model(**NoteCollator(model)(notes(4)))
    notellm2_loss(out, model.log_scale, 9.0, 1.0)["loss"].backward()
    for part in (model.llm, model.connector, model.fusion, model.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in model.vision.parameters())  # frozen


def test_saliency_runs_on_a_bf16_checkpoint(llama_siglip):
    sal = image_text_saliency(copy.deepcopy(llama_siglip), NoteCollator(llama_siglip)(notes(4)))
    assert sal["image_share"] + sal["text_share"] == pytest.approx(1.0)
    assert 0.0 < sal["image_share"] < 1.0


def test_an_export_trained_in_bf16_reloads_and_encodes_on_cpu(llama_siglip, tmp_path):
    """What a GPU run exports (bf16 weights, configs saying bf16) loads in fp32 on a CPU."""
    bf16 = copy.deepcopy(llama_siglip).to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "m"))
    loaded = NoteLLM2.from_pretrained(str(tmp_path / "m"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    v = encode(loaded, notes(3), progress=False)
    assert v.shape == (3, 64) and np.isfinite(v).all()
    want = encode(copy.deepcopy(bf16).float(), notes(3), progress=False)
    np.testing.assert_allclose(v, want, atol=1e-5)


# -- 2. image geometry -------------------------------------------------------------------------


def test_pixels_take_the_towers_own_size(llama_siglip, qwen_clip):
    """SigLIP at 384 px was fed into a buffer sized by model.image_size (32 or 224)."""
    assert llama_siglip.pixel_shape == (3, 384, 384)
    assert qwen_clip.pixel_shape == (3, 224, 224)
    batch = NoteCollator(llama_siglip)([*notes(2), NoteInput("no image", "", ())])
    assert batch["pixel_values"].shape == (3, 3, 384, 384)
    assert batch["pixel_values"][2].abs().sum() == 0  # no image: zeros of the same geometry
    # SigLIP normalises with mean/std 0.5: a white image is +1 everywhere
    white = NoteCollator(llama_siglip).pixels([Image.new("RGB", (500, 300), "white")])
    torch.testing.assert_close(white, torch.ones_like(white))
    out = llama_siglip(**batch)
    assert out["n_m"].shape == (3, 64)


def test_a_folder_without_a_processor_gets_the_familys_at_the_towers_size(folders, tmp_path,
                                                                          caplog):
    bare = str(tmp_path / "siglip-bare")
    shutil.copytree(folders["siglip"], bare)
    os.remove(os.path.join(bare, "preprocessor_config.json"))
    with caplog.at_level(logging.WARNING):
        m = build_model(ModelConfig(variant="late_fusion", vision=bare, **SMALL),
                        corpus=["a b"])
    assert m.pixel_shape == (3, 384, 384)
    assert "no image processor config" in caplog.text


def test_a_processor_that_disagrees_with_its_tower_is_refused(folders, tmp_path):
    from transformers import SiglipImageProcessorPil

    wrong = str(tmp_path / "siglip-wrong")
    shutil.copytree(folders["siglip"], wrong)
    SiglipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(wrong)
    with pytest.raises(ValueError, match=r"gives 224x224 images but the tower is built for 384"):
        build_model(ModelConfig(variant="late_fusion", vision=wrong, **SMALL), corpus=["a b"])


def test_the_image_vector_is_the_cls_token_where_the_tower_has_one(qwen_clip, llama_siglip,
                                                                   folders):
    px = NoteCollator(qwen_clip).pixels([notes(1)[0].image])
    tokens, cls = qwen_clip.encode_image(px)
    assert qwen_clip.has_cls_token and tokens.shape[1] == 1 + (224 // 32) ** 2
    torch.testing.assert_close(cls, tokens[:, 0])  # the reference's image_features[:, 0]
    pooled = build_model(ModelConfig(llm=folders["qwen2"], vision=folders["clip"],
                                     vision_cls="pooled", **SMALL))
    _, cls_pooled = pooled.encode_image(px)
    torch.testing.assert_close(cls_pooled, pooled.vision(pixel_values=px).pooler_output)
    # SigLIP has no CLS token: its attention-pooling head gives the image vector
    assert not llama_siglip.has_cls_token and not llama_siglip.cls_from_token
    with pytest.raises(ValueError, match="no CLS token"):
        build_model(ModelConfig(variant="late_fusion", vision=folders["siglip"],
                                vision_cls="cls", **SMALL), corpus=["a b"])


# -- 3. tokenizer families ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama3"])
def test_bos_is_kept_where_the_tokenizer_adds_one(folders, name):
    m = build_model(ModelConfig(variant="text_only", llm=folders[name], **SMALL))
    tok = m.tokenizer
    assert special_affixes(tok)[0] == [tok.bos_token_id]
    for ids in m.prompts.encode(notes(3)):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-len(m.prompts.close):] == m.prompts.close  # nothing appended after it


def test_qwen2_gets_no_bos_and_keeps_its_pad(qwen_clip):
    tok = qwen_clip.tokenizer
    assert tok.bos_token is None and tok.pad_token == "<|endoftext|>"
    assert qwen_clip.prompts.prefix == []
    ids = qwen_clip.prompts.encode(notes(1))[0]
    assert ids.count(qwen_clip.img_id) == qwen_clip.config.num_query_tokens
    assert ids.count(qwen_clip.img_emb_id) == 1


def test_llama_gets_a_pad_token_and_keeps_left_padding(llama_siglip):
    tok = llama_siglip.tokenizer
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


@pytest.mark.parametrize("pair", ["llama_siglip", "qwen_clip"])
def test_n_v_and_n_m_are_read_at_the_right_tokens_under_either_padding(pair, request):
    """Left padding (Llama's default) and right padding give the same vectors, and n_v still
    depends on the image half only."""
    model = copy.deepcopy(request.getfixturevalue(pair)).eval()
    ns = notes(4)  # contents of different lengths: rows are padded
    vecs = {}
    for side in ("left", "right"):
        model.tokenizer.padding_side = side
        batch = NoteCollator(model)(ns)
        rows = torch.arange(4)
        before = (batch["input_ids"] == model.img_emb_id).int().argmax(1) - 1
        assert (batch["input_ids"][rows, before] != model.tokenizer.pad_token_id).all()
        with torch.no_grad():
            out = model(**batch)
        vecs[side] = out
    torch.testing.assert_close(vecs["left"]["n_m"], vecs["right"]["n_m"], atol=1e-5, rtol=0)
    torch.testing.assert_close(vecs["left"]["n_v"], vecs["right"]["n_v"], atol=1e-5, rtol=0)
    same_image = [NoteInput("other words", "x", (), ns[0].image), ns[0]]
    with torch.no_grad():
        out = model(**NoteCollator(model)(same_image))
    torch.testing.assert_close(out["n_v"][0], out["n_v"][1], atol=1e-5, rtol=0)


# -- 4. placeholder rows -----------------------------------------------------------------------


def _trained_mean(folder: str, rows: int) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "model.safetensors"))
    return weights["model.embed_tokens.weight"][:rows].float().mean(dim=0)


def test_placeholder_rows_start_at_the_mean_on_spare_rows(folders, qwen_clip):
    """Qwen2's matrix already has rows for the new ids: they used to keep their untrained
    values (5.0 in this checkpoint) instead of the mean."""
    from transformers import AutoTokenizer

    trained = len(AutoTokenizer.from_pretrained(folders["qwen2"]))
    emb = qwen_clip.llm.get_input_embeddings().weight
    assert emb.shape[0] == trained + 64  # the spare rows are still there: nothing was resized
    mean = _trained_mean(folders["qwen2"], trained)
    for token in (IMG, IMG_EMB):
        row = emb[qwen_clip.tokenizer.convert_tokens_to_ids(token)]
        torch.testing.assert_close(row, mean, atol=1e-2, rtol=0)  # stored in bf16


def test_placeholder_rows_start_at_the_mean_when_the_matrix_grows(folders, llama_siglip):
    from transformers import AutoTokenizer

    trained = len(AutoTokenizer.from_pretrained(folders["llama"]))
    emb = llama_siglip.llm.get_input_embeddings().weight
    assert emb.shape[0] == trained + 2
    mean = _trained_mean(folders["llama"], trained)
    torch.testing.assert_close(emb[trained:], mean.expand(2, -1), atol=1e-2, rtol=0)


def test_the_saved_tokenizer_reloads_with_its_placeholders_pad_and_bos(llama_siglip, tmp_path):
    llama_siglip.save_pretrained(str(tmp_path / "m"))
    loaded = NoteLLM2.from_pretrained(str(tmp_path / "m"))
    assert loaded.prompts.encode(notes(2)) == llama_siglip.prompts.encode(notes(2))
    assert loaded.tokenizer.pad_token == llama_siglip.tokenizer.pad_token
    np.testing.assert_allclose(encode(loaded, notes(3), progress=False),
                               encode(llama_siglip, notes(3), progress=False), atol=1e-6)


def test_every_variant_builds_on_real_shaped_checkpoints(folders):
    for variant in ("text_only", "mllm_basic", "late_fusion", "micl"):
        m = build_model(replace(ModelConfig(llm=folders["llama"], vision=folders["clip"],
                                            **SMALL), variant=variant))
        out = m(**NoteCollator(m)(notes(2)))
        assert out["n_m"].shape == (2, 64) and torch.isfinite(out["n_m"]).all()

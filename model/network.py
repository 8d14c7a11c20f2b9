"""The NoteLLM-2 multimodal representation model (MLRM + mICL + late fusion).

Shape legend: B notes, T tokens, H LLM width, Dv vision width, P patches, Q image tokens,
S image side, d embedding size.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import TINY, ModelConfig
from model.prompts import IMG, IMG_EMB, PromptBuilder
from model.tokenizer import add_placeholder_tokens, init_new_rows, train_tiny_tokenizer

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class MlpConnector(nn.Module):
    """Patch features -> Q LLM-width tokens: average-pool the patches to Q, then GELU MLP."""

    def __init__(self, vision_width: int, llm_width: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(),
                                  nn.Linear(llm_width, llm_width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # (B, P, Dv) -> (B, Q, Dv)
        if patches.shape[1] != self.num_tokens:
            patches = F.adaptive_avg_pool1d(patches.transpose(1, 2), self.num_tokens).transpose(1, 2)
        return self.proj(patches)  # (B, Q, H)


class QFormerConnector(nn.Module):
    """BLIP-2 Q-Former: Q learnable queries cross-attend to the vision tokens, then a 2-layer GELU
    MLP maps them to the LLM width."""

    def __init__(self, vision_width: int, llm_width: int, num_tokens: int, *, layers: int,
                 hidden: int, heads: int, cross_attention_frequency: int):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        cfg = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=4 * hidden,
                                 encoder_hidden_size=vision_width,
                                 cross_attention_frequency=cross_attention_frequency)
        self.qformer = Blip2QFormerModel(cfg)
        self.query = nn.Parameter(torch.randn(1, num_tokens, hidden) * cfg.initializer_range)
        self.proj = nn.Sequential(nn.Linear(hidden, llm_width), nn.GELU(),
                                  nn.Linear(llm_width, llm_width))

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        # (B, 1+P, Dv) -> (B, Q, hidden) -> (B, Q, H)
        query = self.query.expand(vision_tokens.shape[0], -1, -1)
        out = self.qformer(query_embeds=query, encoder_hidden_states=vision_tokens)
        return self.proj(out.last_hidden_state)


class LateFusion(nn.Module):
    """Gate the LLM vector with the vision CLS: ``z = σ(W_g[h; v])``, ``ĥ = z⊙h + (1−z)⊙v``."""

    def __init__(self, vision_width: int, llm_width: int):
        super().__init__()
        self.vision_proj = nn.Linear(vision_width, llm_width)  # W_p
        self.gate = nn.Linear(2 * llm_width, llm_width, bias=False)  # W_g

    def forward(self, h: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused vector (B, H) and the gate ``z`` (B, H): 1 = all LLM, 0 = all image."""
        v = self.vision_proj(cls)  # (B, H)
        z = torch.sigmoid(self.gate(torch.cat([h, v], dim=-1)))  # (B, H)
        return z * h + (1 - z) * v, z


class ConcatFusion(nn.Module):
    """Additive late fusion: ``n = [√w·t̃ ; √(1−w)·ṽ]``.

    ``t̂`` is the L2-normalised head projection of the LLM vector, ``v̂`` that of the image
    vector, ``w = σ(λ)`` a learned text share. The cosine of two notes is then
    ``w·cos(t̃) + (1−w)·cos(ṽ)``: the evidence of the two modalities adds up, in dimensions of
    their own, where the gate mixes both into the same dimensions and one modality's chance
    similarity can cancel the other's match.

    ``t̃ = unit((t̂ − μ_t) W_t)`` and ``ṽ = unit((v̂ − μ_v) W_v)`` whiten each channel with
    statistics fitted after training (:func:`fit_whitening`; identity until then): trained
    channels are anisotropic — unrelated notes sit at cosine ~0.55 with a wide spread — and that
    chance similarity, not a weak match, is what drowns the shared modality in the sum. Whitened,
    unrelated notes sit around 0 and a match in either channel stands out. The statistics are
    kept in ``whitening.safetensors`` beside the weights."""

    def __init__(self, vision_width: int, text_dim: int, image_dim: int, text_share: float = 0.5):
        super().__init__()
        self.image_head = nn.Linear(vision_width, image_dim, bias=False)
        # shape (1,): DeepSpeed cannot broadcast a 0-dim parameter
        self.text_logit = nn.Parameter(torch.full((1,), math.log(text_share / (1 - text_share))))
        for name, dim in (("text", text_dim), ("image", image_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim), persistent=False)
            self.register_buffer(f"{name}_white", torch.eye(dim), persistent=False)

    def text_share(self) -> torch.Tensor:
        return torch.sigmoid(self.text_logit.float())

    @staticmethod
    def _whiten(x: torch.Tensor, mean: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
        return F.normalize((x - mean.float()) @ white.float(), dim=-1)

    def forward(self, t: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """t: (B, d_t) unit text-side vectors; cls: (B, Dv) or None (no image: a zero image
        channel). Returns (B, d_t + image_dim) unit vectors."""
        w = self.text_share()
        t = self._whiten(t.float(), self.text_mean, self.text_white)
        if cls is None:
            v = t.new_zeros(t.shape[0], self.image_head.out_features)
        else:
            v = F.normalize(self.image_head(cls).float(), dim=-1)
            v = self._whiten(v, self.image_mean, self.image_white)
        return F.normalize(torch.cat([w.sqrt() * t, (1 - w).sqrt() * v], dim=-1), dim=-1)

    def channels(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit text and image channels of fused vectors ``n`` (B, d); a note without an
        image has a zero image channel."""
        d_t = self.text_mean.shape[0]
        return F.normalize(n[:, :d_t], dim=-1), F.normalize(n[:, d_t:], dim=-1)

    def whitening(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().float().cpu().contiguous()
                for k in ("text_mean", "text_white", "image_mean", "image_white")}

    def set_whitening(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            buf = getattr(self, k)
            if buf.shape != v.shape:
                raise ValueError(f"whitening {k}: shape {tuple(v.shape)}, the model has "
                                 f"{tuple(buf.shape)}")
            buf.copy_(v.to(buf.dtype))

    def set_whitening_from(self, other: ConcatFusion) -> None:
        """Take ``other``'s whitening (this module's buffers may still be on the meta device)."""
        for k, v in other.whitening().items():
            setattr(self, k, v.clone())

    def reset_whitening(self) -> None:
        for name in ("text", "image"):
            getattr(self, f"{name}_mean").zero_()
            white = getattr(self, f"{name}_white")
            white.copy_(torch.eye(white.shape[0], dtype=white.dtype))


def whitening_stats(x: np.ndarray, shrinkage: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ZCA whitening matrix of the rows of ``x`` (n, d), with the covariance's
    eigenvalues shrunk towards their mean by ``shrinkage`` (a direction seen in few notes is
    not blown up)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("whitening needs at least two vectors")
    mean = x.mean(axis=0)
    cov = np.cov((x - mean).T)
    e, u = np.linalg.eigh(cov)
    e = np.clip(e, 0.0, None)
    white = u @ np.diag(1.0 / np.sqrt(e + shrinkage * max(e.mean(), 1e-12))) @ u.T
    return torch.from_numpy(mean).float(), torch.from_numpy(white).float()


def fit_whitening(model: NoteLLM2, notes, *, device: str | None = None, batch_size: int = 64,
                  progress: bool = True, shrinkage: float = 0.1) -> dict[str, torch.Tensor]:
    """Fit the concatenation's channel whitening on ``notes`` (a sample of training notes)
    and set it in ``model``; returns the statistics. A note without a picture is encoded with
    a blank one, as everywhere; a channel seen in fewer than twice its width of notes, or the
    same in every note (no pictures at all), stays unwhitened."""
    from model.encode import encode

    fusion = model.fusion
    if not isinstance(fusion, ConcatFusion):
        raise ValueError("whitening applies to model.fusion=concat only")
    fusion.reset_whitening()
    n = torch.from_numpy(encode(model, notes, batch_size=batch_size, device=device,
                                progress=progress, desc="whitening"))
    t, v = fusion.channels(n)
    stats = {}
    for name, x in (("text", t), ("image", v)):
        if len(x) < 2 * x.shape[1]:  # too few to estimate a covariance: leave it unwhitened
            log.warning("whitening: %d notes for the %d-d %s channel (%d needed); left as is",
                        len(x), x.shape[1], name, 2 * x.shape[1])
            continue
        if float(x.var(dim=0).sum()) < 1e-6:  # e.g. no note has a picture: nothing to whiten
            log.warning("whitening: the %s channel is the same for every note; left as is", name)
            continue
        stats[f"{name}_mean"], stats[f"{name}_white"] = whitening_stats(x.numpy(), shrinkage)
    fusion.set_whitening(stats)
    return stats


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row; right and left padding alike. (B, T) -> (B,)"""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).int().argmax(dim=1)


class NoteLLM2(nn.Module):
    """LLM + vision tower + connector + late fusion + 64-d head, one code path for all variants."""

    def __init__(self, config: ModelConfig, llm: nn.Module, vision: nn.Module | None,
                 tokenizer, image_processor=None, *, init_context=nullcontext):
        """``init_context`` is entered while the new parts (connector, fusion, head) are created:
        ``deepspeed.zero.Init`` under ZeRO-3. The temperature, a 0-dim parameter, stays outside
        (DeepSpeed partitions tensors as bytes, which a 0-dim tensor cannot be viewed as)."""
        super().__init__()
        self.config = config
        self.llm = llm
        self.vision = vision
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        H = llm.config.hidden_size
        Dv = vision.config.hidden_size if vision is not None else 0
        with init_context():
            self.connector = build_connector(config, Dv, H) if config.uses_image_tokens else None
            text_dim = config.embed_dim
            if not config.uses_fusion:
                self.fusion = None
            elif config.fusion == "concat":  # the head is the text channel's projection
                text_dim = config.embed_dim - config.embed_dim // 2
                self.fusion = ConcatFusion(Dv, text_dim, config.embed_dim // 2,
                                           config.text_share_init)
            else:
                self.fusion = LateFusion(Dv, H)
            self.head = nn.Linear(H, text_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(float(config.log_scale_init)))
        self.img_id = tokenizer.convert_tokens_to_ids(IMG)
        self.img_emb_id = tokenizer.convert_tokens_to_ids(IMG_EMB)
        self.prompts = PromptBuilder(
            tokenizer, config.variant, language=config.prompt_language,
            num_query_tokens=config.num_query_tokens, max_tokens=config.max_tokens,
            title_max_chars=config.title_max_chars, content_max_chars=config.content_max_chars,
            max_topics=config.max_topics)
        self.has_cls_token = vision is not None and any(
            name.endswith(("class_embedding", "cls_token")) for name, _ in vision.named_parameters())
        if config.vision_cls == "cls" and vision is not None and not self.has_cls_token:
            raise ValueError(f"model.vision_cls=cls but the {vision.config.model_type} tower has "
                             "no CLS token; use auto or pooled")
        # the image vector fusion gates with: the CLS token of the chosen layer where there is
        # one (the reference's `image_features[:, 0]`), else the tower's pooled output
        self.cls_from_token = config.vision_cls == "cls" or (config.vision_cls == "auto"
                                                             and self.has_cls_token)
        self.pixel_shape = pixel_shape(image_processor, vision) if vision is not None else None
        self.set_trainable(vision=config.train_vision, llm=config.train_llm,
                           connector=config.train_connector, fusion=config.train_fusion)
        checkpointing = (getattr(llm, "activation_checkpointing_enable", None)  # transformers 5
                         or getattr(llm, "gradient_checkpointing_enable", None))
        if config.gradient_checkpointing and checkpointing is not None:
            checkpointing()

    # -- parts --------------------------------------------------------------------------------

    def set_trainable(self, *, vision: bool, llm: bool, connector: bool, fusion: bool) -> None:
        for module, flag in ((self.vision, vision), (self.llm, llm),
                             (self.connector, connector), (self.fusion, fusion)):
            if module is not None:
                module.requires_grad_(flag)
        if isinstance(self.fusion, ConcatFusion) and not self.config.learn_text_share:
            self.fusion.text_logit.requires_grad_(False)  # w stays at model.text_share_init

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> vision tokens of ``model.vision_layer`` (B, 1+P, Dv) with a CLS
        token (CLIP), (B, P, Dv) without (SigLIP); and the image vector (B, Dv)."""
        layer = self.config.vision_layer
        out = self.vision(pixel_values=pixel_values, output_hidden_states=layer != -1)
        tokens = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        return tokens, tokens[:, 0] if self.cls_from_token else out.pooler_output

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, *,
                output_attentions: bool = False) -> dict[str, torch.Tensor | None]:
        """Note vectors.

        input_ids, attention_mask: (B, T); pixel_values: (B, 3, S, S).
        Returns ``n_m`` (B, d) and, for the mICL variants, ``n_v`` (B, d), both L2-normalised;
        with ``output_attentions`` also the LLM's attention maps, per layer (B, heads, T, T).
        With late fusion also ``text_share`` (B,): how much of ``n_m`` the LLM side holds (the
        mean gate ``z`` per note; the learned ``w`` of the concatenation).
        """
        cfg = self.config
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        cls = None
        if self.vision is not None and pixel_values is not None:
            tokens, cls = self.encode_image(pixel_values.to(embeds.dtype))
            if self.connector is not None:
                if isinstance(self.connector, MlpConnector) and self.has_cls_token:
                    tokens = tokens[:, 1:]  # LLaVA style: patches only
                img_tokens = self.connector(tokens.to(embeds.dtype))  # (B, Q, H)
                slots = (input_ids == self.img_id).unsqueeze(-1)  # (B, T, 1)
                embeds = embeds.masked_scatter(slots, img_tokens.to(embeds.dtype))
        # positions count real tokens only, so left padding gives the same vectors as right
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        llm_out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                           position_ids=position_ids, output_attentions=output_attentions)
        hidden = llm_out.last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_m = hidden[rows, last_token_index(attention_mask)]  # (B, H)
        h_v = None
        if cfg.uses_visual_vector:
            pos = (input_ids == self.img_emb_id).int().argmax(dim=1) - 1  # token before <IMG_EMB>
            h_v = hidden[rows, pos]  # (B, H)
        share = None
        if isinstance(self.fusion, ConcatFusion):
            cls = cls.to(h_m.dtype) if cls is not None else None
            n_m = self.fusion(F.normalize(self.head(h_m).float(), dim=-1), cls)
            n_v = (self.fusion(F.normalize(self.head(h_v).float(), dim=-1), cls)
                   if h_v is not None else None)
            share = self.fusion.text_share().expand(n_m.shape[0])
        else:
            if self.fusion is not None and cls is not None:
                cls = cls.to(h_m.dtype)
                h_m, z = self.fusion(h_m, cls)
                h_v = self.fusion(h_v, cls)[0] if h_v is not None else None
                share = z.float().mean(dim=-1)
            n_m = F.normalize(self.head(h_m).float(), dim=-1)
            n_v = F.normalize(self.head(h_v).float(), dim=-1) if h_v is not None else None
        out = {"n_m": n_m, "n_v": n_v, "text_share": share}
        if output_attentions:
            out["attentions"] = llm_out.attentions
        return out

    # -- save / load --------------------------------------------------------------------------

    def save_pretrained(self, path: str) -> None:
        """config.json, model.safetensors, llm/ and vision/ configs, tokenizer/, image_processor/."""
        from safetensors.torch import save_model

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "model": self.config.to_dict()}, f,
                      indent=2)
        self.llm.config.save_pretrained(os.path.join(path, "llm"))
        if self.vision is not None:
            self.vision.config.save_pretrained(os.path.join(path, "vision"))
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(os.path.join(path, "image_processor"))
        save_model(self, os.path.join(path, "model.safetensors"))
        if isinstance(self.fusion, ConcatFusion):
            save_whitening(self, path)

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> NoteLLM2:
        """Load an exported model with every part in ``dtype`` (see :mod:`model.precision`),
        whatever dtype it was trained and stored in."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
        if saved.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: model format {saved.get('format_version')} is not "
                             f"{FORMAT_VERSION}; re-export it with this version")
        known = {f.name for f in fields(ModelConfig)}
        config = ModelConfig(**{k: v for k, v in saved["model"].items() if k in known})
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        # the saved configs carry the dtype training ran in; from_config would build in it
        llm = AutoModel.from_config(AutoConfig.from_pretrained(os.path.join(path, "llm")),
                                    trust_remote_code=config.trust_remote_code, dtype=dtype)
        vision = processor = None
        if os.path.isdir(os.path.join(path, "vision")):
            vision = AutoModel.from_config(AutoConfig.from_pretrained(os.path.join(path, "vision")),
                                           dtype=dtype)
            processor = load_image_processor(os.path.join(path, "image_processor"))
        model = cls(config, llm, vision, tokenizer, processor).to(dtype)
        load_model(model, os.path.join(path, "model.safetensors"), device=map_location)
        whitening = os.path.join(path, WHITENING)
        if isinstance(model.fusion, ConcatFusion) and os.path.exists(whitening):
            from safetensors.torch import load_file

            model.fusion.set_whitening(load_file(whitening))
        return model.eval()


WHITENING = "whitening.safetensors"


def save_whitening(model: NoteLLM2, path: str) -> None:
    """The concatenation's channel whitening, beside the weights (a few KB: refitting it does
    not rewrite the model)."""
    from safetensors.torch import save_file

    save_file(model.fusion.whitening(), os.path.join(path, WHITENING))


def load_image_processor(path: str):
    # The PIL backend: the same pixels on every machine, with or without torchvision.
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except (TypeError, ValueError):
        return AutoImageProcessor.from_pretrained(path)


def default_image_processor(vision_config):
    """The processor a tower of this family is published with, at the tower's own image size:
    SigLIP resizes to S x S around 0.5 mean/std; CLIP resizes the shortest edge and centre-crops,
    with OpenAI's mean/std."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    s = vision_config.image_size
    if "siglip" in vision_config.model_type:
        return SiglipImageProcessorPil(size={"height": s, "width": s})
    return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def pixel_shape(processor, vision) -> tuple[int, int, int]:
    """(3, H, W) of what ``processor`` makes of any photo, checked against the tower: a processor
    must give one fixed size whatever the photo's aspect, and the size the tower was built for."""
    from PIL import Image

    shapes = {tuple(processor(images=[Image.new("RGB", size)], return_tensors="pt")
                    ["pixel_values"].shape[1:]) for size in ((64, 48), (48, 64))}
    name = getattr(vision.config, "_name_or_path", "") or vision.config.model_type
    if len(shapes) > 1:
        raise ValueError(f"the image processor of {name} gives images of different sizes "
                         f"({sorted(shapes)}) for photos of different aspect: it must resize or "
                         "crop to one size (check preprocessor_config.json)")
    shape = shapes.pop()
    side = getattr(vision.config, "image_size", None)
    if side is not None and shape[1:] != (side, side):
        raise ValueError(f"the image processor of {name} gives {shape[1]}x{shape[2]} images but "
                         f"the tower is built for {side}x{side} (check preprocessor_config.json)")
    return shape


# -- builders ------------------------------------------------------------------------------------


def build_connector(config: ModelConfig, vision_width: int, llm_width: int) -> nn.Module:
    if config.connector == "mlp":
        return MlpConnector(vision_width, llm_width, config.num_query_tokens)
    return QFormerConnector(vision_width, llm_width, config.num_query_tokens,
                            layers=config.qformer_layers, hidden=config.qformer_hidden_size,
                            heads=config.qformer_heads,
                            cross_attention_frequency=config.qformer_cross_attention_frequency)


def build_model(config: ModelConfig, *, corpus: list[str] | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, init_context=nullcontext) -> NoteLLM2:
    """Build a fresh NoteLLM-2 from ``config`` with every part in ``dtype`` (see
    :mod:`model.precision`), whatever dtype the checkpoints are stored in. ``corpus`` trains the
    tiny tokenizer.

    Under DeepSpeed ZeRO-3 ``init_context`` is ``deepspeed.zero.Init`` (and transformers'
    ``HfDeepSpeedConfig`` is alive): every part is created partitioned and the checkpoints are
    read by rank 0 only, so no process holds the whole model.
    """
    torch.manual_seed(seed)
    with init_context():
        tokenizer, llm = build_llm(config, corpus or [], dtype)
        vision, processor = build_vision(config, dtype) if config.needs_vision else (None, None)
    model = NoteLLM2(config, llm, vision, tokenizer, processor, init_context=init_context)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        model.to(dtype)  # the new parts; ZeRO-3 created them in its own dtype already
    return model


def build_llm(config: ModelConfig, corpus: list[str], dtype: torch.dtype):
    """The tokenizer (placeholders added, pad set) and the decoder, new rows at the mean."""
    from transformers import AutoModel, AutoTokenizer, Qwen2Config

    if config.llm == TINY:
        tokenizer = train_tiny_tokenizer(corpus, vocab_size=config.tiny_vocab_size)
        h = config.tiny_hidden_size
        llm_config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h,
            num_hidden_layers=config.tiny_num_layers, num_attention_heads=config.tiny_num_heads,
            num_key_value_heads=config.tiny_num_heads, max_position_embeddings=1024,
            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer, AutoModel.from_config(llm_config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(config.llm,
                                              trust_remote_code=config.trust_remote_code)
    trained = len(tokenizer)
    new_ids = add_placeholder_tokens(tokenizer)
    llm = load_decoder(config.llm, dtype=dtype, trust_remote_code=config.trust_remote_code)
    init_new_rows(llm, new_ids, trained)
    return tokenizer, llm


def llm_width(config: ModelConfig) -> int:
    """The hidden size of the configured LLM, read from its config alone (no weights)."""
    if config.llm == TINY:
        return config.tiny_hidden_size
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(config.llm, trust_remote_code=config.trust_remote_code)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.hidden_size)


def load_decoder(name_or_path: str, *, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> nn.Module:
    """The decoder body (no LM head) of a causal LLM in ``dtype``: ``AutoModel`` where the
    architecture maps to its base model (Qwen2/3, Llama, Mistral, ...), else the causal-LM
    class's decoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    kw = {"config": cfg, "dtype": dtype, "trust_remote_code": trust_remote_code}
    with _quiet_load_report():
        try:
            return AutoModel.from_pretrained(name_or_path, **kw)
        except ValueError:
            return AutoModelForCausalLM.from_pretrained(name_or_path, **kw).get_decoder()


def build_vision(config: ModelConfig, dtype: torch.dtype = torch.float32):
    """The vision tower in ``dtype`` and its image processor. A full CLIP/SigLIP checkpoint
    (text tower included) gives its vision tower; a folder without ``preprocessor_config.json``
    gets the family's standard processor at the tower's image size, with a warning."""
    from transformers import AutoConfig, AutoModel, CLIPVisionConfig

    if config.vision == TINY:
        w = config.tiny_vision_hidden_size
        vc = CLIPVisionConfig(hidden_size=w, intermediate_size=2 * w,
                              num_hidden_layers=config.tiny_vision_layers, num_attention_heads=4,
                              image_size=config.image_size, patch_size=config.tiny_patch_size)
        return AutoModel.from_config(vc, dtype=dtype), default_image_processor(vc)
    vc = AutoConfig.from_pretrained(config.vision, trust_remote_code=config.trust_remote_code)
    vc = getattr(vc, "vision_config", vc)  # a full CLIP/SigLIP checkpoint: take its tower
    tower = AutoModel._model_mapping[type(vc)]  # CLIPVisionModel, SiglipVisionModel, ...
    with _quiet_load_report():
        vision = tower.from_pretrained(config.vision, config=vc, dtype=dtype)
    try:
        processor = load_image_processor(config.vision)
    except OSError:
        log.warning("%s has no image processor config: using the %s default at %d px",
                    config.vision, vc.model_type, vc.image_size)
        processor = default_image_processor(vc)
    return vision, processor


@contextmanager
def _quiet_load_report():
    """transformers prints a table of the checkpoint keys it did not use; a causal LM's
    ``lm_head`` and a CLIP checkpoint's text tower are left out on purpose."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)

"""Model configuration. Frozen: change with ``dataclasses.replace``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

VARIANTS = ("text_only", "mllm_basic", "late_fusion", "micl", "notellm2")

TINY = "tiny"  # build the part from the tiny_* sizes below instead of loading weights


@dataclass(frozen=True)
class ModelConfig:
    """What the NoteLLM-2 network is made of.

    ``llm`` and ``vision`` name a Hugging Face id or a local folder; ``"tiny"`` builds the part
    from a real transformers config (Qwen2 / CLIP vision) at the ``tiny_*`` sizes, with a
    tokenizer trained on the training notes — that is how tests and the demo run without a hub.
    """

    variant: str = "notellm2"
    llm: str = TINY
    vision: str = TINY
    trust_remote_code: bool = False
    # connector: vision tokens -> num_query_tokens LLM-width tokens that replace <IMG>
    connector: str = "qformer"  # "qformer" (BLIP-2 Q-Former + MLP) or "mlp" (LLaVA style)
    num_query_tokens: int = 16
    qformer_layers: int = 6
    qformer_hidden_size: int = 768
    qformer_heads: int = 12
    qformer_cross_attention_frequency: int = 2  # cross-attention in every n-th layer (BLIP-2: 2)
    embed_dim: int = 64
    # late fusion (variants late_fusion, notellm2): "gate" = the paper's z⊙h + (1−z)⊙v before
    # the head; "concat" = [√w·text ; √(1−w)·image], each channel L2-normalised in half of
    # embed_dim, w learned from text_share_init, so the two modalities' similarities add up
    fusion: str = "gate"
    text_share_init: float = 0.5
    learn_text_share: bool = True  # false: w stays at text_share_init
    # prompt
    prompt_language: str = "en"  # "en" or "zh" (the reference code's wording)
    max_tokens: int = 140  # text tokens, image tokens not counted
    title_max_chars: int = 20
    content_max_chars: int = 80
    max_topics: int = 10
    # the side of the tiny tower's images; a loaded tower's image geometry and normalisation
    # come from its own image processor (CLIP 224/336, SigLIP 384, ...)
    image_size: int = 224
    # vision features: the hidden layer whose tokens feed the connector (-1 = the tower's output;
    # LLaVA-style towers take -2) and the image vector late fusion gates with:
    # "auto" = the CLS token of that layer where the tower has one (CLIP; the reference code's
    # `image_features[:, 0]`), else the tower's pooled output (SigLIP's attention-pooling head);
    # "cls" = always the first token; "pooled" = always the tower's pooler output
    vision_layer: int = -1
    vision_cls: str = "auto"
    # loss
    log_scale_init: float = 3.0  # learnable log of 1/temperature; e^3 ≈ 20
    loss_weight_m: float = 9.0
    loss_weight_v: float = 1.0
    # trainable parts
    train_vision: bool = False
    train_llm: bool = True
    train_connector: bool = True
    train_fusion: bool = True
    gradient_checkpointing: bool = False
    # sizes used when llm / vision == "tiny"
    tiny_hidden_size: int = 64
    tiny_num_layers: int = 2
    tiny_num_heads: int = 4
    tiny_vocab_size: int = 2000
    tiny_vision_hidden_size: int = 64
    tiny_vision_layers: int = 2
    tiny_patch_size: int = 8

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant must be one of {', '.join(VARIANTS)}, "
                             f"not {self.variant!r}")
        if self.connector not in ("qformer", "mlp"):
            raise ValueError(f"model.connector must be 'qformer' or 'mlp', not {self.connector!r}")
        if self.prompt_language not in ("en", "zh"):
            raise ValueError(f"model.prompt_language must be 'en' or 'zh', "
                             f"not {self.prompt_language!r}")
        if self.vision_cls not in ("auto", "cls", "pooled"):
            raise ValueError(f"model.vision_cls must be auto, cls or pooled, not {self.vision_cls!r}")
        if self.fusion not in ("gate", "concat"):
            raise ValueError(f"model.fusion must be gate or concat, not {self.fusion!r}")
        if not 0.0 < self.text_share_init < 1.0:
            raise ValueError(f"model.text_share_init must lie in (0, 1), not {self.text_share_init}")
        if self.embed_dim <= 0 or self.num_query_tokens <= 0:
            raise ValueError("model.embed_dim and model.num_query_tokens must be positive")

    # which parts a variant uses
    @property
    def uses_image_tokens(self) -> bool:
        return self.variant in ("mllm_basic", "micl", "notellm2")

    @property
    def uses_fusion(self) -> bool:
        return self.variant in ("late_fusion", "notellm2")

    @property
    def uses_visual_vector(self) -> bool:
        """mICL variants also produce n_v and train it with L_v."""
        return self.variant in ("micl", "notellm2")

    @property
    def needs_vision(self) -> bool:
        return self.variant != "text_only"

    def to_dict(self) -> dict:
        return asdict(self)

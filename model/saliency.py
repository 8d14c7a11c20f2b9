"""Saliency diagnostic (NoteLLM-2 §2.5): how much of the final token's information flow comes from
the image tokens versus the text tokens.

For every LLM layer ``l``: ``I_l = |Σ_heads A_l ⊙ ∂L/∂A_l|`` (attention times its gradient, Wang et
al. 2023, as in the paper). The row of the final token, summed over layers, splits into the share
flowing from image slots and from text tokens. The paper found the text share dominating, the
motivation for mICL and late fusion. ``L`` is the contrastive loss of the batch's pairs.
"""

from __future__ import annotations

import torch

from model.loss import notellm2_loss
from model.network import last_token_index


def image_text_saliency(model, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """``batch``: collated 2N notes of N pairs (a_1..a_N, b_1..b_N). Returns the mean
    ``image_share`` and ``text_share`` (they sum to 1) and per-note ``image_shares`` (2N,).

    Variants without image tokens (``text_only``, ``late_fusion``) report an image share of 0:
    their image enters after the LLM, through the fusion gate, not through attention.
    """
    llm = model.llm
    previous = llm.config._attn_implementation
    was_training = model.training
    llm.set_attn_implementation("eager")  # attention probabilities must exist as tensors
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        out = model(**batch, output_attentions=True)
        attentions = out["attentions"]
        for a in attentions:
            a.retain_grad()
        loss = notellm2_loss(out, model.log_scale, model.config.loss_weight_m,
                             model.config.loss_weight_v, gather=False)["loss"]
        loss.backward()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = torch.arange(ids.shape[0])
        last = last_token_index(mask)
        flow = torch.zeros(ids.shape, dtype=torch.float32)  # (B, T)
        for a in attentions:
            sal = (a * a.grad).sum(dim=1).abs()  # (B, T, T)
            flow += sal[rows, last].detach().float().cpu()
        flow[rows, last] = 0.0  # the token's flow to itself is neither image nor text
        flow = flow * mask.float()
        image = (ids == model.img_id).float()
        img_flow = (flow * image).sum(1)
        total = flow.sum(1).clamp_min(1e-30)
        shares = img_flow / total  # (B,)
        return {"image_share": float(shares.mean()), "text_share": float(1 - shares.mean()),
                "image_shares": shares.tolist()}
    finally:
        model.zero_grad(set_to_none=True)
        llm.set_attn_implementation(previous)
        model.train(was_training)

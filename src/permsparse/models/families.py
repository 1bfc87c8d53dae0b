"""The per-family table: the permutation sites of each known Transformer block.

:data:`REGISTRY` maps ``config.model_type`` to block templates; a template names, by module
paths relative to the block, the layers that share an input permutation and how it is
paid for (DESIGN.md §3), plus how to read the block's attention heads. Blocks are matched
by class name and by holding every module their template names, so one family may carry
several templates (e.g. the module names of two transformers versions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

__all__ = [
    "SiteSpec",
    "BlockTemplate",
    "HeadsFn",
    "REGISTRY",
    "find_blocks",
    "match_blocks",
]


@dataclass(frozen=True)
class SiteSpec:
    """A site inside one block, by module names relative to the block."""

    name: str
    consumers: tuple[str, ...]
    payment: str
    norm: str | None = None
    producers: tuple[tuple[str, int], ...] = ()  # (module, which third of a fused qkv: 0 or 2, x d_in)
    through_attention: bool = False  # fold via v rows: head-tied


HeadsFn = Callable[[nn.Module], tuple[int, int, int]]  # block -> (num_heads, num_kv_heads, head_dim)


@dataclass(frozen=True)
class BlockTemplate:
    """The sites of one kind of block: its class names, its sites, how to read its heads."""

    block_classes: tuple[str, ...]
    sites: tuple[SiteSpec, ...]
    heads: HeadsFn


def _llama_heads(block: nn.Module) -> tuple[int, int, int]:
    attn = block.self_attn
    cfg = attn.config
    return cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), attn.head_dim


def _encoder_heads(block: nn.Module) -> tuple[int, int, int]:
    """ViT / BERT: multi-head attention, heads read from the attention module or its config."""
    att = block.attention
    for sub in ("attention", "self"):  # transformers 4.x nests the heads one level down
        att = getattr(att, sub, att)
    n = getattr(att, "num_attention_heads", None) or att.config.num_attention_heads
    head_dim = getattr(att, "attention_head_size", None) or getattr(att, "head_dim", None)
    if head_dim is None:
        head_dim = att.config.hidden_size // n
    return n, n, head_dim


def _qwen_vision_heads(block: nn.Module) -> tuple[int, int, int]:
    attn = block.attn
    return attn.num_heads, attn.num_heads, attn.proj.in_features // attn.num_heads


LLAMA_LIKE_SITES = (
    SiteSpec("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "gather_norm", norm="input_layernorm"),
    SiteSpec("attn_out", ("self_attn.o_proj",), "fold", producers=(("self_attn.v_proj", 0),), through_attention=True),
    SiteSpec("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "gather_norm", norm="post_attention_layernorm"),
    SiteSpec("mlp_out", ("mlp.down_proj",), "fold", producers=(("mlp.gate_proj", 0), ("mlp.up_proj", 0))),
)

VIT_SITES = (
    SiteSpec("attn_in", ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "gather_norm", norm="layernorm_before"),
    SiteSpec("attn_out", ("attention.o_proj",), "fold", producers=(("attention.v_proj", 0),), through_attention=True),
    SiteSpec("mlp_in", ("mlp.fc1",), "gather_norm", norm="layernorm_after"),
    SiteSpec("mlp_out", ("mlp.fc2",), "fold", producers=(("mlp.fc1", 0),)),
)

VIT_SITES_V4 = (  # transformers 4.x module names
    SiteSpec(
        "attn_in",
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "gather_norm",
        norm="layernorm_before",
    ),
    SiteSpec("attn_out", ("attention.output.dense",), "fold", producers=(("attention.attention.value", 0),), through_attention=True),
    SiteSpec("mlp_in", ("intermediate.dense",), "gather_norm", norm="layernorm_after"),
    SiteSpec("mlp_out", ("output.dense",), "fold", producers=(("intermediate.dense", 0),)),
)

# BERT is post-LayerNorm: the block's input is the residual stream, read again by the
# residual adds, so its readers cannot share a gather in a norm; each gathers on its own.
BERT_SITES = (
    SiteSpec("attn_in", ("attention.self.query", "attention.self.key", "attention.self.value"), "gather"),
    SiteSpec("attn_out", ("attention.output.dense",), "fold", producers=(("attention.self.value", 0),), through_attention=True),
    SiteSpec("mlp_in", ("intermediate.dense",), "gather"),
    SiteSpec("mlp_out", ("output.dense",), "fold", producers=(("intermediate.dense", 0),)),
)

QWEN_VISION_SITES = (
    SiteSpec("attn_in", ("attn.qkv",), "gather_norm", norm="norm1"),
    SiteSpec("attn_out", ("attn.proj",), "fold", producers=(("attn.qkv", 2),), through_attention=True),
    SiteSpec("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "gather_norm", norm="norm2"),
    SiteSpec("mlp_out", ("mlp.down_proj",), "fold", producers=(("mlp.gate_proj", 0), ("mlp.up_proj", 0))),
)

REGISTRY: dict[str, tuple[BlockTemplate, ...]] = {
    "llama": (BlockTemplate(("LlamaDecoderLayer",), LLAMA_LIKE_SITES, _llama_heads),),
    "mistral": (BlockTemplate(("MistralDecoderLayer",), LLAMA_LIKE_SITES, _llama_heads),),
    "qwen2": (BlockTemplate(("Qwen2DecoderLayer",), LLAMA_LIKE_SITES, _llama_heads),),
    "qwen2_5_vl": (
        BlockTemplate(("Qwen2_5_VLDecoderLayer",), LLAMA_LIKE_SITES, _llama_heads),
        BlockTemplate(("Qwen2_5_VLVisionBlock",), QWEN_VISION_SITES, _qwen_vision_heads),
    ),
    "vit": (
        BlockTemplate(("ViTLayer",), VIT_SITES, _encoder_heads),
        BlockTemplate(("ViTLayer",), VIT_SITES_V4, _encoder_heads),
    ),
    "bert": (BlockTemplate(("BertLayer",), BERT_SITES, _encoder_heads),),
}


def find_blocks(model: nn.Module, template: BlockTemplate) -> list[tuple[str, nn.Module]]:
    """Blocks of ``template``'s classes that hold every module its sites name."""
    out = []
    for n, m in model.named_modules():
        if type(m).__name__ not in template.block_classes:
            continue
        names = {c for spec in template.sites for c in spec.consumers + tuple(p for p, _ in spec.producers)}
        names |= {spec.norm for spec in template.sites if spec.norm}
        if all(_has(m, c) for c in names):
            out.append((n, m))
    return out


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def match_blocks(model: nn.Module, templates: Sequence[BlockTemplate]) -> list[tuple[str, nn.Module, BlockTemplate]]:
    """Each block with the first template that fits it, in forward (module) order."""
    found: dict[str, tuple[nn.Module, BlockTemplate]] = {}
    for template in templates:
        for name, block in find_blocks(model, template):
            found.setdefault(name, (block, template))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return [(n, b, t) for n, (b, t) in sorted(found.items(), key=lambda kv: order[kv[0]])]

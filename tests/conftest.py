"""Shared fixtures: tiny random models of every supported family, built locally (no Hub).

Use the session-scoped ``tiny`` factory::

    def test_x(tiny):
        t = tiny("llama")                  # a fresh, seeded model every call
        model, inputs, key = t             # unpacks as (model, example_inputs, output_key)
        ref = t.output()                   # model(**inputs)[key] under no_grad
        batches = t.batches(4)             # more random inputs of the same shapes (calibration)

or the per-family fixtures (``tiny_llama``, ``tiny_bert``...), or the parametrised
``tiny_family`` fixture that runs a test once per family in :data:`TINY_FAMILIES`.

All widths are multiples of 16, so 2:4 and 4:8 patterns fit with ``groups`` in {1, 2, 4}.
Weights use ``initializer_range=0.1`` (not 0.02) so that a wrong permutation changes the
outputs far beyond float32 noise. Real embedded models: ``smollm2`` and ``minilm`` (session
scoped, loaded once; tests that change them must ``copy.deepcopy`` first).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Property tests draw the same examples on every run, so a failure reproduces; no deadline,
# since the machine is shared and a slow example is not a wrong one.
settings.register_profile("permsparse", derandomize=True, deadline=None)
settings.load_profile("permsparse")


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core, at most 4) each worker gets
    its share of the cores: torch's default of one thread per core in every worker
    oversubscribes them, and its thread pools then wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """The real-model tests first (the longest: up to 2 minutes on one core), so that workers
    share them from the start instead of one worker running the last of them alone."""
    items.sort(key=lambda item: "smollm2" not in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _bf16_rule(request, monkeypatch):
    """The library runs bfloat16 only where the device computes it natively
    (permsparse.models.precision), so a test's numerics would depend on the machine. The default
    tier runs float32 on every CPU (fast: bfloat16 on a CPU without it is 10x slower); a test
    marked ``bf16`` runs bfloat16 as asked on every CPU; the slow tier (real models, quality) runs
    as a user's run does. tests/test_precision.py checks the rule itself."""
    from permsparse.models import precision

    if request.node.get_closest_marker("bf16") is not None:
        monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    elif request.node.get_closest_marker("slow") is None:
        monkeypatch.setattr(precision, "native_bf16", lambda device_type: device_type != "cpu")
    yield


SEED = 0
VOCAB = 128
INIT = 0.1


@dataclass
class TinyModel:
    """A tiny model with example inputs; iterates as ``(model, example_inputs, output_key)``."""

    family: str
    model: torch.nn.Module
    inputs: dict
    output_key: str
    make_inputs: Callable[[int], dict] = field(repr=False)

    def __iter__(self):
        return iter((self.model, self.inputs, self.output_key))

    @torch.no_grad()
    def output(self, model: torch.nn.Module | None = None, inputs: dict | None = None) -> torch.Tensor:
        """``model(**inputs)[output_key]`` (defaults: this model and its example inputs)."""
        m = self.model if model is None else model
        return m(**(self.inputs if inputs is None else inputs))[self.output_key]

    def batches(self, n: int, seed: int = 1) -> list[dict]:
        """``n`` random input batches of the example's shapes (e.g. for calibration)."""
        return [self.make_inputs(seed + i) for i in range(n)]

    def clone(self) -> "TinyModel":
        return TinyModel(self.family, copy.deepcopy(self.model), self.inputs, self.output_key, self.make_inputs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _text_inputs(batch: int = 2, seq: int = 12, vocab: int = VOCAB) -> Callable[[int], dict]:
    def make(seed: int) -> dict:
        ids = torch.randint(3, vocab, (batch, seq), generator=_gen(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return make


def _causal(config_cls_name: str, model_cls_name: str, **cfg) -> Callable[..., tuple]:
    def build(**overrides) -> tuple:
        import transformers

        base = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=INIT,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        base.update(cfg)
        base.update(overrides)
        config = getattr(transformers, config_cls_name)(**base)
        model = getattr(transformers, model_cls_name)(config)
        return model, _text_inputs(), "logits"

    return build


def _qwen2_5_vl() -> tuple:
    """Qwen2.5-VL with a 2-block vision tower: one 8x8-patch image → 16 image tokens.

    ``grid_thw = [[1, 8, 8]]``: 64 patches of ``3 * 2 * 2 * 2`` pixels each
    (channels x temporal_patch_size x patch_size²); a 2x2 spatial merge leaves 16 tokens,
    which the prompt holds as ``image_token_id`` between vision start/end tokens. With
    ``window_size = 8`` (2x2 merged tokens per window) block 0 runs window attention over
    4 windows and block 1 (``fullatt_block_indexes``) full attention.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=INIT,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=2,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=8,
            fullatt_block_indexes=[1],
            in_channels=3,
            initializer_range=INIT,
        ),
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
        initializer_range=INIT,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    vc = config.vision_config
    grid = torch.tensor([[1, 8, 8]])
    n_patches = int(grid.prod())
    n_image_tokens = n_patches // vc.spatial_merge_size**2
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2

    def make(seed: int) -> dict:
        g = _gen(seed)
        text = torch.randint(3, 100, (6,), generator=g)
        ids = torch.cat(
            [text[:3], torch.tensor([config.vision_start_token_id]),
             torch.full((n_image_tokens,), config.image_token_id),
             torch.tensor([config.vision_end_token_id]), text[3:]]
        ).unsqueeze(0)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n_patches, patch_dim, generator=g),
            "image_grid_thw": grid,
        }

    return model, make, "logits"


def _vit() -> tuple:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, num_labels=5, initializer_range=INIT,
    )
    model = ViTForImageClassification(config)

    def make(seed: int) -> dict:
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=_gen(seed))}

    return model, make, "logits"


def _bert() -> tuple:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, initializer_range=INIT,
    )
    return BertModel(config), _text_inputs(), "last_hidden_state"


def _opt() -> tuple:
    """OPT is not in the registry: the generic traced fallback handles it."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64, init_std=INIT,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return OPTForCausalLM(config), _text_inputs(), "logits"


_BUILDERS: dict[str, Callable[..., tuple]] = {
    "llama": _causal("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True),  # GQA 4:2, tied
    "llama_mha": _causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=4, tie_word_embeddings=False),
    "mistral": _causal("MistralConfig", "MistralForCausalLM", sliding_window=None, tie_word_embeddings=False),
    "qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=False),  # q/k/v biases
    "qwen2_5_vl": _qwen2_5_vl,
    "vit": _vit,
    "bert": _bert,
    "opt": _opt,
}

CAUSAL_TEXT_FAMILIES = ("llama", "llama_mha", "mistral", "qwen2")
#: Families whose ``config.model_type`` is in :data:`permsparse.models.families.REGISTRY`.
REGISTERED_FAMILIES = ("llama", "llama_mha", "mistral", "qwen2", "qwen2_5_vl", "vit", "bert")
#: Every tiny family (``opt`` goes through the generic fallback).
TINY_FAMILIES = REGISTERED_FAMILIES + ("opt",)


def make_tiny(family: str, seed: int = SEED, **overrides) -> TinyModel:
    """A fresh tiny model of ``family`` (seeded: the same weights on every call), in eval mode.

    ``overrides`` change the config of the text-only causal families (``llama``,
    ``llama_mha``, ``mistral``, ``qwen2``), e.g. ``hidden_size=128``.
    """
    if family not in _BUILDERS:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(_BUILDERS)}")
    if overrides and family not in CAUSAL_TEXT_FAMILIES:
        raise ValueError(f"config overrides are only supported for {CAUSAL_TEXT_FAMILIES}, not {family!r}")
    torch.manual_seed(seed)
    model, make_inputs, key = _BUILDERS[family](**overrides)
    model.eval()
    model.requires_grad_(False)
    return TinyModel(family, model, make_inputs(SEED), key, make_inputs)


@pytest.fixture(scope="session")
def tiny() -> Callable[..., TinyModel]:
    """Factory: ``tiny(family, seed=0, **config_overrides)`` → a fresh :class:`TinyModel`."""
    return make_tiny


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family(request) -> TinyModel:
    """A fresh tiny model, once per family."""
    return make_tiny(request.param)


def _family_fixture(family: str):
    @pytest.fixture(name=f"tiny_{family}")
    def fixture() -> TinyModel:
        return make_tiny(family)

    return fixture


for _family in TINY_FAMILIES:
    globals()[f"tiny_{_family}"] = _family_fixture(_family)


# -- the real embedded models ----------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M (GGUF, dequantized to float32).

    Session scoped: ``copy.deepcopy`` before changing it.
    """
    try:
        from permsparse.models.loading import load_model

        return load_model("smollm2-135m")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"embedded SmolLM2 not available: {err}")


@pytest.fixture(scope="session")
def minilm():
    """``(model, tokenizer)`` of the embedded all-MiniLM-L6-v2 BERT (``BertModel``).

    Session scoped: ``copy.deepcopy`` before changing it.
    """
    try:
        from permsparse.models.loading import load_model

        return load_model(_minilm_dir(), task="encoder")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"embedded MiniLM not available: {err}")


def _minilm_dir() -> str:
    from permsparse.data.assets import embedded_bert_path

    return str(embedded_bert_path())


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (two threads stall each other on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

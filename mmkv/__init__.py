"""mmkv: multimodal KV-cache compression for transformers vision-language models.

import mmkv
model, processor = mmkv.load("bundled")         # the bundled teaching model; or a hub id / local path
chat = mmkv.chat("Which image has the red circle?", images=["a.png", "b.png"])
result = mmkv.generate(model, processor, chat, method="snapkv", budget=0.2)
print(result.text, result.trace.summary())
mmkv.save_run(result, "needle.mmkvrun", processor)   # one file the app opens without the model: mmkv.load_run
"""

from ._version import __version__  # the one version source (mmkv/_version.py)
from .bundled import BUNDLED_MODEL, EXAMPLES_DIR
from .cache.layers import BatchSizeError, cache_bytes
from .inputs.modality import IMAGE, TEXT, VIDEO, ModalityMap
from .inputs.prompt import chat
from .methods import METHODS, Method, make_method
from .models import PreparedInputs, UnsupportedModelError, adapter_for, load
from .runtime.conversation import Conversation, TurnPolicy, TurnResult
from .runtime.driver import Generation, GenerationResult, generate
from .runtime.session import Session, compress, resolve_capacity
from .statistics.attention import ATTENTION_NAME, register
from .trace.core import LayerTrace, Trace
from .trace.runfile import RunFile, load_run, save_run

__all__ = [
    "__version__",
    "ATTENTION_NAME",
    "register",
    "BUNDLED_MODEL",
    "EXAMPLES_DIR",
    "chat",
    "BatchSizeError",
    "cache_bytes",
    "Conversation",
    "TurnPolicy",
    "TurnResult",
    "Generation",
    "GenerationResult",
    "generate",
    "METHODS",
    "Method",
    "make_method",
    "IMAGE",
    "TEXT",
    "VIDEO",
    "ModalityMap",
    "PreparedInputs",
    "UnsupportedModelError",
    "adapter_for",
    "load",
    "RunFile",
    "load_run",
    "save_run",
    "Session",
    "compress",
    "resolve_capacity",
    "LayerTrace",
    "Trace",
]

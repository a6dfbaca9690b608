"""The bundled teaching VLM: synthetic tasks, tokenizer, model/processor builders and training.

``python -m mmkv.tiny.train --out mmkv/assets/mmkv-tiny-qwen2vl`` trains it; ``mmkv.models.load`` loads
the result offline.
"""

from .tasks import TASKS, Episode, Sample, check_answer, heldout_set, make_episode, make_sample

__all__ = ["TASKS", "Episode", "Sample", "check_answer", "heldout_set", "make_episode", "make_sample"]

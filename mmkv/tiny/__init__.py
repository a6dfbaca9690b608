"""The bundled teaching VLM's synthetic tasks (``tasks``: scenes, prompts, held-out sets, answer checks) and
its vocabulary (``tokenizer``).

The eval harness scores answers with these. The trainer lives outside the package, in ``training/tiny``
(``python -m training.tiny.train --out mmkv/assets/mmkv-tiny-qwen2vl``); ``mmkv.models.load`` loads the result.
"""

from .tasks import TASKS, Episode, Sample, check_answer, heldout_set, make_episode, make_sample

__all__ = ["TASKS", "Episode", "Sample", "check_answer", "heldout_set", "make_episode", "make_sample"]

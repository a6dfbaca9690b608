"""The bundled teaching VLM's trainer: model/processor builders (``model``), the function-preserving v1 -> v2
growth (``grow``), the training loop (``train``) and the v2 report (``report_v2``).

Run from the repository root, e.g. ``python -m training.tiny.train --out DIR --steps N``; the stage chains are
``scripts/train_tiny.sh`` (v1) and ``scripts/train_tiny_v2.sh`` (v2). The tasks and the vocabulary the model
is trained on live in the library (``mmkv.tiny``), since the eval harness scores answers with them.
"""

"""Using a trained model: a run directory on torch, or an ONNX export folder without torch.

    run.py         load_run: a run directory's model, tokenizer and labels (safe loaders only); Run.probs
    evaluation.py  evaluate: a split scored on torch (training's evaluations and `seqtrain eval`)
    onnx.py        load_exported_run: an ONNX export folder on onnxruntime (no torch import)
    io.py          Predictor; texts read from stdin, files and datasets, results written in input order
    target.py      load_target: a run directory or an export folder, for predict, explain and serve

This package imports nothing itself, so `seqtrain predict EXPORT_FOLDER` (onnx.py, io.py, target.py)
starts without torch.
"""

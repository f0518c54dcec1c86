"""A trained model's way to the app: its folder (packaging: weights + card) and the folder's
ONNX export (export), the MLflow runs it is logged in (tracking), handed back from the
machine that trained it (handoff), registered, promoted against the champion or rolled back
(registry).

packaging, export and tracking are foundations that training, evaluation and serving all use;
handoff and registry sit on top (tests/test_layers.py places each module). This package
imports nothing, so importing the model-folder format costs no MLflow.
"""

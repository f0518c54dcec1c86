"""Serving: the predictor, its MLflow pyfunc wrapper, the Gradio app and its deployment."""

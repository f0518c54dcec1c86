"""The data stage: fetch, validate, split, oversample, cache. Imports no prefect/mlflow/gradio."""

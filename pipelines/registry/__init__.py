"""Models in MLflow: logging and registering (`register`, `mlflow_model`), resolving a model URI (`models`), `evaluate`, `promote` and `import-diffusers`."""

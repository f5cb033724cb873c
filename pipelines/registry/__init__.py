"""Models in MLflow: logging and registering (`register`, `mlflow_model`), resolving a model URI (`models`), `evaluate`, `promote` and `import-diffusers`."""

# The registered version tags that evaluation writes and promotion reads.
EVAL_TAG = "ddpm.eval."  # ddpm.eval.<result key> = value
LAST_TAG = "ddpm.eval_last."  # ddpm.eval_last.<metric> = the key of the latest evaluation of that metric
SHORT_TAG = "eval."  # eval.<metric> = value of the latest evaluation, for MLflow's UI

"""Driver side of flatbasin: the CLI, search configuration, Tuner assembly, MLflow logging, reproduce."""

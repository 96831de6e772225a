"""SAE evals, one package per eval, each writing SAEBench-layout JSON under ``runs/<run>/evals/``."""

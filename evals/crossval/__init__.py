"""Cross-validation of the unlearning eval over folds of forget documents (``knowsep crossval``)."""

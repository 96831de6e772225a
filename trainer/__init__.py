"""Stage two: SAE architectures (`trainer.saes`), shuffled batches from an activation
store (`trainer.batches`), checkpoints (`trainer.checkpoint`) and the training loop
(`trainer.train.train`), configured by `trainer.config.TrainConfig`."""

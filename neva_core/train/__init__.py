"""The training stage: config, parallel groups, DeepSpeed config, checkpoints and launchers."""

"""One run in stages: configuration, preparation, the train-evaluate loop, report, checkpoints."""

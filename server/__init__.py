"""The platform side: aggregation, evaluation, checkpoints and the Flower ServerApp."""
